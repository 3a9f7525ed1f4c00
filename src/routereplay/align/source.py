"""A rank's share of a batch read straight from a store of sequences (a trace file):
only the token ranges the rank replays are read.

`SequenceSource` is what such a store offers: each sequence's length, and any range of
its tokens as a trace. A rank of a CP job holds each sequence's CP chunks only; each
run of consecutive tokens of one sequence on the rank's token axis is read as one
range (a `TraceFile` of format 3 reads just the checksummed blocks that hold it) and
copied once into the piece, its layers only; padding is written -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from routereplay.align.gather import SequenceAxis, copy_run
from routereplay.align.plan import PAD, TokenPlan, layer_runs
from routereplay.align.traces import check_lengths
from routereplay.trace import RoutingTrace


@runtime_checkable
class SequenceSource(Protocol):
    """Sequences' routes read on demand, e.g. `routereplay.store.TraceFile`."""

    @property
    def layers(self) -> tuple[int, ...]:
        """The global routed layers on every trace's layer axis."""
        ...

    def __len__(self) -> int: ...

    def num_tokens(self, index: int) -> int:
        """Tokens of sequence `index`."""
        ...

    def trace(self, index: int, start: int = 0, stop: int | None = None) -> RoutingTrace:
        """Sequence `index`'s routes over its tokens `start .. stop - 1`."""
        ...


class SourceRanges:
    """The sequences of `source`, checked once against a plan's `lengths [sequences]`,
    and read range by range for any number of plans over the batch's token axis."""

    def __init__(self, source: SequenceSource, lengths: torch.Tensor) -> None:
        found = torch.tensor([source.num_tokens(i) for i in range(len(source))], dtype=torch.int64)
        check_lengths(lengths, found, "the plan's lengths say", "the plan's ")
        self.source = source
        self.axis = SequenceAxis(lengths)

    def gather(self, plan: TokenPlan, layers: Sequence[int] | None = None) -> RoutingTrace:
        """`plan`'s rows `[*plan.token_shape, layers, top_k]` (only `layers`, when given),
        padding -1: each run read as one token range, then copied once."""
        runs = self.axis.runs(plan).as_list()

        def read(sequence: int, row: int, count: int) -> RoutingTrace:
            return self.source.trace(sequence, row, row + count)

        # The first run tells the pieces' dtype and layers (an empty piece reads none).
        first = read(*runs[0][1:]) if runs else read(0, 0, 0)
        kept = layer_runs(first, first.layers if layers is None else layers)
        experts = torch.full(
            (plan.num_tokens, len(kept.layers), first.top_k), PAD, dtype=first.experts.dtype
        )
        tokens = None
        if first.tokens is not None:
            tokens = torch.full((plan.num_tokens,), PAD, dtype=first.tokens.dtype)
        out = experts.numpy()
        for number, (begin, sequence, row, count) in enumerate(runs):
            # One run read at a time: memory holds the piece and one run.
            part = first if number == 0 else read(sequence, row, count)
            copy_run(out, part.experts.numpy(), begin, 0, count, kept)
            if tokens is not None and part.tokens is not None:
                tokens[begin : begin + count] = part.tokens
        return first.derive(
            experts.reshape(*plan.token_shape, *experts.shape[1:]),
            kept.layers,
            None if tokens is None else tokens.reshape(plan.token_shape),
        )
