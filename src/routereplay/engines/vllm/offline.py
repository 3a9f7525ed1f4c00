"""vLLM's offline outputs: `LLM.generate(...)`'s `RequestOutput`s to `Rollout`s, and one
offline completion saved as JSON.

Duck-typed: vLLM is not a dependency. A `RequestOutput` has `request_id`,
`prompt_token_ids` and `outputs`, one `CompletionOutput` per sample with `index`,
`token_ids`, `routed_experts` (a numpy array, or None without capture), `logprobs`
(per sampled token a dict token id -> `Logprob`, or None) and `finish_reason`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from routereplay.engines.payload import choice_id, rollout, start_position, token_ids
from routereplay.engines.payload import logprobs as payload_logprobs
from routereplay.engines.vllm.arrays import from_completion, from_openai_choice
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

_IDS = "pass what LLM.generate returned"


def from_request_output(output: Any, layout: MoELayout, *, prompt_start: int = 0) -> list[Rollout]:
    """One `Rollout` per sample of one `RequestOutput`, in `outputs` order.

    `prompt_start` is the request's `SamplingParams.routed_experts_prompt_start`.
    """
    request_id = getattr(output, "request_id", None)
    where = "RequestOutput" + ("" if request_id is None else f" {request_id!r}")
    start = start_position(prompt_start, "prompt_start", where)
    prompt = token_ids(getattr(output, "prompt_token_ids", None), "prompt_token_ids", where, _IDS)
    samples = getattr(output, "outputs", None)
    if not isinstance(samples, list | tuple) or not samples:
        raise TraceError(
            f"{where}: a RequestOutput has a list of CompletionOutputs in .outputs, found "
            f"{type(samples).__name__}. Pass what LLM.generate returned."
        )
    rollouts = []
    for position, sample in enumerate(samples):
        index = getattr(sample, "index", position)
        here = f"{where}, output {index}"
        completion = token_ids(getattr(sample, "token_ids", None), "token_ids", here, _IDS)
        routes = from_completion(
            getattr(sample, "routed_experts", None),
            layout,
            prompt_len=len(prompt),
            completion_len=len(completion),
            prompt_start=start,
            sequence=here,
        )
        rollouts.append(
            rollout(
                here,
                prompt_ids=prompt,
                completion_ids=completion,
                routes=routes,
                logprobs=_sampled_logprobs(getattr(sample, "logprobs", None), completion, here),
                finish_reason=getattr(sample, "finish_reason", None),
                sequence_id=choice_id(request_id, index),
            )
        )
    return rollouts


def from_request_outputs(
    outputs: Iterable[Any], layout: MoELayout, *, prompt_start: int = 0
) -> list[Rollout]:
    """Every sample of every `RequestOutput`, in order: what `LLM.generate` returned."""
    if not isinstance(outputs, Iterable):
        raise TraceError(
            f"vllm: from_request_outputs takes the list LLM.generate returned, found "
            f"{type(outputs).__name__}."
        )
    return [
        rollout
        for output in outputs
        for rollout in from_request_output(output, layout, prompt_start=prompt_start)
    ]


def from_saved_completion(
    saved: Mapping[str, Any], layout: MoELayout, *, prompt_start: int = 0, where: str
) -> Rollout:
    """One offline completion saved as JSON: `prompt_token_ids`, `token_ids`,
    `routed_experts` (base64 `.npy`), optionally `logprobs` (one per sampled token),
    `finish_reason` and `id`."""
    hint = "save the completion with its prompt_token_ids and token_ids"
    prompt = token_ids(saved.get("prompt_token_ids"), "prompt_token_ids", where, hint)
    completion = token_ids(saved.get("token_ids"), "token_ids", where, hint)
    routes = from_openai_choice(
        saved,
        layout,
        prompt_len=len(prompt),
        completion_len=len(completion),
        prompt_start=prompt_start,
        sequence=where,
    )
    return rollout(
        where,
        prompt_ids=prompt,
        completion_ids=completion,
        routes=routes,
        logprobs=payload_logprobs(saved.get("logprobs"), len(completion), where),
        finish_reason=saved.get("finish_reason"),
        sequence_id=saved.get("id"),  # Rollout checks it is a string
    )


def _sampled_logprobs(logprobs: Any, completion: torch.Tensor, where: str) -> torch.Tensor | None:
    """The log-prob of each sampled token, from `CompletionOutput.logprobs` (requested
    with `SamplingParams(logprobs=0)` or more)."""
    if logprobs is None:
        return None
    if not isinstance(logprobs, list | tuple) or len(logprobs) != len(completion):
        found = len(logprobs) if isinstance(logprobs, list | tuple) else type(logprobs).__name__
        raise TraceError(
            f"{where}: logprobs must hold one step per sampled token ({len(completion)}), "
            f"found {found}."
        )
    values = []
    for step, (token, candidates) in enumerate(zip(completion.tolist(), logprobs, strict=True)):
        entry = candidates.get(token) if isinstance(candidates, Mapping) else None
        if entry is None:
            raise TraceError(
                f"{where}: logprobs at step {step} do not hold the sampled token {token}."
            )
        values.append(getattr(entry, "logprob", entry))
    return payload_logprobs(values, len(completion), where)
