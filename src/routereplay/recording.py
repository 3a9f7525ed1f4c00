"""What a `record()` context captured, and what adapters tell the controller about the
tokens now running (their axes and padding), from which recorded traces take shape."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from routereplay.errors import ReplayError, TraceError
from routereplay.trace import NO_ROUTE, RoutingTrace

MicroBatch = Hashable


@dataclass(frozen=True)
class Tokens:
    """What an adapter knows of the tokens now running: their axes and which are padding.

    token_shape: the token axes, e.g. `(batch, seq)`; a recorded trace takes them.
    padding: bool `[*token_shape]`, True for padding tokens, recorded as -1 (no route).
    ids:     the token ids `[*token_shape]` (the model's `input_ids`), when the adapter sees
             them: replay checks them against the trace's, recording keeps them.
    """

    token_shape: tuple[int, ...]
    padding: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("padding", "ids"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != self.token_shape:
                raise ReplayError(
                    f"The {'padding mask' if name == 'padding' else 'token ids'} have shape "
                    f"{tuple(value.shape)}, the token axes {self.token_shape}."
                )

    def known_ids(self) -> torch.Tensor | None:
        """`ids` with padding as -1 (unknown), on the host: what a trace keeps."""
        if self.ids is None:
            return None
        ids = self.ids.detach().to("cpu", torch.int64)
        if self.padding is not None:
            ids = ids.masked_fill(self.padding.to("cpu"), -1)
        return ids


class Recording:
    """The routes a `record()` context captured, assembled per micro-batch on demand."""

    def __init__(self, num_experts: int, source: str) -> None:
        self._num_experts = num_experts
        self._source = source
        self._ids: dict[tuple[MicroBatch, int], torch.Tensor] = {}
        self._tokens: dict[MicroBatch, Tokens] = {}

    def note_tokens(self, micro_batch: MicroBatch, tokens: Tokens) -> None:
        """The tokens micro-batch `micro_batch` ran (its first forward's): the recorded
        trace's token axes and token ids."""
        self._tokens.setdefault(micro_batch, tokens)

    def keep(self, ids: dict[tuple[MicroBatch, int], torch.Tensor]) -> None:
        """The ids `[tokens, top_k]` each (micro-batch, layer) routed, at context exit."""
        self._ids = dict(ids)

    @property
    def micro_batches(self) -> list[MicroBatch]:
        """The micro-batch keys recorded, in the order they first routed."""
        return list(dict.fromkeys(mb for mb, _ in self._ids))

    @property
    def traces(self) -> dict[MicroBatch, RoutingTrace]:
        """One trace per micro-batch: `[*token_shape, recorded layers, top_k]`."""
        return {mb: self.trace_for(mb) for mb in self.micro_batches}

    @property
    def trace(self) -> RoutingTrace:
        """The trace of the only micro-batch recorded."""
        batches = self.micro_batches
        if len(batches) != 1:
            raise TraceError(
                f"This recording holds {len(batches)} micro-batches ({batches}); "
                "use .traces or .trace_for(micro_batch)."
            )
        return self.trace_for(batches[0])

    def trace_for(self, micro_batch: MicroBatch) -> RoutingTrace:
        """The trace of `micro_batch`: `[*token_shape, recorded layers, top_k]`, padding
        as -1, with the batch's token ids when the adapter published them."""
        layers = sorted(layer for mb, layer in self._ids if mb == micro_batch)
        if not layers:
            raise TraceError(f"Nothing was recorded for micro-batch {micro_batch!r}.")
        per_layer = [self._ids[(micro_batch, layer)] for layer in layers]
        rows = {ids.shape[0] for ids in per_layer}
        if len(rows) != 1:
            raise TraceError(
                f"Micro-batch {micro_batch!r} routed different token counts on different "
                f"layers ({sorted(rows)}): it was not one micro-batch."
            )
        experts = torch.stack([ids.cpu() for ids in per_layer], dim=1)  # [tokens, layers, k]
        tokens = self._tokens.get(micro_batch)
        if tokens is None:
            return RoutingTrace(experts, tuple(layers), self._num_experts, self._source)
        experts = experts.reshape(*tokens.token_shape, *experts.shape[1:])
        if tokens.padding is not None:  # padding has no route
            experts = experts.masked_fill(tokens.padding.to("cpu")[..., None, None], NO_ROUTE)
        return RoutingTrace(
            experts, tuple(layers), self._num_experts, self._source, tokens.known_ids()
        )
