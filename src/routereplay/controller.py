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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routereplay.batch_check import check_batch, check_token_ids
from routereplay.errors import ReplayError, TraceError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.recording import MicroBatch, Recording, Tokens
from routereplay.routing import RouterScores, RouterSpec, Routing
from routereplay.trace import NO_ROUTE, RoutingTrace, storage_dtype

DEFAULT_MICRO_BATCH: MicroBatch = 0


class Mode(enum.Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


@dataclass(frozen=True)
class LayerStats:
    """Rows one layer routed during the last `record()` or `replay()` context.

    replayed:   rows whose ids came from the trace.
    native:     rows routed by the live router (-1 rows, or every row when recording).
    disagreed:  replayed rows where the live router would have chosen a different set
                of experts: the counterfactual disagreement, the health signal of replay.
    recomputed: rows seen again for a (micro-batch, layer) already routed (recompute).
    """

    replayed: int = 0
    native: int = 0
    disagreed: int = 0
    recomputed: int = 0

    @property
    def disagreement_rate(self) -> float:
        return self.disagreed / self.replayed if self.replayed else 0.0


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
        self.strict = strict
        self.source = source
        # Where this controller runs ("pp_rank 1"), prefixed to the errors of replay().
        self.label = label
        self._mode = Mode.OFF
        self._micro_batch: MicroBatch = DEFAULT_MICRO_BATCH
        self._tokens: Tokens | None = None
        self._routes: dict[MicroBatch, RoutingTrace] = {}
        self._recording: Recording | None = None
        # Ids already decided in this context, for recompute: every key when recording,
        # only keys with natively routed rows when replaying (the rest is in the trace).
        self._decided: dict[tuple[MicroBatch, int], torch.Tensor] = {}
        self._visited: set[tuple[MicroBatch, int]] = set()
        self._counts: dict[int, list[int | torch.Tensor]] = {}
        self._routed_layers = frozenset(layout.moe_layers) | frozenset(layout.mtp_layers)
        # The ids each layer used last, for losses computed after the forward (aux loss).
        self._last_ids: dict[int, torch.Tensor] = {}
        self._detachers: list[Callable[[], None]] = []
        # Routers adapters ever attached (kept after detach: replaying then is an error).
        self._routers: set[int] = set()
        self._serial = 0
        # Traces whose token ids were checked against their batch's already.
        self._verified: weakref.WeakSet[RoutingTrace] = weakref.WeakSet()
        # The tokens of each micro-batch's first forward in this context.
        self._forwards: dict[MicroBatch, Tokens] = {}

    # -- modes --------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Route natively and keep every (micro-batch, layer)'s ids.

        Yields a `Recording`; read `.trace` (or `.traces`) after the forward.
        """
        recording = Recording(self.layout.num_experts, self.source)
        with self._context(Mode.RECORD):
            self._recording = recording
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
            with self._context(Mode.REPLAY):
                self._routes = by_batch
                yield
                if self.strict and self._routers and not self._visited:
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
            trace = self._routes.get(self._micro_batch)
            if trace is not None:
                check_batch(trace, tokens, self._where())
        self._tokens = tokens

    # -- attachment -----------------------------------------------------------------------

    def check_routes(
        self, routes: RoutingTrace | Mapping[Any, RoutingTrace]
    ) -> dict[MicroBatch, RoutingTrace]:
        """What `replay(routes)` checks on entry (each trace against the layout, its ids
        if written since), without entering it; returns micro-batch -> trace."""
        by_batch = dict(routes) if isinstance(routes, Mapping) else {DEFAULT_MICRO_BATCH: routes}
        for micro_batch, trace in by_batch.items():
            try:
                _check_replayable(trace, self.layout, micro_batch)
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
        if trace.tokens is None or token_ids.numel() != trace.num_rows:
            return
        expected = trace.tokens
        if sequence_first and expected.ndim == 2:
            expected = expected.t()  # compare, and name positions, batch-first
        if expected.ndim > 1 and tuple(expected.shape) != tuple(token_ids.shape):
            order = "sequence-first (rr_megatron.sequence_first)" if sequence_first else "so"
            raise ReplayError(
                f"{self._where(micro_batch)}: the batch's input ids are {list(token_ids.shape)}; "
                f"the trace's token axes are {list(trace.token_shape)}: lay the trace out "
                f"{order}, as the model sees the batch."
            )
        check_token_ids(expected, token_ids.reshape(expected.shape), self._where(micro_batch))
        self._verified.add(trace)

    def check_tokens(self, token_ids: torch.Tensor, *, sequence_first: bool = False) -> None:
        """In replay, check the running micro-batch's trace against the model's input
        ids `token_ids [batch, seq]`: for adapters whose routers see only hidden states
        (megatron-core), called where the ids are (a chunk's forward).

        `sequence_first`: the trace is `[seq, batch]`, as Megatron's routers see tokens.
        A trace of another token count is this rank's sequence-parallel piece of the
        ids, which the ids cannot be compared with: it is left to the routers' checks.
        """
        trace = self._routes.get(self._micro_batch) if self._mode is Mode.REPLAY else None
        # Checked before the schedule (rr_megatron.check_routes): no host copy per forward.
        if trace is not None and trace not in self._verified:
            self.check_tokens_of(trace, token_ids, self._micro_batch, sequence_first=sequence_first)

    def add_router(self, layer: int) -> None:
        """An adapter attached a router of global `layer` to this controller: a strict
        replay in which none of them asks for ids is then an error."""
        self._routers.add(layer)

    def limit_routers(self, layers: Iterable[int]) -> None:
        """Of the routers attached, only global `layers` run in this process (one
        pipeline rank's stages of a model attached whole)."""
        self._routers &= set(layers)

    def on_detach(self, undo: Callable[[], None]) -> None:
        """Register what `detach()` must undo (an adapter's hooks and patches)."""
        self._detachers.append(undo)

    def detach(self) -> None:
        """Undo every adapter change to the model, last first; the model is as before."""
        if self._mode is not Mode.OFF:
            raise ReplayError(f"Cannot detach inside a {self._mode.value} context.")
        while self._detachers:
            self._detachers.pop()()

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
        if key in self._visited:
            return self._choose_again(key, native, num_experts)
        self._visited.add(key)
        if self._mode is Mode.RECORD:
            self._decided[key] = self._recorded(native, key)
            self._count(layer, native=native.shape[0])
            return native
        return self._replay(key, native, num_experts)

    def _check_same_batch(self, tokens: Tokens) -> None:
        """A second forward under one micro-batch key must run the same token ids (only
        publications that carry ids take part: the adapter's, once per forward)."""
        assert tokens.ids is not None
        first = self._forwards.setdefault(self._micro_batch, tokens)
        if first is tokens:
            return
        assert first.ids is not None
        if first.ids.numel() != tokens.ids.numel():
            found = f"{tokens.ids.numel()} tokens, the first forward's {first.ids.numel()}"
        elif not torch.equal(first.ids.reshape(-1).to(tokens.ids.device), tokens.ids.reshape(-1)):
            differ = first.ids.reshape(-1).to(tokens.ids.device) != tokens.ids.reshape(-1)
            position = int(differ.nonzero()[0])
            found = (
                f"token {int(tokens.ids.reshape(-1)[position])} at flat position {position}, "
                f"where the first forward had {int(first.ids.reshape(-1)[position])}"
            )
        else:
            return
        generation = (
            " model.generate() runs a forward per new token: record generation with "
            "routereplay.engines.hf.RecordingEngine."
            if self._mode is Mode.RECORD
            else ""
        )
        raise ReplayError(
            f"{self._where()}: a second forward runs other tokens ({found}) under the same "
            f"micro-batch key in one {self._mode.value} context: its routers would get the "
            "first batch's ids as if recomputing. Run each batch under its own "
            f"controller.micro_batch(key), or one context per batch.{generation}"
        )

    def _where(self, micro_batch: MicroBatch | None = None) -> str:
        key = self._micro_batch if micro_batch is None else micro_batch
        where = f"micro-batch {key!r}"
        return f"{self.label}, {where}" if self.label else where[0].upper() + where[1:]

    # -- statistics -------------------------------------------------------------------

    def stats(self) -> dict[int, LayerStats]:
        """Per global layer, what the last record/replay context did."""
        return {
            layer: LayerStats(*(int(v) for v in counts))
            for layer, counts in sorted(self._counts.items())
        }

    def totals(self) -> LayerStats:
        """`stats()` summed over layers."""
        per_layer = list(self.stats().values())
        return LayerStats(
            *(sum(getattr(s, f) for s in per_layer) for f in LayerStats.__annotations__)
        )

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _context(self, mode: Mode) -> Iterator[None]:
        if self._mode is not Mode.OFF:
            raise ReplayError(
                f"Cannot enter {mode.value} mode: this controller is already in "
                f"{self._mode.value} mode. Contexts do not nest."
            )
        self._mode = mode
        self._serial += 1
        self._counts = {}
        entry_micro_batch = (self._micro_batch, self._tokens)
        try:
            yield
            if self._recording is not None:
                self._recording.keep(self._decided)
        finally:
            # Whatever happened inside, leave nothing behind for the next step.
            self._mode = Mode.OFF
            self._routes = {}
            self._recording = None
            self._decided = {}
            self._visited = set()
            self._forwards = {}
            self._micro_batch, self._tokens = entry_micro_batch

    def _recorded(self, ids: torch.Tensor, key: tuple[MicroBatch, int]) -> torch.Tensor:
        """Compact copy of `ids [tokens, top_k]` to keep; the recording marks padding
        rows -1 when it is read (a recompute must get the native ids, padding too)."""
        kept = ids.detach().to(storage_dtype(self.layout.num_experts))
        tokens = self._tokens
        if tokens is None:
            return kept
        if int(np.prod(tokens.token_shape)) != ids.shape[0]:
            raise ReplayError(
                f"Layer {key[1]}, micro-batch {key[0]!r}: the router sees {ids.shape[0]} tokens "
                f"but the token shape published for this forward is {list(tokens.token_shape)}."
            )
        if self._recording is not None:
            self._recording.note_tokens(key[0], tokens)
        return kept

    def _replay(
        self, key: tuple[MicroBatch, int], native: torch.Tensor, num_experts: int
    ) -> torch.Tensor:
        micro_batch, layer = key
        found = self._target(micro_batch, layer, native, num_experts)
        if found is None:  # not strict and nothing to replay: native, and counted.
            self._decided[key] = native.to(storage_dtype(self.layout.num_experts))
            self._count(layer, native=native.shape[0])
            return native
        target, has_native_rows = found
        replayed = target[:, 0] != NO_ROUTE  # [tokens]
        ids = torch.where(replayed[:, None], target, native)
        if has_native_rows:
            # Native rows must not drift on recompute: keep what they chose now.
            self._decided[key] = ids.to(storage_dtype(self.layout.num_experts))
        # Ids in a row are distinct: the sets differ iff some id is not a native choice.
        chosen = torch.zeros(
            (native.shape[0], num_experts), dtype=torch.bool, device=native.device
        ).scatter_(1, native, True)
        differs = ~chosen.gather(1, ids).all(-1)
        self._count(
            layer,
            replayed=replayed.sum(),
            native=(~replayed).sum(),
            disagreed=differs.sum(),  # native rows agree with themselves by construction
        )
        return ids

    def _choose_again(
        self, key: tuple[MicroBatch, int], native: torch.Tensor, num_experts: int
    ) -> torch.Tensor:
        """Recompute of a key already routed in this context: the same ids as before."""
        decided = self._decided.get(key)
        if decided is None:  # replay with every row replayed: the trace is the record
            found = self._target(key[0], key[1], native, num_experts)
            assert found is not None  # a missing target was decided natively and kept
            ids = found[0]
        else:
            ids = decided.to(native.device).long()
        _check_tokens(ids.shape[0], native.shape[0], key)
        self._count(key[1], recomputed=native.shape[0])
        return ids

    def _target(
        self, micro_batch: MicroBatch, layer: int, native: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, bool] | None:
        """`[tokens, top_k]` int64 ids for (micro_batch, layer) on the router's device and
        whether any row is -1 (routed natively), or None (non-strict, absent)."""
        trace = self._routes.get(micro_batch)
        if trace is None or layer not in trace.layers:
            if not self.strict:
                return None
            if trace is None:
                raise ReplayError(
                    f"Layer {layer}, micro-batch {micro_batch!r}: no routes were given for "
                    f"this micro-batch (routes given for {list(self._routes)}). Pass a "
                    "mapping micro-batch -> trace to replay(), and run each micro-batch "
                    "under controller.micro_batch(key)."
                )
            raise ReplayError(
                f"Layer {layer}, micro-batch {micro_batch!r}: the trace has no routes for "
                f"this layer (it covers {_short(trace.layers)}). A trace must cover every "
                "routed layer the model runs; use replay(..., strict=False) to route "
                "missing layers natively on purpose."
            )
        experts = trace.layer_experts(layer).reshape(-1, trace.top_k)
        _check_tokens(experts.shape[0], native.shape[0], (micro_batch, layer), trace)
        if num_experts != trace.num_experts or native.shape[-1] != trace.top_k:
            raise ReplayError(
                f"Layer {layer}, micro-batch {micro_batch!r}: the router has "
                f"{num_experts} experts and top_k={native.shape[-1]}; the trace has "
                f"{trace.num_experts} experts and top_k={trace.top_k}."
            )
        # Asked of the trace where it lives (the host, usually), not of the device copy:
        # a device-to-host read per router call would stall the GPU's queue.
        has_native_rows = bool((experts[:, 0] == NO_ROUTE).any())
        return experts.to(native.device, non_blocking=True).long(), has_native_rows

    def _count(
        self,
        layer: int,
        replayed: int | torch.Tensor = 0,
        native: int | torch.Tensor = 0,
        disagreed: int | torch.Tensor = 0,
        recomputed: int | torch.Tensor = 0,
    ) -> None:
        # Tensor counts stay on the router's device (no host sync inside the forward);
        # plain ints stay ints, so recording costs no tensor op per layer.
        counts = self._counts.setdefault(layer, [0, 0, 0, 0])
        for slot, value in enumerate((replayed, native, disagreed, recomputed)):
            counts[slot] = counts[slot] + value


def _check_tokens(
    rows: int,
    tokens: int,
    key: tuple[MicroBatch, int],
    trace: RoutingTrace | None = None,
) -> None:
    if rows != tokens:
        micro_batch, layer = key
        shape = f" (token axes {list(trace.token_shape)})" if trace is not None else ""
        raise ReplayError(
            f"Layer {layer}, micro-batch {micro_batch!r}: the router sees {tokens} "
            f"tokens but the routes hold {rows} rows{shape}. Align the trace to the "
            "trainer's batch (padding, packing, micro-batch split) before replay."
        )


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
