"""`ReplayController`: decides, for one model, which experts each router uses.

A framework adapter calls `controller.route(layer, logits, spec)` from inside every
router; the controller answers with ids and gate weights according to its mode:

- off:     native routing, nothing kept.
- record:  native routing, the ids kept per (micro-batch, global layer).
- replay:  the ids of the given trace for (micro-batch, global layer); rows that are
           -1 route natively. Gate weights always come from the live logits.

Targets are keyed by (micro-batch, layer), never by call order: a layer run again for
the same micro-batch (activation recompute, any pipeline schedule) gets the same ids.
There is no process-global state; two controllers never see each other's routes.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from routereplay.attachment import Attachment
from routereplay.batch_check import check_batch, check_same_tokens, check_trace_tokens
from routereplay.context_routes import ContextRoutes
from routereplay.errors import ReplayError, TraceError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.recording import MicroBatch, Recording, Tokens
from routereplay.routing import RouterScores, RouterSpec, Routing
from routereplay.stats import LayerStats, RouteCounts
from routereplay.trace import RoutingTrace

__all__ = ["DEFAULT_MICRO_BATCH", "LayerStats", "Mode", "ReplayController"]

DEFAULT_MICRO_BATCH: MicroBatch = 0


class Mode(enum.Enum):
    """What a controller does with router calls: route natively, record, or replay."""

    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


class ReplayController:
    """The routing state machine of one model (or one rank's set of model chunks)."""

    def __init__(
        self,
        layout: MoELayout,
        *,
        strict: bool = True,
        source: str = "recorded",
        label: str = "",
    ):
        self.layout = layout
        self._strict = strict
        self.source = source
        # Where this controller runs ("pp_rank 1"), prefixed to the errors of replay().
        self.label = label
        self._mode = Mode.OFF
        self._micro_batch: MicroBatch = DEFAULT_MICRO_BATCH
        self._tokens: Tokens | None = None
        # The counts, routes and decisions of the context now open (empty when off).
        self._counts = RouteCounts()
        self._context_routes = ContextRoutes(layout.num_experts, self._counts)
        self._routed_layers = frozenset(layout.moe_layers) | frozenset(layout.mtp_layers)
        # The ids each layer used last, for losses computed after the forward (aux loss).
        self._last_ids: dict[int, torch.Tensor] = {}
        self._attachment = Attachment()
        self._serial = 0
        # Traces whose token ids were checked against their batch's already.
        self._verified: weakref.WeakSet[RoutingTrace] = weakref.WeakSet()

    @property
    def strict(self) -> bool:
        """Whether a router without routes to replay is an error (not native routing);
        a change applies at once, inside an open context too."""
        return self._strict

    @strict.setter
    def strict(self, strict: bool) -> None:
        self._strict = strict
        self._context_routes.strict = strict

    # -- modes --------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """The context now open (`Mode.OFF` outside `record()` and `replay()`)."""
        return self._mode

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Route natively and keep every (micro-batch, layer)'s ids.

        Yields a `Recording`; read `.trace` (or `.traces`) after the forward.
        """
        recording = Recording(self.layout.num_experts, self.source)
        with self._context(Mode.RECORD, recording=recording):
            yield recording

    @contextmanager
    def replay(
        self,
        routes: RoutingTrace | Mapping[Any, RoutingTrace],
        *,
        strict: bool | None = None,
    ) -> Iterator[None]:
        """Make every router use the ids of `routes` for its (micro-batch, layer).

        `routes` is one trace (for micro-batch 0) or a mapping micro-batch -> trace.
        Each trace must match the layout (experts, top_k, routed layers); its leading
        axes must hold as many rows as the router sees tokens.
        """
        by_batch = self.check_routes(routes)
        previous_strict = self.strict
        if strict is not None:
            self.strict = strict
        try:
            with self._context(Mode.REPLAY, routes=by_batch) as context_routes:
                yield
                if self.strict and self._attachment.routers and not context_routes.any_routed:
                    raise ReplayError(
                        f"{self.label + ': ' if self.label else ''}no router asked this "
                        "controller for ids during replay(): nothing was replayed. The "
                        "model ran without this controller's routers (it was detached, or "
                        "another attach replaced its patches), or no forward ran inside "
                        "the context."
                    )
        finally:
            self.strict = previous_strict

    @property
    def context_serial(self) -> int:
        """Counts record/replay contexts entered: adapters that keep per-step state (a
        forward counter per model chunk) reset it when this changes."""
        return self._serial

    @property
    def current_micro_batch(self) -> MicroBatch:
        """The micro-batch key router calls are attributed to now."""
        return self._micro_batch

    @contextmanager
    def micro_batch(
        self,
        key: MicroBatch,
        token_shape: tuple[int, ...] | None = None,
        padding: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Route the enclosed forward (and its recompute) as micro-batch `key`.

        `token_shape` (e.g. `(batch, seq)`) shapes the recorded trace's token axes;
        `padding [*token_shape]` marks tokens to record as -1.
        """
        previous = (self._micro_batch, self._tokens)
        self.set_micro_batch(key, token_shape, padding)
        try:
            yield
        finally:
            self._micro_batch, self._tokens = previous

    def set_micro_batch(
        self,
        key: MicroBatch,
        token_shape: tuple[int, ...] | None = None,
        padding: torch.Tensor | None = None,
    ) -> None:
        """Publish the micro-batch now running, for schedules that cannot use a `with`."""
        self._micro_batch = key
        self.set_tokens(token_shape, padding)

    def set_tokens(
        self,
        token_shape: tuple[int, ...] | None,
        padding: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> None:
        """Publish the token axes, padding and token ids of the forward now running; the
        micro-batch key stays. Adapters call this from a model's pre-forward hook.

        In replay, the micro-batch's trace is checked against them here, once per
        forward: its token axes, that padding holds no route, and that its token ids
        (engine traces carry them) are the batch's, position by position. A second
        forward of other tokens under one micro-batch key is an error in record and
        replay alike: recompute runs the same tokens again, a new batch needs its key.
        """
        if token_shape is None:
            self._tokens = None
            return
        if token_ids is not None and self._mode is not Mode.OFF:
            # A copy: a reused input buffer must not change what was recorded or compared.
            token_ids = token_ids.detach().clone()
        tokens = Tokens(tuple(token_shape), padding, token_ids)
        if token_ids is not None and self._mode is not Mode.OFF:
            self._check_same_batch(tokens)
        # With only a shape to go on, the routers' own checks name the layer as well.
        if self._mode is Mode.REPLAY and (padding is not None or token_ids is not None):
            trace = self._context_routes.routes.get(self._micro_batch)
            if trace is not None:
                check_batch(trace, tokens, self._where())
        self._tokens = tokens

    # -- attachment -----------------------------------------------------------------------

    def check_routes(
        self,
        routes: RoutingTrace | Mapping[Any, RoutingTrace],
        *,
        micro_batches: Iterable[MicroBatch] | None = None,
        layers: Iterable[int] | None = None,
        rows: int | None = None,
    ) -> dict[MicroBatch, RoutingTrace]:
        """What `replay(routes)` checks on entry (each trace against the layout, its ids
        if written since), without entering it; returns micro-batch -> trace.

        For schedules that must not fail halfway (a pipeline rank failing mid-schedule
        leaves its peers waiting), also what a strict replay would otherwise find
        missing only when a router asks: with `micro_batches` (those the schedule
        runs), routes for exactly those; for each, every one of `layers` (default: the
        routers attached to this controller); with `rows`, one row per token of each
        micro-batch.
        """
        by_batch = dict(routes) if isinstance(routes, Mapping) else {DEFAULT_MICRO_BATCH: routes}
        try:
            for micro_batch, trace in by_batch.items():
                _check_replayable(trace, self.layout, micro_batch)
            if micro_batches is not None or layers is not None or rows is not None:
                wanted = sorted(self._attachment.routers) if layers is None else list(layers)
                scheduled = list(by_batch) if micro_batches is None else list(micro_batches)
                _check_coverage(by_batch, scheduled, wanted, rows, self.strict)
        except ReplayError as error:
            if not self.label:
                raise
            raise ReplayError(f"{self.label}: {error}") from error
        return by_batch

    def check_tokens_of(
        self,
        trace: RoutingTrace,
        token_ids: torch.Tensor,
        micro_batch: MicroBatch,
        *,
        sequence_first: bool = False,
    ) -> None:
        """Raise unless `trace` was recorded for `token_ids [batch, seq]` (see
        `check_tokens`); errors name `micro_batch`."""
        if check_trace_tokens(trace, token_ids, self._where(micro_batch), sequence_first):
            self._verified.add(trace)

    def check_tokens(self, token_ids: torch.Tensor, *, sequence_first: bool = False) -> None:
        """In replay, check the running micro-batch's trace against the model's input
        ids `token_ids [batch, seq]`: for adapters whose routers see only hidden states
        (megatron-core), called where the ids are (a chunk's forward).

        `sequence_first`: the trace is `[seq, batch]`, as Megatron's routers see tokens.
        A trace of another token count is this rank's sequence-parallel piece of the
        ids, which the ids cannot be compared with: it is left to the routers' checks.
        """
        trace = self._context_routes.routes.get(self._micro_batch)
        # Checked before the schedule (rr_megatron.check_routes): no host copy per forward.
        if trace is not None and trace not in self._verified:
            self.check_tokens_of(trace, token_ids, self._micro_batch, sequence_first=sequence_first)

    def add_router(self, layer: int) -> None:
        """An adapter attached a router of global `layer` to this controller: a strict
        replay in which none of them asks for ids is then an error."""
        self._attachment.add_router(layer)

    def limit_routers(self, layers: Iterable[int]) -> None:
        """Of the routers attached, only global `layers` run in this process (one
        pipeline rank's stages of a model attached whole)."""
        self._attachment.limit_routers(layers)

    def on_detach(self, undo: Callable[[], None]) -> None:
        """Register what `detach()` must undo (an adapter's hooks and patches)."""
        self._attachment.on_undo(undo)

    @property
    def attached(self) -> bool:
        """Whether an adapter's patches or hooks are in place (until `detach()`)."""
        return self._attachment.changed

    def detach(self) -> None:
        """Undo every adapter change to the model, last first; the model is as before."""
        if self._mode is not Mode.OFF:
            raise ReplayError(f"Cannot detach inside a {self._mode.value} context.")
        self._attachment.undo()

    def last_ids(self, layer: int) -> torch.Tensor:
        """`[tokens, top_k]` ids global `layer` used in its latest router call."""
        try:
            return self._last_ids[layer]
        except KeyError:
            raise ReplayError(
                f"Layer {layer} has not routed through this controller yet."
            ) from None

    # -- the router's call --------------------------------------------------------------

    def route(
        self,
        layer: int,
        logits: torch.Tensor,
        spec: RouterSpec,
        bias: torch.Tensor | None = None,
    ) -> Routing:
        """Ids and gate weights for `logits [tokens, experts]` of global `layer`."""
        scores = RouterScores(logits, spec)
        ids = self.choose(layer, scores.native_ids(bias), logits.shape[-1])
        return Routing(scores.gate_weights(ids), ids)

    def choose(self, layer: int, native: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The ids `[tokens, top_k]` (int64) global `layer` routes to.

        `native [tokens, top_k]` is the router's own choice, computed without autograd.
        Off: `native`. Record: `native`, kept. Replay: the trace's ids, `native` for -1
        rows. A (micro-batch, layer) seen before in this context gets the same ids again.
        For adapters whose framework computes the gate weights itself (megatron-core);
        `route` is this plus `gate_weights`.
        """
        ids = self._choose(layer, native, num_experts)
        self._last_ids[layer] = ids
        return ids

    def _choose(self, layer: int, native: torch.Tensor, num_experts: int) -> torch.Tensor:
        if self._mode is Mode.OFF:
            return native
        if layer not in self._routed_layers:
            raise ReplayError(
                f"A router reported global layer {layer}, which does not route in the "
                f"{self.layout.family} layout (routed: {_short(self.layout.moe_layers)}). "
                "The adapter's layer numbering is off (Megatron's is 1-based)."
            )
        key = (self._micro_batch, layer)
        return self._context_routes.choose(key, native, num_experts, self._tokens)

    def _check_same_batch(self, tokens: Tokens) -> None:
        """A second forward under one micro-batch key must run the same token ids (only
        publications that carry ids take part: the adapter's, once per forward)."""
        first = self._context_routes.first_forward(self._micro_batch, tokens)
        if first is not tokens:
            check_same_tokens(first, tokens, self._where(), self._mode.value)

    def _where(self, micro_batch: MicroBatch | None = None) -> str:
        key = self._micro_batch if micro_batch is None else micro_batch
        where = f"micro-batch {key!r}"
        return f"{self.label}, {where}" if self.label else where[0].upper() + where[1:]

    # -- statistics -------------------------------------------------------------------

    def stats(self) -> dict[int, LayerStats]:
        """Per global layer, what the last record/replay context did."""
        return self._counts.per_layer()

    def totals(self) -> LayerStats:
        """`stats()` summed over layers."""
        return self._counts.total()

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _context(
        self,
        mode: Mode,
        routes: dict[MicroBatch, RoutingTrace] | None = None,
        recording: Recording | None = None,
    ) -> Iterator[ContextRoutes]:
        if self._mode is not Mode.OFF:
            raise ReplayError(
                f"Cannot enter {mode.value} mode: this controller is already in "
                f"{self._mode.value} mode. Contexts do not nest."
            )
        self._mode = mode
        self._serial += 1
        self._counts = RouteCounts()
        context_routes = ContextRoutes(
            self.layout.num_experts,
            self._counts,
            routes=routes,
            recording=recording,
            strict=self.strict,
        )
        self._context_routes = context_routes
        entry_micro_batch = (self._micro_batch, self._tokens)
        try:
            yield context_routes
            context_routes.close()
        finally:
            # Whatever happened inside, leave nothing behind for the next step; the
            # counts stay readable until the next context.
            self._mode = Mode.OFF
            self._context_routes = ContextRoutes(self.layout.num_experts, self._counts)
            self._micro_batch, self._tokens = entry_micro_batch


def _check_replayable(trace: RoutingTrace, layout: MoELayout, micro_batch: MicroBatch) -> None:
    """Re-check a trace on entry to replay, naming the micro-batch in any error."""
    if not isinstance(trace, RoutingTrace):
        raise ReplayError(
            f"Micro-batch {micro_batch!r}: replay() takes RoutingTrace objects, "
            f"found {type(trace).__name__}."
        )
    try:
        trace.check_layout(layout)
        # The ids tensor is mutable: catch anything written into it after construction
        # (zeros written over padding, say), at no cost for traces nobody wrote to.
        trace.recheck()
    except TraceError as error:
        raise ReplayError(f"Micro-batch {micro_batch!r}: {error}") from error


def _check_coverage(
    routes: dict[MicroBatch, RoutingTrace],
    micro_batches: list[MicroBatch],
    layers: list[int],
    rows: int | None,
    strict: bool,
) -> None:
    """Routes for exactly `micro_batches`, each with `layers` (when strict) and `rows`."""
    extra = [mb for mb in routes if mb not in micro_batches]
    if extra:
        raise ReplayError(
            f"Routes were given for micro-batch {extra[0]!r}, which the schedule does not "
            f"run (it runs {list(micro_batches)}). Key routes by micro-batch index."
        )
    for micro_batch in micro_batches:
        trace = routes.get(micro_batch)
        if trace is None:
            if strict and layers:
                raise ReplayError(
                    f"Layer {layers[0]}, micro-batch {micro_batch!r}: no routes were given for "
                    f"this micro-batch (routes given for {list(routes)})."
                )
            continue
        missing = [layer for layer in layers if layer not in trace.layers]
        if strict and missing:
            raise ReplayError(
                f"Layer {missing[0]}, micro-batch {micro_batch!r}: the routes have no layer "
                f"{missing[0]} (they cover {_short(trace.layers)}); the routers here route "
                f"{_short(layers)}."
            )
        if rows is not None and layers and trace.num_rows != rows:
            raise ReplayError(
                f"Layer {layers[0]}, micro-batch {micro_batch!r}: the routes hold "
                f"{trace.num_rows} rows (token axes {list(trace.token_shape)}) but the "
                f"micro-batch is {rows} tokens."
            )
