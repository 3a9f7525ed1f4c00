"""vLLM's offline outputs: `LLM.generate(...)`'s `RequestOutput`s to `Rollout`s.

Duck-typed: vLLM is not a dependency. A `RequestOutput` has `request_id`,
`prompt_token_ids` and `outputs`, one `CompletionOutput` per sample with `index`,
`token_ids`, `routed_experts` (a numpy array, or None without capture), `logprobs`
(per sampled token a dict token id -> `Logprob`, or None) and `finish_reason`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from routereplay.engines.vllm.arrays import from_completion
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout


def from_request_output(output: Any, layout: MoELayout, *, prompt_start: int = 0) -> list[Rollout]:
    """One `Rollout` per sample of one `RequestOutput`, in `outputs` order.

    `prompt_start` is the request's `SamplingParams.routed_experts_prompt_start`.
    """
    request_id = getattr(output, "request_id", None)
    where = "vllm RequestOutput" + ("" if request_id is None else f" {request_id!r}")
    prompt = _ids(getattr(output, "prompt_token_ids", None), "prompt_token_ids", where)
    samples = getattr(output, "outputs", None)
    if not isinstance(samples, list | tuple) or not samples:
        raise TraceError(
            f"{where}: a RequestOutput has a list of CompletionOutputs in .outputs, found "
            f"{type(samples).__name__}. Pass what LLM.generate returned."
        )
    rollouts = []
    for position, sample in enumerate(samples):
        index = getattr(sample, "index", position)
        sequence_id = f"{request_id}/{index}" if request_id is not None else None
        here = f"{where}, output {index}"
        completion = _ids(getattr(sample, "token_ids", None), "token_ids", here)
        routes = from_completion(
            getattr(sample, "routed_experts", None),
            layout,
            prompt_len=len(prompt),
            completion_len=len(completion),
            prompt_start=prompt_start,
            sequence=here,
        )
        rollouts.append(
            Rollout(
                prompt_ids=prompt,
                completion_ids=completion,
                routes=routes,
                logprobs=_sampled_logprobs(getattr(sample, "logprobs", None), completion, here),
                finish_reason=getattr(sample, "finish_reason", None),
                sequence_id=sequence_id,
            )
        )
    return rollouts


def from_request_outputs(
    outputs: Iterable[Any], layout: MoELayout, *, prompt_start: int = 0
) -> list[Rollout]:
    """Every sample of every `RequestOutput`, in order: what `LLM.generate` returned."""
    return [
        rollout
        for output in outputs
        for rollout in from_request_output(output, layout, prompt_start=prompt_start)
    ]


def _ids(value: Any, field: str, where: str) -> torch.Tensor:
    try:
        ids = [int(i) for i in value]
    except (TypeError, ValueError):
        raise TraceError(
            f"{where}: {field} must be a sequence of token ids, found {type(value).__name__}."
        ) from None
    return torch.tensor(ids, dtype=torch.int64)


def _sampled_logprobs(logprobs: Any, completion: torch.Tensor, where: str) -> torch.Tensor | None:
    """The log-prob of each sampled token, from `CompletionOutput.logprobs` (requested
    with `SamplingParams(logprobs=0)` or more)."""
    if logprobs is None:
        return None
    if len(logprobs) != len(completion):
        raise TraceError(
            f"{where}: logprobs hold {len(logprobs)} steps for {len(completion)} sampled tokens."
        )
    values = []
    for step, (token, candidates) in enumerate(zip(completion.tolist(), logprobs, strict=True)):
        entry = candidates.get(token) if hasattr(candidates, "get") else None
        if entry is None:
            raise TraceError(
                f"{where}: logprobs at step {step} do not hold the sampled token {token}."
            )
        values.append(float(getattr(entry, "logprob", entry)))
    return torch.tensor(values, dtype=torch.float32)
