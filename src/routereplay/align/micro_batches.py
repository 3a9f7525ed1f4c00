"""Micro-batches: which sequences each one holds, and the order that puts results back.

`fixed_micro_batches` keeps the batch order; `balanced_micro_batches` groups sequences so
that every micro-batch stays under a token budget with loads close to equal (verl's
dynamic batch size), which reorders sequences. Both return `MicroBatches`, whose `order`
and `inverse_order` move per-sequence results between the two orders, and whose `plans`
select each micro-batch's tokens from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routereplay.align.plan import (
    Lengths,
    TokenPlan,
    as_lengths,
    check_fits,
    check_size,
    ragged_arange,
    starts,
)
from routereplay.checks import exact_int
from routereplay.errors import LayoutError, TraceError


@dataclass(frozen=True, eq=False)
class MicroBatches:
    """groups: one int64 `[sequences in micro-batch]` tensor per micro-batch, the batch
    indices of its sequences in the order they are laid out. Every sequence of the
    `num_sequences` is in exactly one group."""

    groups: tuple[torch.Tensor, ...]
    num_sequences: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "num_sequences", exact_int(self.num_sequences, "num_sequences", TraceError)
        )
        for index, group in enumerate(self.groups):
            if not isinstance(group, torch.Tensor) or group.dtype not in (
                torch.int64,
                torch.int32,
            ):
                found = group.dtype if isinstance(group, torch.Tensor) else type(group).__name__
                raise TraceError(
                    f"Micro-batch group {index} must be an int64 tensor of sequence indices, "
                    f"found {found}."
                )
        seen = torch.cat([*self.groups, torch.zeros(0, dtype=torch.int64)]).long()
        counts = torch.bincount(seen.clamp(min=0), minlength=self.num_sequences)
        negative = seen.numel() > 0 and int(seen.min()) < 0
        if negative or seen.numel() != self.num_sequences or bool((counts != 1).any()):
            raise TraceError(
                f"Micro-batch groups must hold each of the {self.num_sequences} sequences "
                f"exactly once; they hold {seen.numel()} entries."
            )

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def order(self) -> torch.Tensor:
        """int64 `[sequences]`: position p of the micro-batch order holds batch sequence
        `order[p]` (the groups joined): `per_sequence[order]` goes batch -> micro-batch."""
        return torch.cat([*self.groups, torch.zeros(0, dtype=torch.int64)])

    @property
    def inverse_order(self) -> torch.Tensor:
        """int64 `[sequences]`: batch sequence i sits at position `inverse_order[i]` of the
        micro-batch order: `results[inverse_order]` puts results back in batch order."""
        return torch.argsort(self.order)

    def plans(self, lengths: Lengths) -> list[TokenPlan]:
        """One plan per micro-batch over the batch's tokens `[sum(lengths)]`: its sequences'
        tokens, laid end to end in group order (`plan.lengths` are theirs)."""
        lengths = _matching(lengths, self.num_sequences)
        begin = starts(lengths)
        plans = []
        for group in self.groups:
            source = ragged_arange(begin[group], lengths[group])
            plans.append(TokenPlan(source, lengths[group], int(lengths.sum()), (source.numel(),)))
        return plans


def fixed_micro_batches(num_sequences: int, micro_batch_size: int) -> MicroBatches:
    """Consecutive groups of `micro_batch_size` sequences in batch order; the last one
    holds the remainder when the batch does not divide."""
    check_size(micro_batch_size, "micro_batch_size")
    num_sequences = exact_int(num_sequences, "num_sequences", TraceError)
    if num_sequences < 0:
        raise TraceError(f"num_sequences must be at least 0, found {num_sequences}.")
    index = torch.arange(num_sequences)
    return MicroBatches(tuple(torch.split(index, micro_batch_size)), num_sequences)


def balanced_micro_batches(
    lengths: Lengths, max_tokens: int, *, multiple_of: int = 1, min_micro_batches: int = 1
) -> MicroBatches:
    """Group sequences so that every micro-batch holds at most `max_tokens` tokens.

    lengths:     `[sequences]` tokens each (padded lengths if the micro-batches are packed
                 with padding, so that the budget counts what runs).
    multiple_of: the number of micro-batches is a multiple of this (Megatron's interleaved
                 pipeline schedule wants a multiple of pp_size).
    Starts from the fewest micro-batches the budget allows and adds more until every one
    fits. Sequences are dealt longest first in a snake order (0..n-1, n-1..0, ...), which
    keeps loads close to equal; inside a micro-batch they keep batch order.
    """
    check_size(max_tokens, "max_tokens")
    check_size(multiple_of, "multiple_of")
    check_size(min_micro_batches, "min_micro_batches")
    lengths = as_lengths(lengths)
    n = lengths.numel()
    check_fits(
        lengths,
        max_tokens,
        f"the micro-batch budget of max_tokens={max_tokens}",
        "raise the budget or truncate the sequence.",
    )
    if n == 0:
        return MicroBatches((), 0)
    by_length = torch.argsort(lengths, descending=True, stable=True)
    most = n // multiple_of * multiple_of  # every micro-batch needs a sequence
    count = _round_up(max(min_micro_batches, -(-int(lengths.sum()) // max_tokens)), multiple_of)
    while True:
        if count > most:
            raise LayoutError(
                f"{n} sequences cannot fill {count} micro-batches, and at most {most} keep every "
                f"one non-empty with multiple_of={multiple_of} (min_micro_batches="
                f"{min_micro_batches}, max_tokens={max_tokens}): raise the budget or lower "
                "multiple_of."
            )
        assignment = _snake(by_length, count)
        loads = torch.zeros(count, dtype=torch.int64).index_add_(0, assignment, lengths)
        heaviest = int(loads.max())
        if heaviest <= max_tokens:
            break
        # Grow about as much as the overload asks, but never past `most` without trying it.
        grown = _round_up(max(count + 1, count * heaviest // max_tokens), multiple_of)
        count = grown if count == most else min(grown, most)
    # Sort by (micro-batch, batch index) to list each group in batch order.
    grouped = torch.argsort(assignment * n + torch.arange(n))
    sizes = torch.bincount(assignment, minlength=count).tolist()
    return MicroBatches(tuple(torch.split(grouped, sizes)), n)


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def _snake(by_length: torch.Tensor, count: int) -> torch.Tensor:
    """int64 `[sequences]`: micro-batch of each sequence when `by_length` is dealt out."""
    rank = torch.arange(by_length.numel())
    column = rank % count
    bins = torch.where((rank // count) % 2 == 0, column, count - 1 - column)
    return torch.empty_like(bins).index_copy_(0, by_length, bins)


def _matching(lengths: Lengths, num_sequences: int) -> torch.Tensor:
    lengths = as_lengths(lengths)
    if lengths.numel() != num_sequences:
        raise TraceError(
            f"These micro-batches cover {num_sequences} sequences; {lengths.numel()} lengths "
            "were given."
        )
    return lengths
