"""A small pure-torch MoE stack whose routers ask a ReplayController for their ids.

It stands in for a framework adapter in the core tests: the router calls
`controller.route`, and the experts log the ids they actually received, so tests can
check replay independently of the controller's own bookkeeping.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from routereplay import MoELayout, ReplayController, RouterSpec


class ToyMoELayer(nn.Module):
    def __init__(self, layer: int, hidden: int, num_experts: int, owner: ToyMoE) -> None:
        super().__init__()
        self.layer = layer
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.Parameter(torch.randn(num_experts, hidden, hidden) / hidden**0.5)
        self._owner = [owner]  # a list, so the owner is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [tokens, hidden]` -> `[tokens, hidden]`."""
        owner = self._owner[0]
        logits = self.router(x)
        if owner.jitter:
            # Like Mixtral's router jitter, from a generator checkpointing does not
            # rewind: a recompute sees different logits than its forward did.
            noise = torch.randn(logits.shape, generator=owner.jitter_rng)
            logits = logits + owner.jitter * noise
        weights, ids = owner.controller.route(self.layer, logits, owner.spec)
        owner.expert_calls.append((self.layer, ids.detach().clone()))
        expert_out = torch.einsum("th,tkhd->tkd", x, self.experts[ids])
        return x + (weights.unsqueeze(-1) * expert_out).sum(1)


class ToyMoE(nn.Module):
    """Decoder layers over `[tokens, hidden]`; dense layers are plain linear blocks."""

    def __init__(
        self,
        layout: MoELayout,
        spec: RouterSpec,
        hidden: int = 16,
        seed: int = 0,
        jitter: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        self.jitter = jitter
        self.jitter_rng = torch.Generator().manual_seed(seed)
        self.use_checkpoint = use_checkpoint
        self.controller = ReplayController(layout)
        self.expert_calls: list[tuple[int, torch.Tensor]] = []
        self.blocks = nn.ModuleList(
            ToyMoELayer(i, hidden, layout.num_experts, self)
            if layout.is_moe(i)
            else nn.Linear(hidden, hidden)
            for i in range(layout.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and isinstance(block, ToyMoELayer):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def routers(self) -> dict[int, nn.Linear]:
        return {b.layer: b.router for b in self.blocks if isinstance(b, ToyMoELayer)}

    def seen(self, layer: int) -> list[torch.Tensor]:
        """Every ids tensor the experts of `layer` received, in call order."""
        return [ids for at, ids in self.expert_calls if at == layer]
