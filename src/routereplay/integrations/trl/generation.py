"""Rollouts of the routes recorded while TRL sampled with the model itself
(`use_vllm=False`): the prefill and every decode step are micro-batches of one
recording (see `forwards.generation_steps`), cut here into one trace per sequence.

The rows follow vLLM's convention, as `engines.hf.RecordingEngine` does: the prompt's
rows from the prefill, completion token t as forwarded at decode step t + 1, and -1
for the final token, which sampling never forwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from routereplay.errors import TraceError
from routereplay.recording import generated_sequence
from routereplay.rollout import Rollout
from routereplay.trace import RoutingTrace

SOURCE = "trl-generate"


def generated_rollouts(
    steps: Mapping[int, RoutingTrace],
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
) -> list[Rollout]:
    """One `Rollout` per sequence from the traces of a batched generation.

    steps: micro-batch -> trace; 0 the prefill `[batch, prompt width, layers, top_k]`
    (prompts left-padded), t >= 1 decode step t `[batch, 1, layers, top_k]`.
    prompt_ids, completion_ids: each sequence's tokens as TRL keeps them (the
    completion cut after its end-of-sequence token). The recorded token ids must be
    these, or the rollout is refused.
    """
    if 0 not in steps:
        raise TraceError("No prefill was recorded: the model did not generate in the context.")
    prefill = steps[0]
    batch, width = prefill.token_shape
    if len(prompt_ids) != batch or len(completion_ids) != batch:
        raise TraceError(
            f"The generation recorded {batch} sequences; {len(prompt_ids)} prompts and "
            f"{len(completion_ids)} completions were given."
        )
    rollouts = []
    for row in range(batch):
        prompt_len, completion_len = len(prompt_ids[row]), len(completion_ids[row])
        forwarded = max(completion_len - 1, 0)
        if prompt_len > width or forwarded >= len(steps):
            raise TraceError(
                f"Sequence {row}: {prompt_len} prompt and {completion_len} completion "
                f"tokens, but the generation recorded a {width}-token prefill and "
                f"{len(steps) - 1} decode steps."
            )
        rollouts.append(
            Rollout(
                prompt_ids=torch.tensor(prompt_ids[row], dtype=torch.long),
                completion_ids=torch.tensor(completion_ids[row], dtype=torch.long),
                routes=generated_sequence(steps, row, width - prompt_len, completion_len),
                sequence_id=f"{SOURCE}/{row}",
            )
        )
    return rollouts
