"""`TokenPlan`: where every token of a trainer layout comes from, as one index tensor.

Every alignment (padding, packing, micro-batches, CP and SP splits) is a map from a
*source* token axis (sequences laid end to end) to an *output* token axis. A plan holds
that map as `rows [tokens]`: for each output position, the index of the source token
it holds, or -1 where the output is padding. Applying a plan is one row gather, so token
ids `[tokens]`, labels and trace experts `[tokens, layers, top_k]` put through the same
plan stay side by side. Plans compose (`then`), and a set of plans that covers every
source token once can be undone (`restore`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from routereplay.errors import LayoutError, RouteReplayError, TraceError, short_ids
from routereplay.trace import RoutingTrace

Lengths = torch.Tensor | np.ndarray[Any, Any] | Sequence[int]

PAD = -1

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class TokenPlan:
    """The output token axis of one layout piece and where each of its tokens comes from.

    rows:        int64 `[tokens]`: the row (token) of the source axis each output
                 position takes, -1 where the output is padding.
    lengths:     int64 `[sequences]`: the output axis is these sequences (or batch rows,
                 or sequence pieces) laid end to end; they sum to `tokens`.
    source_rows: how many rows (tokens) the source axis holds.
    token_shape: the output token axes, `(tokens,)` or `(batch, seq)`; `apply` returns
                 them.
    """

    rows: torch.Tensor
    lengths: torch.Tensor
    source_rows: int
    token_shape: tuple[int, ...]
    # The output positions that are padding, when `from_runs` knows them already.
    _known_padding: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rows.dtype != torch.int64 or self.rows.ndim != 1:
            raise TraceError(
                f"A plan's rows are int64 [tokens], found {self.rows.dtype} "
                f"{tuple(self.rows.shape)}."
            )
        tokens = self.rows.numel()
        if int(np.prod(self.token_shape)) != tokens or int(self.lengths.sum()) != tokens:
            raise TraceError(
                f"A plan of {tokens} tokens has shape {self.token_shape} and lengths summing to "
                f"{int(self.lengths.sum())}: all three must agree."
            )
        if tokens:
            low, high = (int(v) for v in torch.aminmax(self.rows))
            if low < PAD or high >= self.source_rows:
                raise TraceError(
                    f"A plan's source indices must lie in [-1, {self.source_rows}), found "
                    f"[{low}, {high}]."
                )

    @classmethod
    def from_runs(
        cls,
        begin: torch.Tensor,
        counts: torch.Tensor,
        lengths: torch.Tensor,
        source_rows: int,
    ) -> TokenPlan:
        """The plan whose output is runs laid end to end: run i holds `counts[i]`
        consecutive source tokens from `begin[i]`, or `counts[i]` padding positions where
        `begin[i]` is -1 (int64 `[runs]` each). Every layout here is a few runs per
        sequence, so building from runs costs a handful of passes over the tokens."""
        tokens = int(counts.sum())
        placed = starts(counts)
        source = torch.repeat_interleave(begin - placed, counts, output_size=tokens)
        source += torch.arange(tokens)
        padding = begin < 0
        positions = ragged_arange(placed[padding], counts[padding])
        source.index_fill_(0, positions, PAD)
        plan = cls(source, lengths, source_rows, (tokens,))
        # Known here: saves a pass over `rows` at apply time.
        object.__setattr__(plan, "_known_padding", positions)
        return plan

    @property
    def num_tokens(self) -> int:
        """Positions on the output token axis, padding included."""
        return self.rows.numel()

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 `[sequences + 1]`: `[0, l0, l0 + l1, ...]` of `lengths` (padding included),
        the Megatron / flash-attention convention (`cu_seqlens_padded` for THD)."""
        return _cumulative(self.lengths)

    @functools.cached_property
    def valid_lengths(self) -> torch.Tensor:
        """int64 `[sequences]`: real (non-padding) tokens in each output sequence."""
        valid = torch.cat([torch.zeros(1, dtype=torch.int64), (self.rows >= 0).cumsum(0)])
        ends = self.lengths.cumsum(0)
        return valid[ends] - valid[ends - self.lengths]

    @functools.cached_property
    def _gather_index(self) -> torch.Tensor:
        return self.rows.clamp(min=0)

    @functools.cached_property
    def padding_positions(self) -> torch.Tensor:
        """int64 `[padding positions]`: the output positions that are padding."""
        if self._known_padding is not None:
            return self._known_padding
        return (self.rows < 0).nonzero().flatten()

    @functools.cached_property
    def _scatter_index(self) -> torch.Tensor:
        # Padding rows go to one spare row past the end, dropped after the scatter.
        return torch.where(self.rows >= 0, self.rows, self.source_rows)

    def apply(self, values: torch.Tensor, pad: int | float | bool = PAD) -> torch.Tensor:
        """`values [source_rows, *rest]` -> `[*token_shape, *rest]`, padding positions set to `pad`.

        Works for any per-token tensor: token ids `[tokens]`, position ids, trace experts
        `[tokens, layers, top_k]` (or a narrowed view of them). Rows are moved as whole
        machine words, whatever the dtype.
        """
        if values.ndim < 1 or values.shape[0] != self.source_rows:
            raise TraceError(
                f"This plan reads a source axis of {self.source_rows} tokens; the values have "
                f"shape {tuple(values.shape)} (tokens first)."
            )
        rest = tuple(values.shape[1:])
        if self.source_rows == 0:  # nothing to read: every output position is padding
            return values.new_full((*self.token_shape, *rest), pad)
        index = self._gather_index.to(values.device)
        words = _as_words(values, _word_dtype(values))
        out = words.index_select(0, index).view(values.dtype).view(self.num_tokens, *rest)
        if self.padding_positions.numel():
            out.index_fill_(0, self.padding_positions.to(values.device), pad)
        return out.reshape(*self.token_shape, *rest)

    def apply_trace(self, trace: RoutingTrace, layers: Iterable[int] | None = None) -> RoutingTrace:
        """`trace [*source token axes, layers, top_k]` (tokens `source_rows` in all) ->
        `[*shape, layers, top_k]`, padding rows -1 (no route).

        layers: keep only these global layers (say, the routed layers of one pipeline
                rank's stages, `MoELayout.rank_moe_layers`); only their ids are moved,
                one row gather per run of adjacent layers on the trace's layer axis.
        """
        if trace.num_rows != self.source_rows:
            raise TraceError(
                f"This plan reads a source axis of {self.source_rows} tokens; the "
                f"{trace.source} trace has {trace.num_rows} "
                f"(token axes {list(trace.token_shape)})."
            )
        rows = trace.experts.reshape(self.source_rows, *trace.experts.shape[-2:])
        tokens = token_rows(trace)
        tokens = None if tokens is None else self.apply(tokens, PAD)  # padding: unknown
        if layers is None:
            return trace.derive(self.apply(rows, PAD), trace.layers, tokens)
        kept = layer_runs(trace, layers)
        experts = kept.join(lambda first, end: self.apply(rows[:, first:end], PAD))
        return trace.derive(experts, kept.layers, tokens)

    def then(self, inner: TokenPlan) -> TokenPlan:
        """The plan that applies `self`, then `inner` (whose source axis is `self`'s output)."""
        if inner.source_rows != self.num_tokens:
            raise TraceError(
                f"Cannot chain plans: the first writes {self.num_tokens} tokens, the second "
                f"reads {inner.source_rows}."
            )
        picked = self.rows[inner._gather_index]
        source = torch.where(inner.rows >= 0, picked, PAD)
        return TokenPlan(source, inner.lengths, self.source_rows, inner.token_shape)


def restore(
    pieces: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor],
    plans: Mapping[Any, TokenPlan] | Sequence[TokenPlan],
) -> torch.Tensor:
    """Undo a set of plans: per-piece tensors back on the source token axis.

    pieces: `[*plan.token_shape, *rest]` (or `[plan.num_tokens, *rest]`) for each plan, matched
            by key (mappings) or position (sequences).
    plans:  plans over one source axis that together hold every source token exactly
            once (padding is dropped).
    Returns `[source_rows, *rest]`.
    """
    named = _match(pieces, plans)
    if not named:
        raise TraceError("Nothing to restore: no pieces were given.")
    source_rows = named[0][2].source_rows
    check_partition({name: plan for name, _, plan in named})
    flat: list[tuple[str, torch.Tensor, TokenPlan]] = []
    for name, piece, plan in named:
        lead = piece.shape[: len(plan.token_shape)]
        if tuple(lead) == plan.token_shape:
            piece = piece.reshape(plan.num_tokens, *piece.shape[len(plan.token_shape) :])
        elif piece.ndim < 1 or piece.shape[0] != plan.num_tokens:
            raise TraceError(
                f"{name} has shape {tuple(piece.shape)}; its plan writes {plan.num_tokens} "
                f"tokens as {plan.token_shape}."
            )
        flat.append((name, piece, plan))
    rest = tuple(flat[0][1].shape[1:])
    dtype = flat[0][1].dtype
    for name, piece, _ in flat:
        if tuple(piece.shape[1:]) != rest or piece.dtype != dtype:
            raise TraceError(
                f"{name} holds {piece.dtype} rows of shape {tuple(piece.shape[1:])}; "
                f"{flat[0][0]} holds {dtype} rows of shape {rest}: pieces must agree."
            )
    out = torch.empty((source_rows + 1, *rest), dtype=dtype, device=flat[0][1].device)
    word = _word_dtype(out)
    out_words = _as_words(out, word)
    for _, piece, plan in flat:
        index = plan._scatter_index.to(out.device)
        out_words.index_copy_(0, index, _as_words(piece.to(out.device), word))
    return out[:source_rows]


def check_partition(plans: Mapping[Any, TokenPlan]) -> None:
    """Raise unless the plans read one source axis and hold each source token exactly once."""
    names = list(plans)
    source_rows = plans[names[0]].source_rows
    for name in names:
        if plans[name].source_rows != source_rows:
            raise TraceError(
                f"{_name(name)} reads {plans[name].source_rows} source tokens, "
                f"{_name(names[0])} reads {source_rows}: the plans are not one layout."
            )
    sources = torch.cat([plan.rows[plan.rows >= 0] for plan in plans.values()])
    counts = torch.bincount(sources, minlength=source_rows)
    missing = (counts == 0).nonzero()
    if missing.numel():
        raise TraceError(
            f"Source token {int(missing[0])} (of {source_rows}) is held by no piece: a piece "
            f"is missing or the plans are not one layout ({len(names)} pieces given)."
        )
    twice = (counts > 1).nonzero()
    if twice.numel():
        token = int(twice[0])
        holders = [_name(n) for n in names if bool((plans[n].rows == token).any())]
        raise TraceError(
            f"Source token {token} is held by {int(counts[token])} pieces "
            f"({', '.join(holders[:3])}): a piece was given twice or the plans overlap."
        )


def restore_trace(
    pieces: Mapping[Any, RoutingTrace] | Sequence[RoutingTrace],
    plans: Mapping[Any, TokenPlan] | Sequence[TokenPlan],
) -> RoutingTrace:
    """`restore` for traces: per-piece traces `[*plan.token_shape, layers, top_k]` back to one
    trace `[source_rows, layers, top_k]`. Every piece must cover the same layers."""
    named = _match(pieces, plans)
    if not named:
        raise TraceError("Nothing to restore: no pieces were given.")
    first_name, first = named[0][0], named[0][1]
    for name, trace, _ in named:
        trace.check_compatible(
            first,
            names=(name, first_name),
            fix="restore one layer slice at a time (or stack_stages first).",
        )

    def restored(parts: list[torch.Tensor]) -> torch.Tensor:
        keyed: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor]
        keyed = dict(zip(plans, parts, strict=True)) if isinstance(plans, Mapping) else parts
        return restore(keyed, plans)

    experts = restored([trace.experts for _, trace, _ in named])
    tokens = [trace.tokens for _, trace, _ in named]
    if any(t is None for t in tokens):
        return first.derive(experts, first.layers, None)
    return first.derive(experts, first.layers, restored([t for t in tokens if t is not None]))


class LayerRuns(NamedTuple):
    """Global `layers` (sorted) and where they sit on a trace's layer axis, as runs of
    adjacent slots `[first, end)`."""

    layers: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]

    def join(self, take: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """`take(first, end)` for each run, `[..., run layers, top_k]`, joined on the
        layer axis: `[..., len(layers), top_k]`."""
        parts = [take(first, end) for first, end in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def layer_runs(trace: RoutingTrace, layers: Iterable[int]) -> LayerRuns:
    """Where `layers` sit on `trace`'s layer axis, raising if the trace lacks any."""
    wanted = tuple(sorted(set(int(layer) for layer in layers)))
    missing = [layer for layer in wanted if layer not in trace.layers]
    if missing:
        raise TraceError(
            f"Layers {short_ids(missing)} were asked for; the {trace.source} trace covers "
            f"{short_ids(trace.layers)}. Align traces that hold every layer the rank routes."
        )
    runs: list[tuple[int, int]] = []
    for slot in (trace.slot(layer) for layer in wanted):
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    return LayerRuns(wanted, tuple(runs) or ((0, 0),))


def token_rows(trace: RoutingTrace) -> torch.Tensor | None:
    """`trace.tokens` flat, `[num_rows]`, or None: what plans move next to the ids."""
    return None if trace.tokens is None else trace.tokens.reshape(-1)


# -- index arithmetic ---------------------------------------------------------------------


def as_lengths(lengths: Lengths, what: str = "lengths") -> torch.Tensor:
    """int64 `[sequences]` from a tensor, array or list; every entry non-negative."""
    if isinstance(lengths, torch.Tensor):
        tensor = lengths
    else:
        try:
            array = np.asarray(lengths)
        except (ValueError, TypeError, OverflowError):  # ragged, or ids beyond any dtype
            array = np.asarray(None)
        if array.dtype.kind not in "iub" and array.size:
            raise TraceError(f"{what} must be a 1-D integer sequence, found {str(lengths)[:60]!r}.")
        tensor = torch.as_tensor(array if array.size else array.astype(np.int64))
    if tensor.ndim != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TraceError(
            f"{what} must be a 1-D integer sequence, found {tensor.dtype} {tuple(tensor.shape)}."
        )
    tensor = tensor.to(device="cpu", dtype=torch.int64)
    negative = (tensor < 0).nonzero()
    if negative.numel():
        index = int(negative[0])
        raise TraceError(f"Sequence {index} has length {int(tensor[index])}; {what} are >= 0.")
    return tensor


def check_fits(
    lengths: torch.Tensor,
    limit: int,
    limit_name: str,
    fix: str,
    error: type[RouteReplayError] = LayoutError,
) -> None:
    """Raise `error` naming the first sequence of `lengths` (int64 `[sequences]`) longer
    than `limit` tokens: "Sequence 2 has 9 tokens, more than {limit_name}: {fix}"."""
    too_long = (lengths > limit).nonzero()
    if too_long.numel():
        index = int(too_long[0])
        raise error(
            f"Sequence {index} has {int(lengths[index])} tokens, more than {limit_name}: {fix}"
        )


def check_size(size: int, name: str) -> None:
    """Parallel sizes are at least 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LayoutError(f"{name} must be an integer >= 1, found {size!r}.")


def starts(lengths: torch.Tensor) -> torch.Tensor:
    """int64 `[sequences]`: where each sequence begins when laid end to end."""
    return lengths.cumsum(0) - lengths


def ragged_arange(begin: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int64 `[counts.sum()]`: `arange(begin[i], begin[i] + counts[i])` for each i, joined."""
    total = int(counts.sum())
    shift = torch.repeat_interleave(begin - starts(counts), counts, output_size=total)
    return torch.arange(total) + shift


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    out[1:] = lengths.cumsum(0)
    return out


# -- row movement -------------------------------------------------------------------------


def _word_dtype(values: torch.Tensor) -> torch.dtype:
    """The widest integer type whose size divides one row of `values [n, *rest]`, and,
    for a view (a layer range of a trace), its row stride and offset in bytes too."""
    size = values.element_size()
    spans = [size * int(np.prod(values.shape[1:])), size * values.storage_offset()]
    if not values.is_contiguous():
        spans.append(size * values.stride(0))
    if spans[0] == 0:  # rows of no layers: nothing to move
        return torch.uint8
    for dtype, word in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(span % word == 0 for span in spans):
            return dtype
    return torch.uint8


def _as_words(values: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """`values [n, *rest]` as `[n, row_bytes / word size]` of `word`: a view where the
    strides allow it (a contiguous tensor, or a layer-range view of one), else a copy."""
    rows = values.reshape(values.shape[0], int(np.prod(values.shape[1:])))
    if rows.dtype == torch.bool:
        rows = rows.view(torch.uint8)
    try:
        return rows.view(torch.uint8).view(word)
    except RuntimeError:
        return rows.clone().view(torch.uint8).view(word)


def _match(
    pieces: Mapping[Any, T] | Sequence[T],
    plans: Mapping[Any, TokenPlan] | Sequence[TokenPlan],
) -> list[tuple[str, T, TokenPlan]]:
    if isinstance(plans, Mapping) != isinstance(pieces, Mapping):
        raise TraceError("Give pieces and plans both as mappings (same keys) or both as lists.")
    if isinstance(plans, Mapping) and isinstance(pieces, Mapping):
        missing = [key for key in plans if key not in pieces]
        extra = [key for key in pieces if key not in plans]
        if missing or extra:
            raise TraceError(
                f"Pieces and plans must have the same keys: no piece for {missing[:3]}, "
                f"no plan for {extra[:3]}."
            )
        return [(_name(key), pieces[key], plan) for key, plan in plans.items()]
    assert not isinstance(plans, Mapping) and not isinstance(pieces, Mapping)
    if len(pieces) != len(plans):
        raise TraceError(f"{len(pieces)} pieces were given for {len(plans)} plans.")
    return [
        (f"Piece {i}", piece, plan)
        for i, (piece, plan) in enumerate(zip(pieces, plans, strict=True))
    ]


def _name(key: Any) -> str:
    return f"Piece {key}" if isinstance(key, int) else str(key)
