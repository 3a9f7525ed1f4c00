"""Replay under FSDP2: `fully_shard` on CPU over gloo, with two real processes.

Each rank builds the same tiny transformers model, shards every decoder layer and the
root, attaches routereplay (before or after sharding: both are covered), records a
trace of its own batch, perturbs the routers identically on both ranks, and replays
the trace with a forward and a backward. The ranks report what happened through files;
the tests here hold it against the experts' own inputs and against a single-process
replay of the same weights, traces and batches.

All ranks run once per module (spawning costs most of the time); each test checks one
behaviour of that run for one (family, attach order) case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from gloo_ranks import spawn_ranks
from hf_models import router_of, tiny_model
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import routereplay
from routereplay import LayerStats, RoutingTrace

pytest.importorskip("transformers")

# Covers the spawn (in the first test's setup) as well as each test; the ranks get a
# shorter deadline so that the parent kills them and reports before this fires.
pytestmark = pytest.mark.timeout(180)

WORLD = 2
RANK_DEADLINE_S = 150.0
BATCH, SEQ = 2, 8
# Router weights start at std 0.5: a perturbation this large changes native routing.
PERTURBATION = 2.0
# deepseek_v3 has a dense first layer (global layer ids must skip it); mixtral has none.
ROUTED_LAYERS = {"deepseek_v3": (1, 2, 3), "mixtral": (0, 1, 2, 3)}
ATTACH_ORDERS = ("before", "after")  # routereplay.attach relative to fully_shard
CASES = [(family, order) for family in ROUTED_LAYERS for order in ATTACH_ORDERS]
Case = tuple[str, str]


@dataclass(frozen=True)
class RankRun:
    """What one rank saw in one case: its batch, its recording and its replayed step."""

    input_ids: torch.Tensor
    trace: RoutingTrace
    expert_ids: dict[int, list[torch.Tensor]]  # per routed layer, ids per experts call
    totals: LayerStats
    loss: torch.Tensor
    router_grads: dict[int, torch.Tensor]  # per routed layer, the full (gathered) grad


# -- shared by the ranks and the single-process reference -----------------------------


def batch_of(rank: int) -> torch.Tensor:
    """Each rank's own input ids: different batches, so the ranks' routes differ."""
    generator = torch.Generator().manual_seed(1234 + rank)
    return torch.randint(3, 97, (BATCH, SEQ), generator=generator)


def routers(model: nn.Module) -> dict[int, nn.Module]:
    """Router modules by global layer, found from the model's structure, not the library."""
    found = {i: router_of(layer) for i, layer in enumerate(model.model.layers)}
    return {i: router for i, router in found.items() if router is not None}


def perturb_routers(model: nn.Module) -> None:
    """Add the same seeded noise to every router weight, sharded or not."""
    with torch.no_grad():
        for layer, router in routers(model).items():
            generator = torch.Generator().manual_seed(100 + layer)
            delta = PERTURBATION * torch.randn(router.weight.shape, generator=generator)
            if isinstance(router.weight, DTensor):
                # Between steps FSDP2 holds the sharded parameter: add the matching shard.
                delta = distribute_tensor(
                    delta, router.weight.device_mesh, router.weight.placements
                )
            router.weight.add_(delta)


def watch_experts(model: nn.Module) -> dict[int, list[torch.Tensor]]:
    """Log the top_k ids each routed layer's `mlp.experts` receives, call by call."""
    seen: dict[int, list[torch.Tensor]] = {}

    for layer, module in enumerate(model.model.layers):
        if router_of(module) is None:
            continue

        def hook(
            _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer
        ) -> None:
            # The MoE blocks call experts(hidden_states, top_k_index, top_k_weights).
            seen.setdefault(layer, []).append(args[1].detach().clone())

        module.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# -- one rank --------------------------------------------------------------------------


def run_case_under_fsdp(family: str, attach_order: str, rank: int, mesh: DeviceMesh) -> RankRun:
    model = tiny_model(family, seed=0)  # same seed: every rank starts from the same weights
    # Either order works: the patched router forward reads `self.weight` when called,
    # and FSDP2 has swapped the unsharded parameter in by then (the decoder layer's
    # pre-forward hook); fully_shard leaves the routers' own forwards alone.
    controller = routereplay.attach(model) if attach_order == "before" else None
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if controller is None:
        controller = routereplay.attach(model)

    input_ids = batch_of(rank)
    with controller.record() as recording, torch.no_grad():
        model(input_ids)
    trace = recording.trace

    perturb_routers(model)
    expert_ids = watch_experts(model)
    with controller.replay(trace):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
    # Every rank gathers every router's grad, in the same order (collectives).
    grads = {layer: router.weight.grad.full_tensor() for layer, router in routers(model).items()}
    return RankRun(input_ids, trace, expert_ids, controller.totals(), loss.detach(), grads)


def fsdp_cases(rank: int) -> dict[Case, RankRun]:
    """One rank (gloo already joined): every case under FSDP2 on a CPU device mesh."""
    mesh = init_device_mesh("cpu", (WORLD,))
    return {case: run_case_under_fsdp(*case, rank, mesh) for case in CASES}


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_runs() -> list[dict[Case, RankRun]]:
    return spawn_ranks(fsdp_cases, WORLD, timeout_s=RANK_DEADLINE_S, what="FSDP2 ranks")


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-attach_{o}" for f, o in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(scope="module")
def runs(all_runs: list[dict[Case, RankRun]], case: Case) -> list[RankRun]:
    """Per rank, the FSDP2 run of this case."""
    return [per_rank[case] for per_rank in all_runs]


@dataclass(frozen=True)
class Reference:
    """The same steps in one process without FSDP: per rank, and the rank average."""

    traces: list[RoutingTrace]
    losses: list[torch.Tensor]
    mean_grads: dict[int, torch.Tensor]


@pytest.fixture(scope="module")
def reference(case: Case, runs: list[RankRun]) -> Reference:
    family, _ = case
    model = tiny_model(family, seed=0)
    controller = routereplay.attach(model)
    traces = []
    for run in runs:
        with controller.record() as recording, torch.no_grad():
            model(run.input_ids)
        traces.append(recording.trace)

    perturb_routers(model)
    losses, grads = [], []
    for run in runs:
        model.zero_grad(set_to_none=True)
        # The FSDP2 ranks' own traces: the reference replays exactly what they replayed.
        with controller.replay(run.trace):
            loss = model(run.input_ids, labels=run.input_ids).loss
            loss.backward()
        losses.append(loss.detach())
        grads.append({layer: r.weight.grad.clone() for layer, r in routers(model).items()})
    # FSDP2 reduce-scatters gradients as the mean over ranks (its default divide factor).
    mean_grads = {layer: torch.stack([g[layer] for g in grads]).mean(0) for layer in grads[0]}
    return Reference(traces, losses, mean_grads)


# -- the behaviours --------------------------------------------------------------------


def test_recording_under_fsdp2_matches_a_single_process_recording(
    runs: list[RankRun], reference: Reference
) -> None:
    # The routers read unsharded weights: sharding changes no native choice.
    for rank, run in enumerate(runs):
        assert run.trace.token_shape == (BATCH, SEQ)
        assert run.trace.equal(reference.traces[rank]), f"rank {rank}"


def test_the_ranks_recorded_different_routes_for_their_different_batches(
    runs: list[RankRun],
) -> None:
    # Otherwise a rank replaying the other rank's trace would go unnoticed.
    assert not runs[0].trace.equal(runs[1].trace)


def test_replayed_ids_reach_the_experts_of_every_routed_layer_under_fsdp2(
    case: Case, runs: list[RankRun]
) -> None:
    family, _ = case
    for rank, run in enumerate(runs):
        assert run.trace.layers == ROUTED_LAYERS[family]
        assert tuple(sorted(run.expert_ids)) == ROUTED_LAYERS[family], f"rank {rank}"
        for layer in run.trace.layers:
            calls = run.expert_ids[layer]
            assert len(calls) == 1, f"rank {rank}, layer {layer}: {len(calls)} experts calls"
            expected = run.trace.layer_experts(layer).reshape(-1, run.trace.top_k).long()
            assert torch.equal(calls[0], expected), f"rank {rank}, layer {layer}"


def test_the_controller_counts_every_row_replayed_and_the_perturbed_routers_disagreeing(
    case: Case, runs: list[RankRun]
) -> None:
    family, _ = case
    rows = BATCH * SEQ * len(ROUTED_LAYERS[family])
    for rank, run in enumerate(runs):
        totals = run.totals
        assert (totals.replayed, totals.native, totals.recomputed) == (rows, 0, 0), rank
        # The perturbation changed native routing, so replay really overrode the router.
        assert totals.disagreed > 0, f"rank {rank}: {totals}"


def test_router_weights_receive_gradients_through_replayed_gate_weights(
    runs: list[RankRun],
) -> None:
    for rank, run in enumerate(runs):
        for layer, grad in run.router_grads.items():
            assert torch.isfinite(grad).all(), f"rank {rank}, layer {layer}"
            assert grad.abs().sum() > 0, f"rank {rank}, layer {layer}: zero gradient"


def test_fsdp2_replay_loss_equals_single_process_replay_loss(
    runs: list[RankRun], reference: Reference
) -> None:
    for rank, run in enumerate(runs):
        expected = reference.losses[rank]
        assert abs(run.loss - expected) <= 1e-5, f"rank {rank}: {run.loss} != {expected}"


def test_fsdp2_router_gradients_equal_the_rank_mean_of_single_process_gradients(
    runs: list[RankRun], reference: Reference
) -> None:
    for rank, run in enumerate(runs):
        assert run.router_grads.keys() == reference.mean_grads.keys()
        for layer, grad in run.router_grads.items():
            expected = reference.mean_grads[layer]
            # These grads are ~1e-4: an absolute 1e-5 would let a 10% error through.
            tolerance = 1e-5 * expected.abs().max()
            error = (grad - expected).abs().max()
            assert error <= tolerance, f"rank {rank}, layer {layer}: {error:.3g} > {tolerance:.3g}"
