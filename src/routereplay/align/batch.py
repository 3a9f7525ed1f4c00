"""A whole THD training batch in one plan: micro-batches, packing, CP and SP ranks.

`plan_thd` chains the steps a Megatron-style trainer takes (verl, slime): pick each
micro-batch's sequences, pack them THD with every sequence padded to a multiple, split
each sequence over the CP ranks, then split each CP rank's tokens over the TP ranks
(sequence parallelism). The result holds, for every (micro-batch, cp rank, tp rank), one
plan straight from the batch's tokens to what that rank's routers see.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from routereplay.align.gather import SequenceTraces
from routereplay.align.layouts import check_cp_chunks, pack_plan, padded_lengths, rank_plan
from routereplay.align.micro_batches import MicroBatches, fixed_micro_batches
from routereplay.align.plan import (
    Lengths,
    TokenPlan,
    as_lengths,
    check_size,
    restore,
    restore_trace,
    starts,
)
from routereplay.align.source import SequenceSource, SourceRanges
from routereplay.errors import LayoutError
from routereplay.trace import RoutingTrace


class Piece(NamedTuple):
    """One rank's share of one micro-batch."""

    micro_batch: int
    cp_rank: int
    tp_rank: int


@dataclass(frozen=True, eq=False)
class ThdPlan:
    """micro_batches: which batch sequences each micro-batch holds, in layout order.
    lengths:       int64 `[sequences]`, the batch's sequence lengths (batch order).
    multiple:      what every sequence was padded to a multiple of.
    pieces:        per `Piece`, the plan from the batch's tokens `[sum(lengths)]` to that
                   rank's tokens `[packed tokens / (cp_size * sp_size)]`."""

    micro_batches: MicroBatches
    lengths: torch.Tensor
    multiple: int
    pieces: dict[Piece, TokenPlan]

    @functools.cached_property
    def packed(self) -> tuple[TokenPlan, ...]:
        """Per micro-batch, its THD packing over its own sequences before any CP/SP split:
        `cu_seqlens` (int32 padded boundaries, Megatron's `cu_seqlens_q_padded`) and
        `valid_lengths` (for `cu_seqlens_q`)."""
        return tuple(pack_plan(self.lengths[g], self.multiple) for g in self.micro_batches.groups)

    def apply(
        self, values: torch.Tensor, pad: int | float | bool = -1
    ) -> dict[Piece, torch.Tensor]:
        """Per-token `values [sum(lengths), *rest]` -> each piece's `[tokens, *rest]`."""
        return {piece: plan.apply(values, pad) for piece, plan in self.pieces.items()}

    def apply_trace(
        self, trace: RoutingTrace, layers: Iterable[int] | None = None
    ) -> dict[Piece, RoutingTrace]:
        """The batch's trace `[sum(lengths), layers, top_k]` -> each piece's trace, over
        `layers` only when given (see `TokenPlan.apply_trace`)."""
        return {piece: plan.apply_trace(trace, layers) for piece, plan in self.pieces.items()}

    def rank_routes(
        self,
        trace: RoutingTrace | Sequence[RoutingTrace] | SequenceSource,
        cp_rank: int = 0,
        tp_rank: int = 0,
        layers: Iterable[int] | None = None,
    ) -> dict[int, RoutingTrace]:
        """What one trainer rank replays: micro-batch -> its piece of `trace`, the mapping
        `ReplayController.replay` takes.

        `trace` is the batch's `[sum(lengths), layers, top_k]`; or, as engines hand them
        over, one trace per sequence in batch order, which are gathered from directly
        (no join of the batch first); or a `SequenceSource` such as a `TraceFile`, from
        which only the token ranges this rank replays are read. Only this rank's
        tokens and, with `layers` (its pipeline stages' routed layers,
        `MoELayout.rank_moe_layers`), only those layers' ids are moved: a rank of a
        CP x PP job copies 1 / (cp_size * pp_size) of the batch's ids.
        """
        ranks = {(piece.cp_rank, piece.tp_rank) for piece in self.pieces}
        if (cp_rank, tp_rank) not in ranks:
            cp_size = 1 + max(cp for cp, _ in ranks)
            sp_size = 1 + max(tp for _, tp in ranks)
            raise LayoutError(
                f"(cp_rank={cp_rank}, tp_rank={tp_rank}) is not a rank of this plan, which "
                f"splits over cp_size={cp_size} x sp_size={sp_size}. Without sequence "
                "parallelism (sp_size=1) every TP rank replays tp_rank=0's piece."
            )
        wanted = None if layers is None else tuple(layers)
        mine = {
            piece.micro_batch: plan
            for piece, plan in self.pieces.items()
            if (piece.cp_rank, piece.tp_rank) == (cp_rank, tp_rank)
        }
        if isinstance(trace, RoutingTrace):
            return {
                micro_batch: plan.apply_trace(trace, wanted) for micro_batch, plan in mine.items()
            }
        sequences: SequenceTraces | SourceRanges
        if isinstance(trace, SequenceSource):
            sequences = SourceRanges(trace, self.lengths)
        else:
            sequences = SequenceTraces(trace, self.lengths)
        return {micro_batch: sequences.gather(plan, wanted) for micro_batch, plan in mine.items()}

    def restore(self, pieces: Mapping[Piece, torch.Tensor]) -> torch.Tensor:
        """Every piece's `[tokens, *rest]` -> `[sum(lengths), *rest]` in batch order."""
        return restore(pieces, self.pieces)

    def restore_trace(self, pieces: Mapping[Piece, RoutingTrace]) -> RoutingTrace:
        """Every piece's trace (e.g. recorded by the trainer, R2) -> the batch's trace."""
        return restore_trace(pieces, self.pieces)


def plan_thd(
    lengths: Lengths,
    micro_batches: MicroBatches | None = None,
    *,
    multiple: int | None = None,
    cp_size: int = 1,
    sp_size: int = 1,
    zigzag: bool = True,
) -> ThdPlan:
    """Plan a batch of sequences `[sum(lengths)]` into THD micro-batches on CP x SP ranks.

    lengths:       `[sequences]` tokens per sequence, batch order.
    micro_batches: default one micro-batch holding the whole batch.
    multiple:      every sequence is padded to a multiple of this; default
                   `sp_size * cp_size * 2` with CP, else `sp_size` (verl's choice).
    cp_size:       context-parallel ranks, zigzag (or contiguous) chunks of each sequence.
    sp_size:       the TP size when sequence parallelism is on (1 when off: every TP rank
                   then sees all of its CP rank's tokens).
    """
    check_size(cp_size, "cp_size")
    check_size(sp_size, "sp_size")
    lengths = as_lengths(lengths)
    if multiple is None:
        multiple = sp_size * cp_size * 2 if cp_size > 1 else sp_size
    if micro_batches is None:
        micro_batches = fixed_micro_batches(lengths.numel(), max(lengths.numel(), 1))
    zigzag = zigzag and cp_size > 1  # one CP rank takes whole sequences either way
    padded = padded_lengths(lengths, multiple)
    check_cp_chunks(
        padded,
        cp_size,
        zigzag,
        f"The packing pads to multiples of {multiple}; use a multiple of "
        "sp_size * cp_size * 2 (the default).",
        padded_from=lengths,
    )
    begin = starts(lengths)
    source_rows = int(lengths.sum())
    pieces: dict[Piece, TokenPlan] = {}
    for index, group in enumerate(micro_batches.groups):
        # Straight from batch tokens to rank tokens: the same positions as chaining
        # select -> pack_plan -> context_parallel_plans -> sequence_parallel_plans (a
        # test holds them equal), without the intermediate plans.
        real, length, base = lengths[group], padded[group], begin[group]
        for cp_rank in range(cp_size):
            rank = rank_plan(real, length, base, cp_rank, cp_size, zigzag, source_rows)
            source = rank.rows
            if sp_size == 1:
                pieces[Piece(index, cp_rank, 0)] = rank
                continue
            share = source.numel() // sp_size
            if source.numel() % sp_size:
                raise LayoutError(
                    f"Micro-batch {index} gives CP rank {cp_rank} {source.numel()} tokens, "
                    f"which do not split into sp_size={sp_size} equal chunks. Pad to a "
                    "multiple of sp_size * cp_size * 2 (the default)."
                )
            for tp_rank, part in enumerate(source.reshape(sp_size, share).unbind(0)):
                rows = torch.tensor([share])
                pieces[Piece(index, cp_rank, tp_rank)] = TokenPlan(
                    part, rows, source_rows, (share,)
                )
    return ThdPlan(micro_batches, lengths, multiple, pieces)
