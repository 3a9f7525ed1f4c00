"""Two gloo ranks running transformers MoE models under `torch.distributed.pipelining`.

`run_on_ranks(fn)` spawns the ranks once and returns what each rank's `fn(rank)`
returned; a rank that raises, dies or runs past the deadline fails the calling test
with every rank's traceback. The model, batches, routes and the experts' watcher are
shared by the ranks and the single-process reference in the test process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gloo_ranks import spawn_ranks
from hf_models import router_of, tiny_model
from torch import nn

from routereplay import RoutingTrace

WORLD = 2
MICRO_BATCHES, MICRO_BATCH, SEQ = 4, 2, 8
BATCH = MICRO_BATCHES * MICRO_BATCH
# 8 decoder layers, the first 3 dense: over 4 stages, stage 0 is all dense (layers 0-1)
# and stage 1 mixed (dense 2, routed 3); over 2 stages, rank 0 routes only layer 3.
MODEL = {"num_hidden_layers": 8, "first_k_dense_replace": 3}
ROUTED_LAYERS = (3, 4, 5, 6, 7)
NUM_EXPERTS, TOP_K = 8, 2


def build_model() -> nn.Module:
    """The same DeepSeek-V3 (hybrid) weights in every process, in train mode."""
    return tiny_model("deepseek_v3", seed=0, **MODEL).train()


def batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and targets `[BATCH, SEQ]`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (BATCH, SEQ), generator=generator)
    return input_ids, torch.randint(3, 97, (BATCH, SEQ), generator=generator)


def random_routes(seed: int = 7) -> dict[int, RoutingTrace]:
    """Micro-batch -> `[MICRO_BATCH, SEQ, routed layers, TOP_K]`: random distinct ids,
    so they differ from native routing and from micro-batch to micro-batch."""
    rng = np.random.default_rng(seed)
    shape = (MICRO_BATCH, SEQ, len(ROUTED_LAYERS), NUM_EXPERTS)
    return {
        mb: RoutingTrace(
            torch.from_numpy(np.argsort(rng.random(shape), -1)[..., :TOP_K].copy()),
            ROUTED_LAYERS,
            NUM_EXPERTS,
        )
        for mb in range(MICRO_BATCHES)
    }


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class ExpertCalls:
    """What every routed layer's `mlp.experts` received, call by call: its hidden states
    `[tokens, hidden]` and `top_k_index [tokens, top_k]`, read from the experts' own
    arguments, independently of routereplay."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for index, layer in enumerate(model.model.layers):  # type: ignore[union-attr,arg-type]
            if router_of(layer) is not None:
                layer.mlp.experts.register_forward_pre_hook(self._logger(index))

    def _logger(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def log(module: nn.Module, args: tuple[Any, ...]) -> None:
            # DeepSeek-V3's MoE block calls experts(hidden_states, topk_indices, topk_weights).
            hidden, ids = args[0], args[1]
            self.calls.setdefault(layer, []).append((hidden.detach().clone(), ids.clone()))

        return log


def run_on_ranks(fn: Callable[[int], Any], timeout_s: float) -> list[Any]:
    """Run `fn(rank)` (module-level, its result `torch.save`-able) on WORLD spawned
    processes; return the results in rank order, or fail with every rank's report."""
    return spawn_ranks(fn, WORLD, timeout_s=timeout_s, what="pipeline ranks")
