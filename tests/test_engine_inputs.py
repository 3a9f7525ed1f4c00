"""What users hand the engine decoders by mistake: each is a `RouteReplayError` that
says what was expected and what was found, never a raw Python error or a guess."""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from engine_payloads import DENSE_PREFIX, all_layers, routed_ids
from vllm_fixtures import layout, request_outputs, server_lines

from routereplay import Rollout, RouteReplayError, RoutingTrace, TraceError
from routereplay.engines import sglang, vllm
from routereplay.engines.responses import rollouts_from_saved
from routereplay.store import TraceFile, TraceWriter

MODEL = "qwen3moe_mid_dense"


def saved(case: str, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    line = copy.deepcopy(next(x for x in server_lines(MODEL) if x["case"] == case))
    change(line)
    return line


def choice0(line: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = line["response"]["choices"][0]
    return choice


def npy_header_only(shape: tuple[int, ...], dtype: str = "u1") -> str:
    buffer = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return base64.b64encode(buffer.getvalue()).decode()


def offline_output(**changes: Any) -> list[SimpleNamespace]:
    (output, *_) = request_outputs(MODEL)
    for name, value in changes.items():
        target = output if name == "prompt_token_ids" else output.outputs[0]
        setattr(target, name, value)
    return [output]


def sglang_output() -> dict[str, Any]:
    rows = all_layers(DENSE_PREFIX, routed_ids(DENSE_PREFIX, 6), dtype=np.int32)
    meta_info = {"id": "r", "routed_experts": base64.b64encode(rows.tobytes()).decode()}
    return {"output_ids": [7, 8, 9], "meta_info": meta_info}


CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "a .npy header claiming 2**45 ids": (
        lambda: rollouts_from_saved(
            "vllm",
            saved(
                "completions_single",
                lambda x: choice0(x).update(routed_experts=npy_header_only((2**45,))),
            ),
            layout(MODEL),
        ),
        r"header describes \[35184372088832\] uint8 ids .* but 0 bytes follow it",
    ),
    "chat logprobs.content that is a number": (
        lambda: rollouts_from_saved(
            "vllm",
            saved("chat_single", lambda x: choice0(x).update(logprobs={"content": 5})),
            layout(MODEL),
        ),
        r"logprobs\.content must be a list of \{logprob, \.\.\.\} objects",
    ),
    "log-probs that are booleans": (
        lambda: rollouts_from_saved(
            "vllm",
            saved(
                "chat_single",
                lambda x: choice0(x).update(logprobs={"content": [{"logprob": True}] * 12}),
            ),
            layout(MODEL),
        ),
        r"log-probs must be a list of numbers",
    ),
    "a request that is not an object": (
        lambda: vllm.from_response(server_lines(MODEL)[0]["response"], layout(MODEL), request=[1]),  # type: ignore[arg-type]
        r"request: expected a JSON object, found list",
    ),
    "a stream that is a number": (
        lambda: vllm.from_stream(5, layout(MODEL), request={}),  # type: ignore[arg-type]
        r"a stream is its list of server-sent-event lines",
    ),
    "a saved list that is not stream lines": (
        lambda: rollouts_from_saved("vllm", [1, 2], layout(MODEL)),
        r"a stream's list of 'data: \.\.\.' lines; found a list of \['int'\]",
    ),
    "a prompt start that is not an integer": (
        lambda: rollouts_from_saved(
            "vllm",
            saved(
                "completions_prompt_start",
                lambda x: x["request"].update(routed_experts_prompt_start=1.5),
            ),
            layout(MODEL),
        ),
        r"routed_experts_prompt_start must be a non-negative integer, found 1\.5",
    ),
    "an offline token id beyond int64": (
        lambda: vllm.from_request_outputs(
            offline_output(prompt_token_ids=[2**70, 1]), layout(MODEL)
        ),
        r"prompt_token_ids must be a list of non-negative integer token ids|beyond int64",
    ),
    "an offline token id that is a float": (
        lambda: vllm.from_request_outputs(offline_output(prompt_token_ids=[1.7, 1]), layout(MODEL)),
        r"prompt_token_ids must be a list of non-negative integer token ids, found 1\.7",
    ),
    "an offline token id that is a string": (
        lambda: vllm.from_request_outputs(offline_output(prompt_token_ids="12"), layout(MODEL)),
        r"prompt_token_ids must be a list of token ids, found str",
    ),
    "offline logprobs that are a number": (
        lambda: vllm.from_request_outputs(offline_output(logprobs=5), layout(MODEL)),
        r"logprobs must hold one step per sampled token \(24\), found int",
    ),
    "an offline prompt start that is a string": (
        lambda: vllm.from_request_outputs(offline_output(), layout(MODEL), prompt_start="1"),  # type: ignore[arg-type]
        r"prompt_start must be a non-negative integer, found '1'",
    ),
    "outputs that are not a list": (
        lambda: vllm.from_request_outputs(5, layout(MODEL)),  # type: ignore[arg-type]
        r"takes the list LLM\.generate returned, found int",
    ),
    "vLLM 0.21 lists of floats": (
        lambda: vllm.from_openai_choice(
            {"routed_experts": [[[4.9, 1.0, 2.0, 3.0]] * 5]},
            layout(MODEL),
            prompt_len=2,
            completion_len=2,
            prompt_routed_experts=[[[0, 1, 2, 3]] * 5] * 2,
        ),
        r"routed_experts is not a \[rows, layers, top_k\] list of integers",
    ),
    "SGLang input_ids that are a number": (
        lambda: sglang.from_response(sglang_output(), DENSE_PREFIX, request={"input_ids": 5}),
        r"input_ids must be a list of token ids or a list of such lists, found 5",
    ),
    "SGLang input_ids that are an object": (
        lambda: sglang.from_response(
            sglang_output(), DENSE_PREFIX, request={"input_ids": {"a": 1}}
        ),
        r"input_ids must be a list of token ids or a list of such lists",
    ),
    "SGLang sglext that is not an object": (
        lambda: sglang.from_openai_response(
            {"id": "c", "choices": [{"meta_info": {}}], "sglext": [1]}, DENSE_PREFIX
        ),
        r"sglext: expected a JSON object, found list",
    ),
    "SGLang per-prompt start lengths too few": (
        lambda: sglang.from_response(
            [sglang_output(), sglang_output()],
            DENSE_PREFIX,
            request={"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "routed_experts_start_len": [0]},
        ),
        r"routed_experts_start_len holds 1 values, none for prompt 1",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_engine_input_is_a_routereplay_error_saying_what_was_found(case: str) -> None:
    call, message = CASES[case]
    with pytest.raises(RouteReplayError, match=message):
        call()


def test_per_prompt_start_lengths_follow_the_prompt_major_order() -> None:
    # Two prompts, n = 2, starts [2, 3]: outputs 0, 1 start at 2; outputs 2, 3 at 3.
    outputs = []
    for start in (2, 2, 3, 3):
        rows = all_layers(DENSE_PREFIX, routed_ids(DENSE_PREFIX, 4 + 3 - 1 - start), dtype=np.int32)
        encoded = base64.b64encode(rows.tobytes()).decode()
        outputs.append({"output_ids": [7, 8, 9], "meta_info": {"routed_experts": encoded}})
    request = {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "routed_experts_start_len": [2, 3]}
    rollouts = sglang.from_response(outputs, DENSE_PREFIX, request=request)
    starts = [int((~r.routes.routed_mask().all(-1)).long().argmin()) for r in rollouts if r.routes]
    assert starts == [2, 2, 3, 3]


# -- rollouts and trace files ----------------------------------------------------------


def trace(tokens: int) -> RoutingTrace:
    ids = torch.tensor([[[0, 1]] * 2] * tokens)
    return RoutingTrace(ids, (1, 2), 8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sequence_id": 7}, r"sequence_id must be a string, found 7"),
        ({"routes": 5}, r"routes must be a RoutingTrace or None, found int"),
        ({"logprobs": [0.1]}, r"logprobs must be a float tensor \[completion_len\], found list"),
        ({"prompt_ids": torch.tensor([True])}, r"prompt_ids must be a 1-D integer tensor"),
    ],
)
def test_a_rollout_of_the_wrong_parts_is_refused(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "prompt_ids": torch.tensor([1, 2]),
        "completion_ids": torch.tensor([3]),
        "routes": trace(3),
    }
    with pytest.raises(TraceError, match=message):
        Rollout(**(fields | changes))


def test_a_sequence_id_that_is_not_unicode_text_is_refused_before_close(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r.rr", DENSE_PREFIX.__class__(4, (1, 2), 8, 2)) as writer:
        with pytest.raises(TraceError, match=r"is not valid Unicode text"):
            writer.append(trace(2), sequence_id="\ud800")
        writer.discard()


def test_a_numpy_prompt_length_is_an_integer(tmp_path: Path) -> None:
    path = tmp_path / "r.rr"
    with TraceWriter(path, DENSE_PREFIX.__class__(4, (1, 2), 8, 2)) as writer:
        writer.append(trace(3), prompt_len=np.int64(2))  # type: ignore[arg-type]
    with TraceFile(path) as traces:
        assert traces.prompt_len(0) == 2
        with pytest.raises(RouteReplayError, match=r"a sequence index is an integer, found '0'"):
            traces.prompt_len("0")  # type: ignore[arg-type]
        with pytest.raises(RouteReplayError, match=r"holds no sequence ids to look"):
            traces.index_of("a")


def test_a_rollout_takes_routes_whose_unknown_tokens_are_minus_one() -> None:
    routes = trace(3).with_tokens(torch.tensor([1, 2, -1]))
    rollout = Rollout(torch.tensor([1, 2]), torch.tensor([3]), routes)
    assert rollout.routes is not None
    with pytest.raises(TraceError, match=r"recorded for other token ids"):
        Rollout(torch.tensor([1, 9]), torch.tensor([3]), routes)
