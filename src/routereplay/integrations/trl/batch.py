"""Routes laid out the way TRL's GRPOTrainer lays out its batch, and carried inside it.

TRL builds `input_ids [batch, prompt + completion]` from a left-padded prompt block
`[batch, prompt]` and a right-padded completion block `[batch, completion]`
(`logits_to_keep` = the completion width), and an attention mask that may zero more
than padding (`mask_truncated_completions`). Routes follow the same layout, -1 where
the mask is 0.

In the generation batch the routes travel as two batch-first tensors, so that TRL's
own shuffle and split of the batch carry them with their rows:

    routed_experts  [batch, seq, routed layers, top_k]  compact ids, -1 for no route
    routed_tokens   [batch, seq]                        int32 token ids, -1 for padding
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from routereplay.align import pad_traces
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout
from routereplay.trace import RoutingTrace

EXPERTS_KEY = "routed_experts"
TOKENS_KEY = "routed_tokens"


def lay_out_rollouts(
    rollouts: Sequence[Rollout],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
) -> RoutingTrace:
    """Each rollout's routes at its tokens' places in TRL's batch: `[batch, seq,
    layers, top_k]`, the prompt right-aligned in the first `seq - completion_width`
    columns, the completion left-aligned after them, -1 elsewhere and wherever
    `attention_mask [batch, seq]` is 0. The trace keeps the rollouts' token ids, which
    replay checks against `input_ids` in every forward."""
    batch, seq = input_ids.shape
    prompt_width = seq - completion_width
    if len(rollouts) != batch:
        raise TraceError(
            f"The batch has {batch} sequences but {len(rollouts)} rollouts came with it: "
            "one rollout per completion, in TRL's order."
        )
    placed = torch.zeros((batch, seq), dtype=torch.bool)
    for row, rollout in enumerate(rollouts):
        if rollout.routes is None:
            raise TraceError(f"Rollout {row} ({rollout.sequence_id}) has no routes.")
        if rollout.prompt_len > prompt_width or rollout.completion_len > completion_width:
            raise TraceError(
                f"Sequence {row}: the rollout has {rollout.prompt_len} prompt and "
                f"{rollout.completion_len} completion tokens; TRL's batch has room for "
                f"{prompt_width} and {completion_width}: the rollout belongs to another batch."
            )
        placed[row, prompt_width - rollout.prompt_len : prompt_width] = True
        placed[row, prompt_width : prompt_width + rollout.completion_len] = True
    routes = [rollout.routes for rollout in rollouts if rollout.routes is not None]
    laid_out = pad_traces(routes, mask=placed)
    return laid_out.without_tokens(attention_mask.cpu() == 0)


def chunks(trace: RoutingTrace, size: int) -> dict[int, RoutingTrace]:
    """Row offset -> rows `[offset, offset + size)` of a `[batch, ...]` trace: the pieces
    TRL's log-prob pass runs one forward each (it chunks the batch in `size` rows)."""
    batch = trace.token_shape[0]
    return {
        start: trace.select_tokens(slice(start, start + size)) for start in range(0, batch, size)
    }


def join_chunks(pieces: Mapping[int, RoutingTrace]) -> RoutingTrace:
    """Traces of consecutive row chunks (keyed by row offset) -> one `[batch, ...]`."""
    ordered = [pieces[start] for start in sorted(pieces)]
    first = ordered[0]
    experts = torch.cat([piece.experts for piece in ordered])
    tokens = None
    if all(piece.tokens is not None for piece in ordered):
        tokens = torch.cat([piece.tokens for piece in ordered if piece.tokens is not None])
    # Rows of valid traces, only stacked: valid by construction.
    return first.derive(experts, first.layers, tokens)


def to_batch_fields(trace: RoutingTrace) -> dict[str, torch.Tensor]:
    """The batch-first tensors TRL's generation batch carries (see the module doc)."""
    if trace.tokens is None:
        raise TraceError("Routes carried in TRL's batch must know their token ids.")
    return {EXPERTS_KEY: trace.experts, TOKENS_KEY: trace.tokens}


def from_batch_fields(
    inputs: Mapping[str, Any], layout: MoELayout, source: str
) -> RoutingTrace | None:
    """The routes of one training batch (after TRL's shuffle and split), or None when
    the batch carries none."""
    experts = inputs.get(EXPERTS_KEY)
    if experts is None:
        return None
    tokens = inputs.get(TOKENS_KEY)
    if not isinstance(experts, torch.Tensor) or not isinstance(tokens, torch.Tensor):
        raise TraceError(
            f"The batch's {EXPERTS_KEY} and {TOKENS_KEY} must be tensors; found "
            f"{type(experts).__name__} and {type(tokens).__name__}."
        )
    return RoutingTrace(experts, layout.moe_layers, layout.num_experts, source, tokens)
