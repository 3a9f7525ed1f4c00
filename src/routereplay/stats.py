"""What routing did in one record or replay context, per global layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        """`disagreed / replayed`: the share of replayed rows the live router would route
        elsewhere (0 when nothing was replayed)."""
        return self.disagreed / self.replayed if self.replayed else 0.0


class RouteCounts:
    """Running `LayerStats` counts of one context, per global layer.

    Tensor counts stay on the router's device (no host sync inside the forward); plain
    ints stay ints, so recording costs no tensor op per layer. They become ints when
    read, after the forward.
    """

    def __init__(self) -> None:
        self._counts: dict[int, list[int | torch.Tensor]] = {}

    def add(
        self,
        layer: int,
        replayed: int | torch.Tensor = 0,
        native: int | torch.Tensor = 0,
        disagreed: int | torch.Tensor = 0,
        recomputed: int | torch.Tensor = 0,
    ) -> None:
        counts = self._counts.setdefault(layer, [0, 0, 0, 0])
        for slot, value in enumerate((replayed, native, disagreed, recomputed)):
            counts[slot] = counts[slot] + value

    def per_layer(self) -> dict[int, LayerStats]:
        return {
            layer: LayerStats(*(int(v) for v in counts))
            for layer, counts in sorted(self._counts.items())
        }

    def total(self) -> LayerStats:
        per_layer = list(self.per_layer().values())
        return LayerStats(
            *(sum(getattr(s, f) for s in per_layer) for f in LayerStats.__annotations__)
        )
