"""The seed's bug, kept here to be measured: how verl mapped replay routes to Megatron's
routers before the fix.

verl held the routes of the MoE layers (one slot per routed layer, in layer order) and
gave the i-th router of a model chunk the slot `i + offset`, `offset` being the chunk's
first global layer: `get_transformer_layer_offset`, which counts dense layers too. On
a model with a dense prefix every chunk after the first starts too far into the slots,
so its routers take the routes of a later layer, and the last ones point past the end
(nowhere: those routers ran natively). routereplay keys routers by their own global
`layer_number` instead, and misplaces nothing.

This is a demo of a wrong mapping, not library code: nothing outside the demo uses it.
"""

from __future__ import annotations

from typing import Any

import torch

from routereplay.demo.grpo import GRPORun, Scored
from routereplay.demo.trainer import TrainerBatch
from routereplay.layout import MoELayout
from routereplay.metrics import logprob_mismatch, routing_agreement
from routereplay.pipeline_split import PipelineSplit
from routereplay.trace import NO_ROUTE, RoutingTrace


def verl_slots(layout: MoELayout, split: PipelineSplit) -> dict[int, int | None]:
    """Per routed layer (global, 0-based), the routed-layer slot verl's pre-fix code
    replayed into its router, or None where `i + offset` is past the last slot."""
    slots: dict[int, int | None] = {}
    for vp_stage in range(split.vp_size):
        for pp_rank in range(split.pp_size):
            offset = layout.stage_layers(split, pp_rank, vp_stage)[0]  # counts dense layers
            for i, layer in enumerate(layout.stage_moe_layers(split, pp_rank, vp_stage)):
                slot = i + offset
                slots[layer] = slot if slot < len(layout.moe_layers) else None
    return slots


def misplaced_layers(layout: MoELayout, split: PipelineSplit) -> list[int]:
    """Routed layers whose router gets another layer's routes, or none."""
    slots = verl_slots(layout, split)
    return [layer for layer in layout.moe_layers if slots[layer] != layout.moe_ordinal(layer)]


def as_verl_placed(routes: RoutingTrace, layout: MoELayout, split: PipelineSplit) -> RoutingTrace:
    """`routes [..., routed layers, top_k]` relabelled so that each layer holds the ids
    verl gave its router (-1 where it gave none): replaying this trace with routereplay
    runs exactly what verl's mapping ran."""
    slots = verl_slots(layout, split)
    experts = routes.expert_ids()
    placed = torch.full_like(experts, NO_ROUTE)
    for layer in layout.moe_layers:
        slot = slots[layer]
        if slot is not None:
            placed[..., layout.moe_ordinal(layer), :] = experts[..., slot, :]
    return RoutingTrace(placed, layout.moe_layers, layout.num_experts, "verl", routes.tokens)


class VerlMappingAudit:
    """Under R3, each step: replay the engine's routes as verl placed them in the
    trainer's log-prob pass (the update still replays routereplay's), and measure
    where the routes landed and what that does to the trainer/rollout mismatch."""

    def __init__(self, layout: MoELayout, split: PipelineSplit) -> None:
        self.layout, self.split = layout, split

    def __call__(self, run: GRPORun, batch: TrainerBatch, scored: Scored) -> dict[str, Any] | None:
        if run.scheme != "R3":
            return None
        trainer = run.trainer
        routes = as_verl_placed(batch.routes, self.layout, self.split)
        with torch.no_grad(), trainer.expert_inputs() as received, trainer.replay(routes):
            logprobs = trainer.token_logprobs(batch, run.settings.temperature)
        agreement = routing_agreement(batch.routes, received.trace(batch.padding))
        mismatch = logprob_mismatch(logprobs, batch.rollout_logprobs, batch.completion_mask)
        slots = verl_slots(self.layout, self.split)
        misplaced = misplaced_layers(self.layout, self.split)
        return {
            "verl_mapping": {
                "slots": {str(layer): slot for layer, slot in slots.items()},
                "misplaced_layers": misplaced,
                "unplaced_layers": [layer for layer, slot in slots.items() if slot is None],
                "misplaced_share": len(misplaced) / len(self.layout.moe_layers),
                "routing_disagreement": agreement.router_disagreement,
                "routing_per_layer": {str(k): v for k, v in agreement.per_layer.items()},
                "k3_kl": mismatch.k3_kl,
                "mean_abs_delta": mismatch.mean_abs_delta,
            }
        }
