"""`RoutingTrace`: which experts each token went to, on which global layers.

A trace is an integer tensor `experts [..., layers, top_k]` whose leading axes are the
tokens (`[tokens]` or `[batch, seq]`), plus `layers`: the global 0-based layer id of
every slot on the layer axis. The layer axis never has to be guessed from its width.

-1 (`NO_ROUTE`) is the only "no route" value: a whole row of -1 means "route this
(token, layer) natively" (the final sampled token, padding, tool output). 0 is expert 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from routereplay.checks import exact_int, exact_ints
from routereplay.errors import LayoutError, TraceError
from routereplay.errors import short_ids as _short
from routereplay.id_arrays import (
    ExpertArray,
    as_int_tensor,
    as_token_ids,
    check_capture,
    check_dense,
    check_range,
    first_true,
    placed_rows,
    routed_columns,
    where_row,
)
from routereplay.id_arrays import storage_dtype as storage_dtype  # its home, re-exported
from routereplay.id_checks import NO_ROUTE as NO_ROUTE  # its one home, re-exported
from routereplay.id_checks import has_repeated_rows, repeated_mask, row_faults
from routereplay.layout import MoELayout


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Expert ids `experts [..., len(layers), top_k]` over the global layers `layers`.

    Stored in the compact dtype of `storage_dtype(num_experts)`; `expert_ids()` widens
    to int64 for indexing. Construction validates everything (see `validate`).

    `tokens [...]` (int32, optional): the token id each row was routed for, -1 where
    unknown (padding). Engines' traces carry them, every transform keeps them next to
    their rows, and replay checks them against the batch the model sees.
    """

    experts: torch.Tensor
    layers: tuple[int, ...]
    num_experts: int
    source: str = "recorded"
    tokens: torch.Tensor | None = None
    # `experts._version` when the ids were last validated (see `recheck`).
    _checked_version: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        layers = exact_ints(self.layers, "layers", TraceError)
        object.__setattr__(
            self, "num_experts", exact_int(self.num_experts, "num_experts", TraceError)
        )
        if self.num_experts < 1:
            raise TraceError(f"num_experts must be at least 1, found {self.num_experts}.")
        experts = as_int_tensor(self.experts, "experts", self.num_experts)
        if experts.ndim < 3:
            raise TraceError(
                f"experts must be [..., layers, top_k] with at least one token axis, "
                f"found shape {tuple(experts.shape)}."
            )
        # Range check before narrowing, so that an id too large for the compact dtype is
        # reported instead of wrapping around (a seed bug: ids above 255 in uint8).
        check_range(experts, layers, self.num_experts)
        object.__setattr__(self, "experts", experts.to(storage_dtype(self.num_experts)))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "tokens", as_token_ids(self.tokens, self.token_shape))
        self.validate()
        self._checked()

    # -- shape --------------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        """Experts per (token, layer): the last axis of `experts`."""
        return int(self.experts.shape[-1])

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The token axes: `(tokens,)` or `(batch, seq)`."""
        return tuple(self.experts.shape[:-2])

    @property
    def num_rows(self) -> int:
        """Tokens covered: the product of the leading axes."""
        return math.prod(self.experts.shape[:-2])

    def expert_ids(self) -> torch.Tensor:
        """`[..., layers, top_k]` as int64, ready for indexing."""
        return self.experts.long()

    def routed_mask(self) -> torch.Tensor:
        """`[..., layers]` bool: True where the row holds a route, False for -1 rows."""
        return self.experts[..., 0] != NO_ROUTE

    def slot(self, layer: int) -> int:
        """Index of global `layer` on the layer axis."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise TraceError(
                f"This {self.source} trace has no routes for layer {layer}; "
                f"it covers layers {_short(self.layers)}."
            ) from None

    def layer_experts(self, layer: int) -> torch.Tensor:
        """`[..., top_k]` compact ids of one global layer."""
        return self.experts[..., self.slot(layer), :]

    # -- validation -------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `TraceError` unless the trace is well formed.

        Layers strictly increasing and non-negative; ids in [0, num_experts) or -1; a row
        either all -1 or fully routed; no expert twice in a row.
        """
        experts, layers = self.experts, self.layers
        if experts.shape[-2] != len(layers):
            raise TraceError(
                f"The layer axis has {experts.shape[-2]} slots but {len(layers)} layer ids "
                f"were given ({_short(layers)}): give one global id per slot."
            )
        for a, b in itertools.pairwise(layers):
            if b <= a:
                raise TraceError(f"layers must be strictly increasing, found {a} before {b}.")
        if layers and layers[0] < 0:
            raise TraceError(f"layer ids are global and 0-based, found {layers[0]}.")
        if self.top_k > self.num_experts:
            raise TraceError(
                f"top_k={self.top_k} is more than num_experts={self.num_experts}: "
                "a row cannot hold that many distinct experts."
            )
        # Yes/no questions first (one fast scan); the masks only to name the row.
        partial, repeated = row_faults(experts)
        if partial:
            missing = experts == NO_ROUTE
            mixed = missing.any(-1) & ~missing.all(-1)
            raise TraceError(
                f"{where_row(mixed, layers)} mixes -1 with expert ids "
                f"{experts[first_true(mixed)].tolist()}: a row is either all -1 (no route) "
                "or fully routed."
            )
        if repeated:
            twice = repeated_mask(experts) & (experts[..., 0] != NO_ROUTE)
            raise TraceError(
                f"{where_row(twice, layers)} routes to the same expert twice: "
                f"{experts[first_true(twice)].tolist()}. A token picks top_k distinct experts; "
                "zero-filled rows usually mean padding or a broken capture (mark them -1)."
            )

    def recheck(self) -> None:
        """Validate again if `experts` was written in place since it was last checked.

        torch counts every in-place write to a tensor and its views (`_version`), so a
        trace nobody wrote to costs nothing here, however large. Writes that bypass
        torch (through a numpy array sharing the memory) are not seen.
        """
        if self.experts._version == self._checked_version:
            return
        check_range(self.experts, self.layers, self.num_experts)
        self.validate()
        self._checked()

    def check_layout(self, layout: MoELayout) -> None:
        """Raise unless this trace can be replayed on a model of `layout`."""
        if self.num_experts != layout.num_experts or self.top_k != layout.top_k:
            raise TraceError(
                f"This {self.source} trace has {self.num_experts} experts, top_k={self.top_k}; "
                f"the model has {layout.num_experts} experts, top_k={layout.top_k}."
            )
        routed = set(layout.moe_layers) | set(layout.mtp_layers)
        stray = [i for i in self.layers if i not in routed]
        if stray:
            raise TraceError(
                f"This {self.source} trace holds routes for layers {_short(stray)}, which do "
                f"not route in the {layout.family} layout (routed: {_short(layout.moe_layers)}"
                f"{', MTP: ' + _short(layout.mtp_layers) if layout.mtp_layers else ''})."
            )

    def check_compatible(
        self,
        expected: RoutingTrace | MoELayout,
        *,
        names: tuple[str, str],
        fix: str,
        layers: bool = True,
        token_shape: bool = False,
    ) -> None:
        """Raise `TraceError` unless this trace's routes can be joined with, compared to
        or stitched onto `expected`'s: the same expert count and top_k, the same global
        layers (unless `layers=False`: stage slices cover different ones) and, with
        `token_shape`, the same token axes. A layout expects its routed layers
        (`moe_layers`) on any token axes.

        names: what the error calls this trace and `expected`, e.g. ("Sequence 3's
               trace", "sequence 0's"); fix: what to do, the error's last clause.
        """
        found = _Routes(self.layers, self.top_k, self.num_experts, self.token_shape)
        if isinstance(expected, MoELayout):
            wanted = _Routes(expected.moe_layers, expected.top_k, expected.num_experts, None)
        else:
            wanted = _Routes(
                expected.layers, expected.top_k, expected.num_experts, expected.token_shape
            )
        if (
            (found.top_k, found.num_experts) == (wanted.top_k, wanted.num_experts)
            and (not layers or found.layers == wanted.layers)
            and (not token_shape or wanted.token_shape in (None, found.token_shape))
        ):
            return
        raise TraceError(
            f"{names[0]} {found.describe(layers, token_shape)}; "
            f"{names[1]} {wanted.describe(layers, token_shape)}: {fix}"
        )

    # -- conversions ------------------------------------------------------------------

    def select_tokens(self, index: int | slice | Sequence[int] | torch.Tensor) -> RoutingTrace:
        """Entries of the first token axis: sequences of a `[batch, seq, layers, top_k]`
        trace, tokens of a `[tokens, layers, top_k]` one. `index` is a slice, ids or a
        bool mask (the axis stays), or an int (one sequence: the axis goes). Rows of a
        valid trace are valid, so nothing is checked again."""
        if isinstance(index, Sequence):  # a tuple would index several axes: ids, as one
            index = torch.as_tensor(list(index), dtype=torch.int64)
        experts = self.experts[index]
        if experts.ndim < 3:
            raise TraceError(
                f"Index {index!r} leaves no token axis of this {self.source} trace (token "
                f"axes {list(self.token_shape)}): an int picks one sequence of a batch."
            )
        tokens = None if self.tokens is None else self.tokens[index]
        return self.derive(experts, self.layers, tokens)

    def transpose_tokens(self) -> RoutingTrace:
        """`[a, b, layers, top_k]` -> `[b, a, layers, top_k]` (contiguous): batch-first to
        sequence-first and back."""
        if len(self.token_shape) != 2:
            raise TraceError(
                f"Transposing token axes needs two of them; this {self.source} trace has "
                f"{list(self.token_shape)}."
            )
        tokens = None if self.tokens is None else self.tokens.transpose(0, 1).contiguous()
        return self.derive(self.experts.transpose(0, 1).contiguous(), self.layers, tokens)

    def without_tokens(self, mask: torch.Tensor) -> RoutingTrace:
        """The trace with the token positions `mask` (bool `[*token axes]`) set to -1 (no
        route): prompt tokens left out of a comparison, or padding."""
        if mask.dtype != torch.bool or tuple(mask.shape) != self.token_shape:
            raise TraceError(
                f"The mask must be bool {list(self.token_shape)} like the token axes; "
                f"found {mask.dtype} {list(mask.shape)}."
            )
        experts = self.experts.masked_fill(mask[..., None, None].to(self.experts.device), NO_ROUTE)
        return self.derive(experts, self.layers, self.tokens)

    def select_layers(self, layers: Iterable[int]) -> RoutingTrace:
        """The trace restricted to global `layers` (e.g. one pipeline stage's routed layers)."""
        wanted = sorted(set(int(i) for i in layers))
        slots = [self.slot(i) for i in wanted]
        return self.derive(self.experts[..., slots, :], tuple(wanted), self.tokens)

    def reshape_tokens(self, *shape: int) -> RoutingTrace:
        """Same routes with the token axes reshaped, e.g. `[batch, seq]` -> `[tokens]`."""
        experts = self.experts.reshape(*shape, *self.experts.shape[-2:])
        tokens = None if self.tokens is None else self.tokens.reshape(experts.shape[:-2])
        return self.derive(experts, self.layers, tokens)

    @classmethod
    def from_all_layers(
        cls,
        experts: ExpertArray,
        layout: MoELayout,
        source: str = "engine",
        *,
        start: int = 0,
        num_tokens: int | None = None,
        out: np.ndarray[Any, Any] | None = None,
    ) -> RoutingTrace:
        """From an engine-style array `[..., width, top_k]`, keeping routed layers only.

        `width` is every decoder layer (vLLM and SGLang: dense ones as zeros) or, in some
        engine versions, the routed layers only; `layout.layer_axis` tells them apart.
        Rows may be -1 (not returned). A dense layer holding ids means the layout is
        wrong; a routed layer that is zero in every routed row of a sequence is a broken
        capture. Row numbers in errors are positions on the array's token axes.

        `start`, `num_tokens` (one token axis): the array holds the rows of tokens
        `start ..` of a sequence of `num_tokens`; the tokens before and after have no
        route (-1), and errors name positions in the sequence. The ids are copied once,
        into the trace's compact dtype; the trace never shares the caller's memory, but
        for `out`: a writable numpy array `[num_tokens, routed layers, top_k]` in
        `storage_dtype(layout.num_experts)` that becomes the trace's ids, and may
        already hold the rows in place (see `id_arrays.placed_rows`).
        """
        if isinstance(experts, np.ndarray) and np.issubdtype(experts.dtype, np.integer):
            full: ExpertArray = experts  # numpy keeps an engine's uint8 without widening
        else:
            full = as_int_tensor(experts, "experts")
        if full.ndim < 3:
            raise TraceError(
                f"An engine array is [..., layers, top_k] with at least one token axis, "
                f"found shape {tuple(full.shape)}."
            )
        try:
            axis = layout.layer_axis(full.shape[-2])
        except LayoutError as error:
            raise TraceError(f"{error} Found shape {tuple(full.shape)}.") from None
        placed = (start, full.shape[0] + start if num_tokens is None else num_tokens)
        if placed != (0, full.shape[0]) and (
            full.ndim != 3 or not 0 <= start <= placed[1] - full.shape[0]
        ):
            raise TraceError(
                f"Rows of shape {list(full.shape)} placed from token {start} do not fit a "
                f"sequence of {placed[1]} tokens: placing needs one token axis and "
                "0 <= start <= num_tokens - rows."
            )
        if axis == "all_layers":
            check_dense(full, layout, placed[0])
            routed = routed_columns(full, layout.moe_layers)
        else:
            routed = full
        try:
            trace = cls._from_engine_rows(routed, layout, source, placed, out)
        except TraceError:
            # With top_k >= 2 a never-captured layer's zero rows are repeats: say why.
            check_capture(as_int_tensor(routed, "experts"), layout.moe_layers, source)
            raise
        if trace.top_k == 1:  # zero rows repeat nothing with one expert per token
            check_capture(trace.experts, layout.moe_layers, source)
        return trace

    @classmethod
    def _from_engine_rows(
        cls,
        routed: ExpertArray,
        layout: MoELayout,
        source: str,
        placed: tuple[int, int],
        out: np.ndarray[Any, Any] | None,
    ) -> RoutingTrace:
        experts = placed_rows(routed, layout.num_experts, *placed, out=out)
        unsigned = isinstance(routed, np.ndarray) and routed.dtype.kind == "u"
        if not unsigned or experts.dtype != storage_dtype(layout.num_experts):
            return cls(experts, layout.moe_layers, layout.num_experts, source)
        # An engine's unsigned ids hold no -1, so only repeats can be wrong: scanned on
        # the engine's own rows; the -1 rows placed around them are whole by making.
        if has_repeated_rows(routed):
            return cls(experts, layout.moe_layers, layout.num_experts, source)  # names it
        # placed_rows range-checked the rows; the -1 rows around them are whole.
        return cls._assembled(experts, layout.moe_layers, layout.num_experts, source)

    def to_all_layers(self, layout: MoELayout) -> torch.Tensor:
        """Engine-style `[..., num_layers, top_k]`: dense layers as zeros, -1 rows kept."""
        self.check_layout(layout)
        full = torch.zeros(
            (*self.token_shape, layout.num_layers, self.top_k), dtype=self.experts.dtype
        )
        full[..., list(self.layers), :] = self.experts
        return full

    def equal(self, other: RoutingTrace) -> bool:
        """Same layers, expert count and ids (in the same column order): the same routes,
        whatever token ids either knows."""
        return (
            self.layers == other.layers
            and self.num_experts == other.num_experts
            and self.experts.shape == other.experts.shape
            and bool(torch.equal(self.experts, other.experts))
        )

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(tokens={list(self.token_shape)}, layers={_short(self.layers)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts}, source={self.source!r})"
        )

    def with_tokens(self, tokens: torch.Tensor | np.ndarray[Any, Any] | None) -> RoutingTrace:
        """The same routes, recorded for `tokens [*token axes]` (-1 where unknown)."""
        checked = as_token_ids(tokens, self.token_shape)
        return self.derive(self.experts, self.layers, checked)

    def derive(
        self, experts: torch.Tensor, layers: tuple[int, ...], tokens: torch.Tensor | None
    ) -> RoutingTrace:
        """A trace of this one's expert count and source over `experts [..., layers,
        top_k]` and `tokens [...]`, unchecked: for transforms (align's plans) that only
        move rows of a valid trace or write -1 rows, which are valid by construction."""
        return RoutingTrace._assembled(experts, layers, self.num_experts, self.source, tokens)

    @classmethod
    def from_verified_rows(
        cls,
        experts: torch.Tensor,
        layers: tuple[int, ...],
        num_experts: int,
        source: str,
        tokens: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """A trace over rows whose form a storage format guarantees: each row all -1 or
        fully routed with distinct ids (a trace file: its routed mask writes whole -1
        rows, and each sequence's checksum proves its bytes are those a validating
        writer wrote). Checks the dtype, the layer axis and the id range, which cost one
        reduction; not the row scans of `validate` (run `validate()` to add them).

        `experts [..., len(layers), top_k]` in `storage_dtype(num_experts)`; `layers`
        strictly increasing global ids (a file's header, checked on open).
        """
        if experts.dtype != storage_dtype(num_experts) or experts.ndim < 3:
            raise TraceError(
                f"Verified rows are [..., layers, top_k] in {storage_dtype(num_experts)}, "
                f"found {experts.dtype} {list(experts.shape)}."
            )
        if experts.shape[-2] != len(layers):
            raise TraceError(
                f"The layer axis has {experts.shape[-2]} slots but {len(layers)} layer ids "
                f"were given ({_short(layers)})."
            )
        check_range(experts, layers, num_experts)
        token_ids = as_token_ids(tokens, tuple(experts.shape[:-2]))
        return cls._assembled(experts, tuple(layers), num_experts, source, token_ids)

    @classmethod
    def _assembled(
        cls,
        experts: torch.Tensor,
        layers: tuple[int, ...],
        num_experts: int,
        source: str,
        tokens: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """The trace of ids and token ids known valid, as given: no check at all."""
        trace = object.__new__(cls)
        for name, value in (
            ("experts", experts),
            ("layers", layers),
            ("num_experts", num_experts),
            ("source", source),
            ("tokens", tokens),
        ):
            object.__setattr__(trace, name, value)
        trace._checked()
        return trace

    def _checked(self) -> None:
        # The ids as validated: `recheck` re-validates once they are written to.
        object.__setattr__(self, "_checked_version", self.experts._version)


class _Routes(NamedTuple):
    """What `check_compatible` compares of a trace (or expects of a layout)."""

    layers: tuple[int, ...]
    top_k: int
    num_experts: int
    token_shape: tuple[int, ...] | None  # None: a layout, any token axes

    def describe(self, layers: bool, token_shape: bool) -> str:
        """'covers layers [2, 3] with top_k=4 of 16 experts on token axes [2, 8]'."""
        text = f"covers layers {_short(self.layers)} with " if layers else "has "
        text += f"top_k={self.top_k} of {self.num_experts} experts"
        if token_shape and self.token_shape is not None:
            text += f" on token axes {list(self.token_shape)}"
        return text
