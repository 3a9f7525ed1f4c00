"""SGLang responses, every endpoint, built to the format SGLang 0.5.23 sends (there is
no real SGLang here; see FACTS.md): `/generate` single and batched, the OpenAI
endpoints' response-level `sglext`, and chat with `return_meta_info`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine_payloads import DENSE_PREFIX, all_layers, expected_experts, routed_ids, sglang_meta_info

from routereplay import Rollout, TraceError
from routereplay.engines import sglang
from routereplay.engines.responses import rollouts_from_saved

LAYOUT = DENSE_PREFIX  # layers 0, 1 dense; 2..5 route, 16 experts, top-4


class Sample:
    """One sequence's true routes and ids, and the meta_info SGLang sends for it."""

    def __init__(self, prompt_len: int, completion_len: int, seed: int, start: int = 0) -> None:
        self.prompt = list(range(10 + seed, 10 + seed + prompt_len))
        self.completion = list(range(100 + seed, 100 + seed + completion_len))
        self.start = start
        self.routed = routed_ids(LAYOUT, prompt_len + completion_len - 1 - start, seed=seed)
        rows = all_layers(LAYOUT, self.routed, dtype=np.int32)  # dense layers as zeros
        self.meta_info = sglang_meta_info(
            rows,
            id=f"req-{seed}",
            finish_reason={"type": "length", "length": completion_len},
            prompt_tokens=prompt_len,
            completion_tokens=completion_len,
        )

    def generate_output(self, **extra: Any) -> dict[str, Any]:
        return {"text": "...", "output_ids": self.completion, "meta_info": self.meta_info, **extra}

    def check(self, rollout: Rollout) -> None:
        assert rollout.token_ids.tolist() == self.prompt + self.completion
        assert rollout.prompt_len == len(self.prompt)
        assert rollout.routes is not None and rollout.routes.layers == (2, 3, 4, 5)
        tokens = len(self.prompt) + len(self.completion)
        expected = expected_experts(LAYOUT, self.routed, tokens, self.start)
        assert np.array_equal(rollout.routes.expert_ids().numpy(), expected)


def openai_response(samples: list[Sample], *, chat: bool, meta_info: bool) -> dict[str, Any]:
    """What /v1/completions or /v1/chat/completions returns with return_token_ids:
    routes of the first sample at the response level, or per choice with meta_info."""
    choices = []
    for index, sample in enumerate(samples):
        choice: dict[str, Any] = {
            "index": index,
            "finish_reason": "length",
            "prompt_token_ids": sample.prompt,
        }
        if chat:
            choice |= {"message": {"role": "assistant"}, "response_token_ids": sample.completion}
        else:
            choice |= {"text": "...", "token_ids": sample.completion}
        if meta_info:
            choice["meta_info"] = sample.meta_info
        choices.append(choice)
    response: dict[str, Any] = {
        "id": "cmpl-7",
        "object": "chat.completion" if chat else "text_completion",
        "choices": choices,
    }
    if not meta_info:
        response["sglext"] = {"routed_experts": samples[0].meta_info["routed_experts"]}
    return response


def test_a_generate_response_with_its_prompt_ids_decodes() -> None:
    sample = Sample(5, 3, seed=1)
    (rollout,) = sglang.from_response(
        sample.generate_output(prompt_token_ids=sample.prompt), LAYOUT
    )
    sample.check(rollout)
    assert rollout.sequence_id == "req-1" and rollout.finish_reason == "length"


def test_a_generate_response_takes_its_prompt_from_the_request() -> None:
    sample = Sample(4, 2, seed=2)
    request = {"input_ids": sample.prompt, "return_routed_experts": True}
    (rollout,) = sglang.from_response(sample.generate_output(), LAYOUT, request=request)
    sample.check(rollout)


def test_a_generate_response_without_prompt_ids_says_how_to_get_them() -> None:
    with pytest.raises(
        TraceError, match=r"prompt_token_ids is missing: send return_prompt_token_ids: true"
    ):
        sglang.from_response(Sample(4, 2, seed=2).generate_output(), LAYOUT)


def test_a_batched_generate_call_with_n_samples_is_prompt_major() -> None:
    # Two prompts, n = 2: outputs are prompt 0's two samples, then prompt 1's.
    first, second = Sample(4, 3, seed=3), Sample(6, 2, seed=4)
    samples = [first, Sample(4, 3, seed=5), second, Sample(6, 2, seed=6)]
    samples[1].prompt, samples[3].prompt = first.prompt, second.prompt
    request = {"input_ids": [first.prompt, second.prompt], "sampling_params": {"n": 2}}
    rollouts = sglang.from_response([s.generate_output() for s in samples], LAYOUT, request=request)
    for sample, rollout in zip(samples, rollouts, strict=True):
        sample.check(rollout)


def test_rows_from_routed_experts_start_len_come_from_the_request() -> None:
    sample = Sample(6, 3, seed=7, start=4)
    request = {"input_ids": sample.prompt, "routed_experts_start_len": 4}
    (rollout,) = sglang.from_response(sample.generate_output(), LAYOUT, request=request)
    sample.check(rollout)


def test_generate_logprobs_are_kept() -> None:
    sample = Sample(4, 2, seed=8)
    sample.meta_info["output_token_logprobs"] = [[-0.5, 100, None], [-1.5, 101, None]]
    output = sample.generate_output(prompt_token_ids=sample.prompt)
    (rollout,) = sglang.from_response(output, LAYOUT)
    assert rollout.logprobs is not None and rollout.logprobs.tolist() == [-0.5, -1.5]


def test_a_generate_response_without_routes_says_how_to_capture() -> None:
    sample = Sample(4, 2, seed=9)
    del sample.meta_info["routed_experts"]
    with pytest.raises(
        TraceError, match=r"--enable-return-routed-experts and send return_routed_experts: true"
    ):
        sglang.from_response(sample.generate_output(prompt_token_ids=sample.prompt), LAYOUT)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_an_openai_response_takes_its_routes_from_sglext(chat: bool) -> None:
    sample = Sample(5, 4, seed=10)
    (rollout,) = sglang.from_response(openai_response([sample], chat=chat, meta_info=False), LAYOUT)
    sample.check(rollout)
    assert rollout.sequence_id == "cmpl-7/0"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n_samples_with_routes_for_the_first_only_are_refused(chat: bool) -> None:
    samples = [Sample(5, 4, seed=11), Sample(5, 3, seed=12), Sample(5, 2, seed=13)]
    with pytest.raises(
        TraceError,
        match=r"has 3 choices but SGLang's OpenAI endpoints return the routes of the first sample only \(sglext.routed_experts\): samples \[1, 2\] have none. Send one request per sample \(n: 1\), or on /v1/chat/completions send return_meta_info: true",
    ):
        sglang.from_response(openai_response(samples, chat=chat, meta_info=False), LAYOUT)


def test_chat_with_return_meta_info_has_routes_per_choice() -> None:
    samples = [Sample(5, 4, seed=14), Sample(5, 3, seed=15)]
    samples[1].prompt = samples[0].prompt
    rollouts = sglang.from_response(openai_response(samples, chat=True, meta_info=True), LAYOUT)
    for sample, rollout in zip(samples, rollouts, strict=True):
        sample.check(rollout)


def test_an_openai_response_without_token_ids_says_to_ask_for_them() -> None:
    response = openai_response([Sample(5, 4, seed=16)], chat=False, meta_info=False)
    del response["choices"][0]["prompt_token_ids"]
    with pytest.raises(
        TraceError, match=r"prompt_token_ids is missing: send return_token_ids: true"
    ):
        sglang.from_response(response, LAYOUT)


def test_a_saved_line_with_its_request_fills_in_the_prompt() -> None:
    sample = Sample(4, 3, seed=17, start=2)
    saved = {
        "request": {"input_ids": sample.prompt, "routed_experts_start_len": 2},
        "response": sample.generate_output(),
    }
    (rollout,) = rollouts_from_saved("sglang", saved, LAYOUT)
    sample.check(rollout)
