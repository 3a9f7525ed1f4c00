"""Replay inside transformers MoE causal LMs, trainer side: `attach(model)` ->
`ReplayController`.

`attach` (from `routereplay.families.routers`, which the embedded recording engine
uses too) patches every router to ask the controller for ids and gate weights.

Load-balancing loss: transformers' own `aux_loss` recomputes top-k from the router
logits, so under replay it describes the routing the live router *would* choose.
`load_balancing_loss` below counts the routing that actually ran (the replayed ids)
with the same formula; use it when adding an aux loss to a replayed update.
"""

from __future__ import annotations

import torch

from routereplay import routing
from routereplay.controller import ReplayController
from routereplay.errors import LayoutError
from routereplay.families.routers import attach, find_routers

__all__ = ["attach", "find_routers", "load_balancing_loss"]


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    controller: ReplayController,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss of the routing that ran in the latest forward.

    `router_logits`: the model output's `router_logits`, one `[tokens, experts]` per
    routed layer in layer order; `attention_mask [batch, seq]` leaves padding out.
    The expert counts come from the ids the routers used (`controller.last_ids`), see
    `routing.load_balancing_loss`.
    """
    layout = controller.layout
    if len(router_logits) != len(layout.moe_layers):
        raise LayoutError(
            f"Expected router logits for {len(layout.moe_layers)} routed layers, "
            f"found {len(router_logits)}."
        )
    device = router_logits[0].device
    logits = torch.cat([x.to(device) for x in router_logits], dim=0)
    ids = torch.cat([controller.last_ids(layer).to(device) for layer in layout.moe_layers])
    weight = None
    if attention_mask is not None:
        # One weight per (layer, token) row, in the order the logits were stacked.
        weight = attention_mask.reshape(-1).to(device).repeat(len(router_logits))
    return routing.load_balancing_loss(logits, ids, weight)
