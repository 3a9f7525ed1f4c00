"""Two gloo ranks running transformers MoE models under `torch.distributed.pipelining`.

`run_on_ranks(fn)` spawns the ranks once and returns what each rank's `fn(rank)`
returned; a rank that raises, dies or runs past the deadline fails the calling test
with every rank's traceback. The model, batches, routes and the experts' watcher are
shared by the ranks and the single-process reference in the test process.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
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


def _rank_main(rank: int, fn: Callable[[int], Any], out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small, shared machine
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=60),  # a lost peer fails a collective, never hangs
        )
        try:
            result = fn(rank)
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise  # a non-zero exit makes the parent stop the other rank


def run_on_ranks(fn: Callable[[int], Any], timeout_s: float) -> list[Any]:
    """Run `fn(rank)` (module-level, its result `torch.save`-able) on WORLD spawned
    processes; return the results in rank order, or fail with every rank's report."""
    with tempfile.TemporaryDirectory(prefix="pipelining-ranks-") as tmp:
        out_dir = Path(tmp)
        context = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
            _rank_main, args=(fn, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        failure: str | None = None
        try:
            while not context.join(timeout=0.5, grace_period=1.0):
                if time.monotonic() > deadline:
                    failure = f"the ranks ran past {timeout_s:.0f} s"
                    break
        except Exception as error:  # a rank raised or died; join() names the first one
            failure = str(error)
        finally:
            for process in context.processes:  # only the processes started here
                if process.is_alive():
                    process.kill()
                    process.join()
        if failure is not None:
            reports = [
                f"--- rank {rank} ---\n"
                + (
                    path.read_text()
                    if (path := out_dir / f"rank{rank}.err").exists()
                    else "no traceback (killed while running or waiting on a peer)"
                )
                for rank in range(WORLD)
            ]
            pytest.fail(f"pipeline ranks failed: {failure}\n" + "\n".join(reports), pytrace=False)
        return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
