"""vLLM, decoded from what a real vLLM 0.32.0 server and offline engine returned.

Every case of tests/data/vllm-0.32.0 (both models: a Qwen3-MoE with a dense layer in
the middle, a DeepSeek-V3 with a two-layer dense prefix and 300 experts in uint16),
checked against the payload as read without routereplay (`vllm_fixtures.choices`).
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import numpy as np
import pytest
from engine_payloads import npy_base64
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_fixtures import (
    MODELS,
    Choice,
    choices,
    layout,
    npy,
    offline_samples,
    request_outputs,
    server_case_ids,
    server_lines,
)

from routereplay import NO_ROUTE, Rollout, RouteReplayError, TraceError
from routereplay.engines import vllm
from routereplay.engines.responses import rollouts_from_saved

ROUTED = {"qwen3moe_mid_dense": (1, 2, 4), "dsv3_300e": (2, 3, 4)}


def decode(line: dict[str, Any], model: str) -> list[Rollout]:
    """A saved line through the public decoders: whole responses and streams."""
    response, request = line["response"], line["request"]
    if isinstance(response, list):
        return vllm.from_stream(response, layout(model), request=request)
    return vllm.from_response(response, layout(model), request=request)


def assert_rollout_is_the_payload(rollout: Rollout, choice: Choice, model: str) -> None:
    assert rollout.prompt_ids.tolist() == choice.prompt
    assert rollout.completion_ids.tolist() == choice.completion
    assert rollout.token_ids.tolist() == choice.prompt + choice.completion
    assert rollout.routes is not None
    trace = rollout.routes
    routed = ROUTED[model]
    assert trace.layers == routed  # global ids: never shifted by the dense layers
    raw, start = choice.routed_experts, choice.prompt_start
    tokens = len(choice.prompt) + len(choice.completion)
    assert raw.shape[0] == tokens - 1 - start
    dense = [i for i in range(raw.shape[1]) if i not in routed]
    assert (raw[:, dense] == 0).all()  # what vLLM sends for a dense layer
    ids = trace.expert_ids().numpy()
    assert ids.shape == (tokens, len(routed), raw.shape[2])
    for slot, layer in enumerate(routed):
        assert np.array_equal(ids[start : tokens - 1, slot], raw[:, layer])
    assert (ids[:start] == NO_ROUTE).all()  # before routed_experts_prompt_start
    assert (ids[-1] == NO_ROUTE).all()  # the final sampled token was never forwarded
    if choice.logprobs is None:
        assert rollout.logprobs is None
    else:
        assert rollout.logprobs is not None
        assert np.allclose(rollout.logprobs.numpy(), choice.logprobs)


@pytest.mark.parametrize(("model", "index"), server_case_ids())
def test_every_server_case_decodes_to_the_payloads_rows(model: str, index: int) -> None:
    line = server_lines(model)[index]
    rollouts = decode(line, model)
    expected = choices(line)
    assert len(rollouts) == len(expected)
    for rollout, choice in zip(rollouts, expected, strict=True):
        assert_rollout_is_the_payload(rollout, choice, model)


@pytest.mark.parametrize(("model", "index"), server_case_ids())
def test_a_saved_line_with_its_request_decodes_the_same(model: str, index: int) -> None:
    line = server_lines(model)[index]
    saved = rollouts_from_saved("vllm", line, layout(model))
    for ours, theirs in zip(saved, decode(line, model), strict=True):
        assert ours.routes is not None and theirs.routes is not None
        assert ours.routes.equal(theirs.routes) and ours.sequence_id == theirs.sequence_id


@pytest.mark.parametrize("model", MODELS)
def test_sequence_ids_name_the_request_and_choice(model: str) -> None:
    line = next(x for x in server_lines(model) if x["case"] == "completions_batch_n2")
    rollouts = decode(line, model)
    request_id = line["response"]["id"]
    assert [r.sequence_id for r in rollouts] == [f"{request_id}/{i}" for i in range(6)]
    # index = prompt * n + sample: choices 2k and 2k + 1 share prompt k.
    prompts = line["request"]["prompt"]
    assert [r.prompt_ids.tolist() for r in rollouts] == [p for p in prompts for _ in range(2)]


@pytest.mark.parametrize("model", MODELS)
def test_a_stopped_completion_keeps_its_stop_token(model: str) -> None:
    line = next(x for x in server_lines(model) if x["case"] == "completions_stop_token")
    (rollout,) = decode(line, model)
    assert rollout.finish_reason == "stop"
    assert rollout.completion_ids[-1].item() == line["response"]["choices"][0]["stop_reason"]


@pytest.mark.parametrize("model", MODELS)
def test_a_one_token_completion_has_routes_for_the_prompt_only(model: str) -> None:
    line = next(x for x in server_lines(model) if x["case"] == "completions_one_token")
    (rollout,) = decode(line, model)
    assert rollout.routes is not None and rollout.completion_len == 1
    routed = rollout.routes.routed_mask().all(-1)
    assert routed[:-1].all() and not routed[-1]


@pytest.mark.parametrize("model", MODELS)
def test_offline_request_outputs_give_one_rollout_per_sample(model: str) -> None:
    rollouts = vllm.from_request_outputs(request_outputs(model), layout(model))
    samples = offline_samples(model)
    assert [r.sequence_id for r in rollouts] == [f"{i}/0" for i in range(len(samples))]
    for rollout, sample in zip(rollouts, samples, strict=True):
        array = npy(sample["routed_experts"])
        assert list(array.shape) == sample["routed_experts_shape"]
        assert str(array.dtype) == sample["routed_experts_dtype"]
        choice = Choice(
            sample["prompt_token_ids"], sample["token_ids"], array, 0, sample["logprobs"]
        )
        assert_rollout_is_the_payload(rollout, choice, model)


# -- what users get wrong, and what an engine without capture sends ---------------------


def line_of(case: str, model: str = "dsv3_300e") -> dict[str, Any]:
    return copy.deepcopy(next(x for x in server_lines(model) if x["case"] == case))


def test_a_response_without_token_ids_says_to_ask_for_them() -> None:
    line = line_of("completions_single")
    del line["response"]["choices"][0]["prompt_token_ids"]
    with pytest.raises(
        TraceError, match=r"prompt_token_ids is missing: send return_token_ids: true"
    ):
        decode(line, "dsv3_300e")


def test_a_chat_response_without_prompt_ids_says_to_ask_for_them() -> None:
    line = line_of("chat_single")
    line["response"]["prompt_token_ids"] = None
    with pytest.raises(
        TraceError,
        match=r"prompt_token_ids is missing: send return_token_ids: true",
    ):
        decode(line, "dsv3_300e")


def test_a_server_without_capture_is_named_with_the_flag() -> None:
    line = line_of("chat_single")
    line["response"]["choices"][0]["routed_experts"] = None  # what such a server sends
    with pytest.raises(
        TraceError,
        match=r"choice 0 \(chatcmpl-.*\): the choice has no routed_experts: .*--enable-return-routed-experts.*no per-request switch",
    ):
        decode(line, "dsv3_300e")


def test_a_stream_chunk_that_is_not_the_final_one_says_where_routes_come() -> None:
    line = line_of("tito_generate_stream")
    first = json.loads(line["response"][0][len("data: ") :])
    with pytest.raises(
        TraceError, match=r"no finish_reason: it is a streamed chunk.*only with the final chunk"
    ):
        vllm.from_response(first, layout("dsv3_300e"), request=line["request"])


def test_a_stream_cut_before_its_final_chunk_is_refused() -> None:
    line = line_of("tito_generate_stream")
    with pytest.raises(TraceError, match=r"choice 0's stream ends without its final chunk"):
        vllm.from_stream(line["response"][:3], layout("dsv3_300e"), request=line["request"])


def test_a_generate_response_without_its_request_asks_for_it() -> None:
    line = line_of("tito_generate")
    with pytest.raises(
        TraceError, match=r"the prompt is the request's token_ids: pass the request too"
    ):
        vllm.from_response(line["response"], layout("dsv3_300e"))


def test_a_generate_response_with_prompt_ids_needs_no_request() -> None:
    line = line_of("tito_generate")
    expected = decode(line, "dsv3_300e")
    line["response"]["prompt_token_ids"] = line["request"]["token_ids"]  # return_token_ids
    (rollout,) = vllm.from_response(line["response"], layout("dsv3_300e"))
    assert rollout.routes is not None and expected[0].routes is not None
    assert rollout.routes.equal(expected[0].routes)


def test_a_saved_stream_without_its_request_asks_for_it() -> None:
    line = line_of("tito_generate_stream")
    with pytest.raises(TraceError, match=r"a saved stream needs its request"):
        rollouts_from_saved("vllm", line["response"], layout("dsv3_300e"))


def test_completions_streams_carry_no_routes_and_say_so() -> None:
    line = line_of("completions_single")
    chunk = {**line["response"], "choices": [{"index": 0, "text": " t1", "finish_reason": None}]}
    with pytest.raises(TraceError, match=r"a streamed completions response carries no routes"):
        vllm.from_stream([f"data: {json.dumps(chunk)}"], layout("dsv3_300e"), request={})


def test_prompt_start_without_the_request_is_a_row_count_error_naming_it() -> None:
    line = line_of("completions_prompt_start")
    with pytest.raises(
        TraceError, match=r"found 12 rows, 15 rows fewer .*routed_experts_prompt_start"
    ):
        vllm.from_response(line["response"], layout("dsv3_300e"))


def test_a_prompt_start_that_is_not_an_integer_is_refused() -> None:
    line = line_of("completions_prompt_start")
    line["request"]["routed_experts_prompt_start"] = "15"
    with pytest.raises(
        TraceError, match=r"routed_experts_prompt_start must be a non-negative integer, found '15'"
    ):
        decode(line, "dsv3_300e")


def test_npy_bytes_with_anything_after_the_array_are_refused() -> None:
    line = line_of("completions_single")
    choice = line["response"]["choices"][0]
    rows = choices(line)[0].routed_experts
    choice["routed_experts"] = base64.b64encode(
        base64.b64decode(npy_base64(rows)) + b"\x00\x01"
    ).decode()
    with pytest.raises(
        TraceError,
        match=r"\.npy header describes \[18, 5, 6\] uint16 ids \(1080 bytes\) but 1082 bytes follow it",
    ):
        decode(line, "dsv3_300e")


def test_logprobs_of_another_length_are_refused() -> None:
    line = line_of("chat_single")
    line["response"]["choices"][0]["logprobs"]["content"].pop()
    with pytest.raises(TraceError, match=r"logprobs hold 11 values for 12 sampled tokens"):
        decode(line, "dsv3_300e")


def test_a_body_from_no_vllm_endpoint_is_named() -> None:
    with pytest.raises(TraceError, match=r"is not a vLLM server response"):
        vllm.from_response({"choices": []}, layout("dsv3_300e"))


# -- vLLM 0.21.0's split schema: JSON lists, prompt rows at the response level ----------


def as_vllm_021(line: dict[str, Any]) -> dict[str, Any]:
    """A 0.32 completions response rewritten as vLLM 0.21.0 sent it: the prompt's rows
    once at the response level, each choice's completion rows, both JSON lists."""
    response = copy.deepcopy(line["response"])
    raws = choices(line)
    for choice, raw in zip(response["choices"], raws, strict=True):
        choice["routed_experts"] = raw.routed_experts[len(raw.prompt) :].tolist() or None
    first = raws[0]  # 0.21.0 sends the batch's first prompt's rows only
    response["prompt_routed_experts"] = first.routed_experts[: len(first.prompt)].tolist()
    return response


@pytest.mark.parametrize("case", ["completions_single", "completions_one_token", "chat_single"])
def test_vllm_021_split_lists_decode_like_the_whole_array(case: str) -> None:
    line = line_of(case)
    ours = vllm.from_response(as_vllm_021(line), layout("dsv3_300e"), request=line["request"])
    for split, whole in zip(ours, decode(line, "dsv3_300e"), strict=True):
        assert split.routes is not None and whole.routes is not None
        assert split.routes.equal(whole.routes)


def test_vllm_021_prompt_rows_belong_to_the_first_prompt_of_a_batch_only() -> None:
    line = line_of("completions_batch_n2")
    response = as_vllm_021(line)
    with pytest.raises(
        TraceError, match=r"choice 2 belongs to another prompt than choice 0.*first prompt only"
    ):
        vllm.from_response(response, layout("dsv3_300e"))


def test_vllm_021_prompt_rows_of_the_wrong_count_are_refused() -> None:
    line = line_of("completions_single")
    response = as_vllm_021(line)
    response["prompt_routed_experts"] = response["prompt_routed_experts"][1:]
    with pytest.raises(
        TraceError, match=r"prompt_routed_experts holds 2 rows, the prompt 3 tokens"
    ):
        vllm.from_response(response, layout("dsv3_300e"))


# -- anything a user can hand the decoders either works or says what is wrong ------------


def field_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the first few items of each list)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += field_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            found += field_paths(item, (*prefix, index))
    return found


JSON_VALUES = st.sampled_from([None, 0, -1, 1.5, "x", [], {}, [1, 2], [[1]], True, 10**30])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(server_case_ids()), st.data())
def test_a_damaged_real_line_decodes_or_raises_a_routereplay_error(
    case: tuple[str, int], data: st.DataObject
) -> None:
    model, index = case
    line = copy.deepcopy(server_lines(model)[index])
    path = data.draw(st.sampled_from(field_paths(line)[1:]))
    parent = line
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    try:
        rollouts_from_saved("vllm", line, layout(model), "line 1")
    except RouteReplayError as error:
        assert "line 1" in str(error)  # every error says where
