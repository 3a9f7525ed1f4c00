"""`ContextRoutes`: the routes given to one record or replay context and the ids it
decided, keyed by (micro-batch, global layer).

A key routed again in the same context (activation recompute, any pipeline
schedule) gets the ids decided the first time, never a fresh choice. A new context
starts from a new `ContextRoutes`, so nothing leaks from one step into the next.
"""

from __future__ import annotations

import numpy as np
import torch

from routereplay.errors import ReplayError
from routereplay.errors import short_ids as _short
from routereplay.recording import MicroBatch, Recording, Tokens
from routereplay.stats import RouteCounts
from routereplay.trace import NO_ROUTE, RoutingTrace, storage_dtype

Key = tuple[MicroBatch, int]


class ContextRoutes:
    """Decides the ids of every (micro-batch, layer) of one context.

    routes:    micro-batch -> trace to replay (empty when recording).
    recording: where a record context keeps its ids (None when replaying).
    strict:    a (micro-batch, layer) without routes is an error, not native routing.
    """

    def __init__(
        self,
        num_experts: int,
        counts: RouteCounts,
        *,
        routes: dict[MicroBatch, RoutingTrace] | None = None,
        recording: Recording | None = None,
        strict: bool = True,
    ) -> None:
        self.routes = routes or {}
        self.recording = recording
        self.strict = strict
        self._counts = counts
        self._dtype = storage_dtype(num_experts)
        # Ids already decided, for recompute: every key when recording, only keys with
        # natively routed rows when replaying (the rest is in the trace).
        self._decided: dict[Key, torch.Tensor] = {}
        self._visited: set[Key] = set()
        # The tokens of each micro-batch's first forward.
        self._forwards: dict[MicroBatch, Tokens] = {}

    @property
    def any_routed(self) -> bool:
        """Whether any router asked for ids in this context."""
        return bool(self._visited)

    def first_forward(self, micro_batch: MicroBatch, tokens: Tokens) -> Tokens:
        """The tokens of `micro_batch`'s first forward in this context (`tokens` if
        this is it)."""
        return self._forwards.setdefault(micro_batch, tokens)

    def choose(
        self, key: Key, native: torch.Tensor, num_experts: int, tokens: Tokens | None
    ) -> torch.Tensor:
        """The ids `[tokens, top_k]` (int64) for `key`, given the router's own choice
        `native [tokens, top_k]` and the tokens published for this forward."""
        if key in self._visited:
            return self._choose_again(key, native, num_experts)
        self._visited.add(key)
        if self.recording is not None:
            self._decided[key] = self._recorded(native, key, tokens)
            self._counts.add(key[1], native=native.shape[0])
            return native
        return self._replay(key, native, num_experts)

    def close(self) -> None:
        """The context ended normally: a recording keeps what was decided."""
        if self.recording is not None:
            self.recording.keep(self._decided)

    def _recorded(self, ids: torch.Tensor, key: Key, tokens: Tokens | None) -> torch.Tensor:
        """Compact copy of `ids [tokens, top_k]` to keep; the recording marks padding
        rows -1 when it is read (a recompute must get the native ids, padding too)."""
        kept = ids.detach().to(self._dtype)
        if tokens is None:
            return kept
        if int(np.prod(tokens.token_shape)) != ids.shape[0]:
            raise ReplayError(
                f"Layer {key[1]}, micro-batch {key[0]!r}: the router sees {ids.shape[0]} tokens "
                f"but the token shape published for this forward is {list(tokens.token_shape)}."
            )
        assert self.recording is not None
        self.recording.note_tokens(key[0], tokens)
        return kept

    def _replay(self, key: Key, native: torch.Tensor, num_experts: int) -> torch.Tensor:
        micro_batch, layer = key
        found = self._target(micro_batch, layer, native, num_experts)
        if found is None:  # not strict and nothing to replay: native, and counted.
            self._decided[key] = native.to(self._dtype)
            self._counts.add(layer, native=native.shape[0])
            return native
        target, has_native_rows = found
        replayed = target[:, 0] != NO_ROUTE  # [tokens]
        ids = torch.where(replayed[:, None], target, native)
        if has_native_rows:
            # Native rows must not drift on recompute: keep what they chose now.
            self._decided[key] = ids.to(self._dtype)
        # Ids in a row are distinct: the sets differ iff some id is not a native choice.
        chosen = torch.zeros(
            (native.shape[0], num_experts), dtype=torch.bool, device=native.device
        ).scatter_(1, native, True)
        differs = ~chosen.gather(1, ids).all(-1)
        self._counts.add(
            layer,
            replayed=replayed.sum(),
            native=(~replayed).sum(),
            disagreed=differs.sum(),  # native rows agree with themselves by construction
        )
        return ids

    def _choose_again(self, key: Key, native: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Recompute of a key already routed in this context: the same ids as before."""
        decided = self._decided.get(key)
        if decided is None:  # replay with every row replayed: the trace is the record
            found = self._target(key[0], key[1], native, num_experts)
            assert found is not None  # a missing target was decided natively and kept
            ids = found[0]
        else:
            ids = decided.to(native.device).long()
        check_row_count(ids.shape[0], native.shape[0], key)
        self._counts.add(key[1], recomputed=native.shape[0])
        return ids

    def _target(
        self, micro_batch: MicroBatch, layer: int, native: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, bool] | None:
        """`[tokens, top_k]` int64 ids for (micro_batch, layer) on the router's device and
        whether any row is -1 (routed natively), or None (non-strict, absent)."""
        trace = self.routes.get(micro_batch)
        if trace is None or layer not in trace.layers:
            if not self.strict:
                return None
            if trace is None:
                raise ReplayError(
                    f"Layer {layer}, micro-batch {micro_batch!r}: no routes were given for "
                    f"this micro-batch (routes given for {list(self.routes)}). Pass a "
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
        check_row_count(experts.shape[0], native.shape[0], (micro_batch, layer), trace)
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


def check_row_count(rows: int, tokens: int, key: Key, trace: RoutingTrace | None = None) -> None:
    """The routes for `key` must hold one row per token the router sees."""
    if rows != tokens:
        micro_batch, layer = key
        shape = f" (token axes {list(trace.token_shape)})" if trace is not None else ""
        raise ReplayError(
            f"Layer {layer}, micro-batch {micro_batch!r}: the router sees {tokens} "
            f"tokens but the routes hold {rows} rows{shape}. Align the trace to the "
            "trainer's batch (padding, packing, micro-batch split) before replay."
        )
