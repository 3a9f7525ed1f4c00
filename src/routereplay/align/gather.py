"""A rank's share of a batch straight from the per-sequence traces, joined nowhere.

Engines hand over one trace per sequence. A rank of a CP x PP job replays
1 / (cp_size * pp_size) of the batch's ids: joining every sequence into one batch trace
first, then gathering the rank's rows, copies the stage's ids twice. Here each piece's
token axis is cut into runs of consecutive tokens of one sequence, and each run is
copied once, from its sequence's trace into the piece's buffer; padding is written -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from routereplay.align.plan import PAD, LayerRuns, TokenPlan, layer_runs, starts
from routereplay.align.traces import check_sequence_traces
from routereplay.trace import RoutingTrace

# Batches of sequences this long on average are copied run by run; shorter ones (many
# short sequences) are joined per piece first, where a few microseconds of dispatch per
# run would cost more than copying whole sequences once more.
SHORTEST_SEQUENCE = 256


class SequenceAxis:
    """A batch's token axis, its sequences end to end: where each begins (`starts
    [sequences]`), and the runs of one sequence's consecutive rows on a plan over it."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths
        self.starts = starts(lengths)
        self._is_start = torch.zeros(int(lengths.sum()) + 1, dtype=torch.bool)
        self._is_start[self.starts] = True

    def runs(self, plan: TokenPlan) -> Runs:
        """`plan`'s runs, padding left out (see `token_runs`)."""
        return token_runs(plan, self.starts, self._is_start)


class SequenceTraces:
    """Per-sequence traces `[lengths[i], layers, top_k]` of one batch, checked once and
    read by any number of plans over the batch's token axis (sequences end to end)."""

    def __init__(self, traces: Sequence[RoutingTrace], lengths: torch.Tensor) -> None:
        check_sequence_traces(traces, lengths, whose="the plan's ")
        self.traces = list(traces)
        self.first = traces[0]
        self.axis = SequenceAxis(lengths)
        self._tokens = (
            torch.cat([t.tokens for t in traces if t.tokens is not None])
            if self.first.tokens is not None
            else None
        )

    def gather(self, plan: TokenPlan, layers: Sequence[int] | None = None) -> RoutingTrace:
        """`plan`'s rows `[*plan.token_shape, layers, top_k]` (only `layers`, when given),
        padding -1, copied from the traces once."""
        kept = layer_runs(self.first, self.first.layers if layers is None else layers)
        host = self.first.experts.device.type == "cpu"
        short = int(self.axis.lengths.sum()) < SHORTEST_SEQUENCE * len(self.traces)
        if host and short and plan.num_tokens:
            experts = self._join_and_take(plan, kept)
        else:
            runs = self.axis.runs(plan)
            experts = torch.empty(
                (plan.num_tokens, len(kept.layers), self.first.top_k),
                dtype=self.first.experts.dtype,
                device=self.first.experts.device,
            )
            experts.index_fill_(0, plan.padding_positions.to(experts.device), PAD)
            if host:
                self._copy_runs(experts.numpy(), runs, kept)
            else:
                for begin, sequence, row, count in runs.as_list():
                    copy_run(experts, self.traces[sequence].experts, begin, row, count, kept)
        tokens = None if self._tokens is None else plan.apply(self._tokens, PAD)
        return self.first.derive(
            experts.reshape(*plan.token_shape, *experts.shape[1:]),
            kept.layers,
            None if tokens is None else tokens.reshape(plan.token_shape),
        )

    def _copy_runs(self, out: np.ndarray[Any, Any], runs: Runs, kept: LayerRuns) -> None:
        # Host copies through numpy: a few microseconds a run, where torch's dispatch
        # (and its thread pool, on a busy machine) costs many times that.
        arrays: dict[int, np.ndarray[Any, Any]] = {}  # a sequence's runs share its view
        for begin, sequence, row, count in runs.as_list():
            source = arrays.get(sequence)
            if source is None:
                source = arrays[sequence] = self.traces[sequence].experts.numpy()
            copy_run(out, source, begin, row, count, kept)

    def _join_and_take(self, plan: TokenPlan, kept: LayerRuns) -> torch.Tensor:
        """Short sequences: join the piece's sequences (only those, in one call) into a
        table whose last row is -1, then one gather of every output position's kept
        layers, padding from that row: per-run (or per-sequence) dispatch would cost
        more than joining all layers. The gather goes through numpy, which copies only
        the kept layers of each row."""
        real = plan.rows >= 0
        rows = plan.rows.clamp(min=0)
        owner = torch.searchsorted(self.axis.starts, rows, right=True) - 1
        sequences = torch.unique(owner[real])  # sorted
        lengths = self.axis.lengths[sequences]
        total = int(lengths.sum())
        pieces = [self.traces[i].experts for i in sequences.tolist()]
        table = torch.empty(
            (total + 1, *self.first.experts.shape[1:]), dtype=self.first.experts.dtype
        )
        if pieces:
            torch.cat(pieces, out=table[:total])
        table[total] = PAD
        joined_starts = torch.zeros(len(self.traces), dtype=torch.int64)
        joined_starts[sequences] = starts(lengths)
        index = torch.where(real, joined_starts[owner] + rows - self.axis.starts[owner], total)
        source, at = table.numpy(), index.numpy()
        parts = [source[at, first:end] for first, end in kept.runs]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))


class Runs(NamedTuple):
    """Runs of consecutive rows of one sequence on a plan's token axis: each run's
    output position, sequence, first row in that sequence and length (int64 `[runs]`)."""

    begins: torch.Tensor
    sequences: torch.Tensor
    rows: torch.Tensor
    counts: torch.Tensor

    def as_list(self) -> list[tuple[int, int, int, int]]:
        columns = (self.begins, self.sequences, self.rows, self.counts)
        return list(zip(*(column.tolist() for column in columns), strict=True))


def token_runs(plan: TokenPlan, starts: torch.Tensor, is_start: torch.Tensor) -> Runs:
    """The runs of `plan`'s token axis, padding left out; `starts [sequences]` is where
    each sequence begins on the source axis, `is_start [source rows]` marks those rows."""
    positions = (plan.rows >= 0).nonzero().flatten()
    rows = plan.rows[positions]
    breaks = is_start[rows]  # a sequence's first row always begins a run
    if breaks.numel():
        breaks[0] = True
    breaks[1:] |= (positions[1:] != positions[:-1] + 1) | (rows[1:] != rows[:-1] + 1)
    first = breaks.nonzero().flatten()
    counts = torch.diff(first, append=torch.tensor([positions.numel()]))
    begin_rows = rows[first]
    sequences = torch.searchsorted(starts, begin_rows, right=True) - 1  # per run only
    return Runs(positions[first], sequences, begin_rows - starts[sequences], counts)


def copy_run(out: Any, source: Any, begin: int, row: int, count: int, kept: LayerRuns) -> None:
    """Rows `row .. row + count` of `source [tokens, layers, top_k]` (`kept`'s layers) to
    `out[begin ..]`: numpy arrays on the host, tensors on a device."""
    column = 0
    for first, end in kept.runs:
        width = end - first
        out[begin : begin + count, column : column + width] = source[row : row + count, first:end]
        column += width
