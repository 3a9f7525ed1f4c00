"""The demo's trainer on transformers: `trainer.Trainer` for a causal LM whose routers a
`ReplayController` drives, trained with Adam in fp32."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from routereplay.controller import ReplayController
from routereplay.demo.trainer import Objective, TrainerBatch, sampled_logprobs
from routereplay.engines.hf import RecordingEngine
from routereplay.integrations.hf import attach
from routereplay.recording import Recording
from routereplay.stats import LayerStats
from routereplay.trace import NO_ROUTE, RoutingTrace


class HFTrainer:
    """A copy of `warmed` (left untouched) with its routers attached until the `with`
    block ends. transformers' token order is the seam's, batch-first, so record and
    replay are the controller's own."""

    def __init__(self, warmed: nn.Module, learning_rate: float) -> None:
        self.model = copy.deepcopy(warmed)
        self.controller: ReplayController = attach(self.model, source="trainer")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)

    def load_into(self, engine: RecordingEngine) -> None:
        engine.load_weights(self.model)

    def replay_stats(self) -> dict[int, LayerStats]:
        return self.controller.stats()

    def token_logprobs(self, batch: TrainerBatch, temperature: float) -> torch.Tensor:
        """`[sequences, seq - 1]` float32, see `trainer.sampled_logprobs`."""
        output = self.model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return sampled_logprobs(output.logits, batch.input_ids, temperature)

    @contextmanager
    def expert_inputs(self) -> Iterator[ExpertInputHooks]:
        layout = self.controller.layout
        hooks = ExpertInputHooks(self.model, layout.moe_layers, layout.num_experts)
        try:
            yield hooks
        finally:
            hooks.remove()

    def record(self) -> AbstractContextManager[Recording]:
        return self.controller.record()

    def replay(self, routes: RoutingTrace) -> AbstractContextManager[None]:
        return self.controller.replay(routes)

    def train_step(
        self, batch: TrainerBatch, temperature: float, objective: Objective
    ) -> tuple[float, float]:
        logprobs = self.token_logprobs(batch, temperature)
        loss_sum, clipped = objective(
            logprobs, batch.rollout_logprobs, batch.advantages, batch.completion_mask
        )
        tokens = batch.completion_mask.sum()
        loss = loss_sum / tokens
        self.optimizer.zero_grad()
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach()), float(clipped / tokens)

    def __enter__(self) -> HFTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.detach()


class ExpertInputHooks:
    """The expert ids each routed layer's `mlp.experts` received, logged by forward
    pre-hooks: whoever chose them, router or replay."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], num_experts: int) -> None:
        self.layers, self.num_experts = layers, num_experts
        self.calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        decoder: Any = model.model.layers  # type: ignore[union-attr]
        self._hooks = [
            decoder[layer].mlp.experts.register_forward_pre_hook(self._log(layer), with_kwargs=True)
            for layer in layers
        ]

    def _log(self, layer: int) -> Callable[..., None]:
        def log(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.calls[layer].append(ids.detach().clone())

        return log

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def trace(self, padding: torch.Tensor) -> RoutingTrace:
        """`[sequences, seq, layers, top_k]` over the forwards so far (in order), with
        `padding [sequences, seq]` (bool) rows as -1."""
        per_layer = [torch.cat(self.calls[layer]) for layer in self.layers]  # [tokens, k]
        experts = torch.stack(per_layer, dim=1).reshape(*padding.shape, len(self.layers), -1)
        experts = experts.masked_fill(padding[..., None, None], NO_ROUTE)
        return RoutingTrace(experts, self.layers, self.num_experts, "trainer")
