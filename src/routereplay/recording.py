"""What a `record()` context captured, and what adapters tell the controller about the
tokens now running (their axes and padding), from which recorded traces take shape."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

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


def generated_sequence(
    steps: Mapping[Any, RoutingTrace], row: int, padding: int, completion_len: int
) -> RoutingTrace:
    """One sequence's routes from the per-forward recordings of a batched generation,
    in vLLM's convention: `[prompt + completion tokens, layers, top_k]`.

    steps: micro-batch -> trace; 0 the prefill `[batch, prompt width, layers, top_k]`
    (prompts left-padded), t >= 1 decode step t `[batch, 1, layers, top_k]`. The
    sequence is batch row `row`, its prompt after `padding` columns. Its prompt's rows
    come from the prefill, completion token t as forwarded at decode step t + 1, and the
    final token, which sampling never forwards, is -1. Token ids come along where the
    recordings know them (-1 where not).
    """
    prefill = steps[0]
    pieces = [_columns(prefill, row, slice(padding, None))]
    pieces += [_columns(steps[t + 1], row, slice(-1, None)) for t in range(completion_len - 1)]
    if completion_len:  # the final sampled token was never forwarded: no route
        pieces.append(
            (
                torch.full((1, *prefill.experts.shape[-2:]), NO_ROUTE, dtype=prefill.experts.dtype),
                torch.full((1,), -1, dtype=torch.int32),
            )
        )
    experts = torch.cat([experts for experts, _ in pieces])
    tokens = torch.cat([tokens for _, tokens in pieces])
    return prefill.derive(experts, prefill.layers, tokens)


def _columns(trace: RoutingTrace, row: int, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts `[tokens, layers, top_k]` and token ids `[tokens]` of one row's columns."""
    experts = trace.experts[row, columns]
    if trace.tokens is None:
        return experts, torch.full(experts.shape[:1], -1, dtype=torch.int32)
    return experts, trace.tokens[row, columns].to(torch.int32)
