"""The megatron harness: real GPTModel chunks through megatron's real schedules on CPU.

Two gloo ranks run every case once per module (spawning costs most of the time): a
PP=1 reference (on both ranks: DP=2 without gradient reduction), PP=2 (1F1B) and
PP=2 + VPP=2 (interleaved 1F1B), each with and without full activation recompute, with
the alltoall dispatcher, plus the allgather dispatcher for PP=1 and PP=2 + VPP=2. Each
case runs 4 micro-batches forward and backward, then forward only. The tests hold the
ranks' reports against the expected layer placement and against the PP=1 reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_harness import (
    RouterCall,
    build_gpt,
    built_layers,
    gradients,
    initialize_model_parallel,
    make_micro_batches,
    parameters_by_global_name,
    routers,
    run_on_ranks,
    run_schedule,
    watch_routers,
)

# Covers the spawn (in the first test's setup) as well as each test; the ranks get a
# shorter deadline so that the harness kills them and reports before this fires.
pytestmark = pytest.mark.timeout(60)
RANK_DEADLINE_S = 45.0

NUM_MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 16
HIDDEN, TOP_K = 32, 2  # build_gpt's defaults
DENSE_LAYERS = (1, 2)  # 1-based, as megatron numbers layers
ROUTED_LAYERS = (3, 4, 5, 6, 7, 8)
LAYOUTS = {"pp1": (1, None), "pp2": (2, None), "pp2_vpp2": (2, 2)}
# Layers each rank builds, virtual stage major: megatron's placement for 8 layers.
PLACEMENT = {
    "pp1": ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]),
    "pp2": ([1, 2, 3, 4], [5, 6, 7, 8]),
    "pp2_vpp2": ([1, 2, 5, 6], [3, 4, 7, 8]),
}
# Global names: embedding (first stage), a dense layer's attention and MLP, the first and
# last routers, an expert, the final norm and the output layer (last stage).
CHECKED_PARAMETERS = (
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.1.mlp.linear_fc1.weight",
    "decoder.layers.2.mlp.router.weight",
    "decoder.layers.5.mlp.experts.local_experts.3.linear_fc2.weight",
    "decoder.layers.7.mlp.router.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)


@dataclass(frozen=True)
class Case:
    layout: str  # a key of LAYOUTS
    recompute: bool
    dispatcher: str = "alltoall"

    def __str__(self) -> str:
        return (
            f"{self.layout}-{'recompute' if self.recompute else 'no_recompute'}-{self.dispatcher}"
        )


CASES = [Case(layout, recompute) for layout in LAYOUTS for recompute in (False, True)] + [
    Case("pp1", False, "allgather"),
    Case("pp2_vpp2", False, "allgather"),
]
REFERENCE = Case("pp1", False)
PIPELINED = [case for case in CASES if case.layout != "pp1"]
RECOMPUTED = [case for case in CASES if case.recompute]
NOT_RECOMPUTED = [case for case in CASES if not case.recompute]


@dataclass(frozen=True)
class RankRun:
    """What one rank saw in one case."""

    layers: list[int]  # global 1-based layers built, chunk order
    router_layers: list[int]  # `layer_number` of every TopKRouter found on the chunks
    losses: list[torch.Tensor]  # per micro-batch; last stage only
    forward_only_losses: list[torch.Tensor]
    grads: dict[str, torch.Tensor]  # of CHECKED_PARAMETERS this rank holds
    router_weights: dict[int, torch.Tensor]  # by layer_number
    router_calls: list[RouterCall]  # during forward and backward, in call order
    parameter_names: list[str]  # global names of this rank's parameters


# -- the ranks -------------------------------------------------------------------------


def run_case(case: Case) -> RankRun:
    pp_size, vp_size = LAYOUTS[case.layout]
    chunks = build_gpt(
        pp_size, vp_size, recompute=case.recompute, dispatcher=case.dispatcher, seq_length=SEQ
    )
    micro_batches = make_micro_batches(NUM_MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ)
    calls = watch_routers(chunks)
    losses = run_schedule(chunks, micro_batches)
    grads = gradients(chunks, CHECKED_PARAMETERS)
    training_calls = list(calls)
    forward_only_losses = run_schedule(chunks, micro_batches, forward_only=True)
    return RankRun(
        layers=built_layers(chunks),
        router_layers=sorted(routers(chunks)),
        losses=losses,
        forward_only_losses=forward_only_losses,
        grads=grads,
        router_weights={n: r.weight.detach().clone() for n, r in routers(chunks).items()},
        router_calls=training_calls,
        parameter_names=list(parameters_by_global_name(chunks)),
    )


def run_all_cases(rank: int) -> dict[Case, RankRun]:
    runs = {}
    for layout, (pp_size, vp_size) in LAYOUTS.items():
        initialize_model_parallel(pp_size, vp_size)  # collective: same order on all ranks
        for case in CASES:
            if case.layout == layout:
                runs[case] = run_case(case)
    return runs


def run_single_process_reference(rank: int) -> RankRun:
    return run_case(REFERENCE)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_runs() -> list[dict[Case, RankRun]]:
    return run_on_ranks(run_all_cases, world_size=2, pp_size=1, timeout_s=RANK_DEADLINE_S)


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    """Every case; tests about a subset parametrize `case` themselves."""
    case: Case = request.param
    return case


@pytest.fixture
def runs(all_runs: list[dict[Case, RankRun]], case: Case) -> list[RankRun]:
    """Per rank, the run of this case."""
    return [per_rank[case] for per_rank in all_runs]


@pytest.fixture(scope="module")
def reference(all_runs: list[dict[Case, RankRun]]) -> RankRun:
    """PP=1, no recompute, alltoall: rank 0 ran the whole model on its own."""
    return all_runs[0][REFERENCE]


def merged_grads(runs: list[RankRun]) -> dict[str, torch.Tensor]:
    """The checked gradients gathered from every rank by global name; each on one rank."""
    merged: dict[str, torch.Tensor] = {}
    for run in runs:
        assert not merged.keys() & run.grads.keys(), "a parameter is on two pipeline ranks"
        merged |= run.grads
    return merged


def last_stage_losses(runs: list[RankRun]) -> list[torch.Tensor]:
    return runs[-1].losses


# -- placement and routers -------------------------------------------------------------


def test_each_rank_builds_megatrons_layers_for_its_pipeline_stages(
    case: Case, runs: list[RankRun]
) -> None:
    for rank, run in enumerate(runs):
        assert run.layers == PLACEMENT[case.layout][rank], f"rank {rank}"


def test_routers_carry_global_one_based_layer_numbers_of_the_moe_layers_only(
    case: Case, runs: list[RankRun]
) -> None:
    for rank, run in enumerate(runs):
        assert set(run.router_layers) <= set(run.layers), f"rank {rank}"
        assert not set(run.router_layers) & set(DENSE_LAYERS), f"rank {rank}"
    pipeline = runs if case.layout != "pp1" else runs[:1]  # pp1: each rank has them all
    router_layers = [layer for run in pipeline for layer in run.router_layers]
    assert sorted(router_layers) == list(ROUTED_LAYERS)


def test_only_the_last_stage_reports_losses(case: Case, runs: list[RankRun]) -> None:
    if case.layout == "pp1":
        assert all(len(run.losses) == NUM_MICRO_BATCHES for run in runs)
    else:
        assert runs[0].losses == [] and len(runs[1].losses) == NUM_MICRO_BATCHES


def test_router_input_is_seq_major_and_rows_flatten_seq_then_batch(runs: list[RankRun]) -> None:
    for run in runs:
        for call in run.router_calls:
            assert call.input.shape == (SEQ, MICRO_BATCH_SIZE, HIDDEN)
            assert call.experts.shape == (SEQ * MICRO_BATCH_SIZE, TOP_K)
            # Row r of the routing is token (position, sample) = divmod(r, micro_batch_size).
            logits = call.input.reshape(-1, HIDDEN) @ run.router_weights[call.layer].T
            expected = logits.topk(TOP_K, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(call.experts, expected), f"layer {call.layer}"


@pytest.mark.parametrize("case", NOT_RECOMPUTED, ids=str)
def test_each_router_runs_once_per_micro_batch_in_order_without_recompute(
    case: Case, runs: list[RankRun]
) -> None:
    for rank, run in enumerate(runs):
        for layer in run.router_layers:
            calls = [c for c in run.router_calls if c.layer == layer]
            assert not any(c.recomputing for c in calls)
            # The schedule sets the micro-batch on every layer before its forward step.
            assert [c.layer_micro_batch for c in calls] == list(range(NUM_MICRO_BATCHES)), (
                f"rank {rank}, layer {layer}"
            )


@pytest.mark.parametrize("case", RECOMPUTED, ids=str)
def test_full_recompute_reruns_each_router_once_per_micro_batch_with_identical_routes(
    case: Case, runs: list[RankRun]
) -> None:
    for rank, run in enumerate(runs):
        for layer in run.router_layers:
            calls = [c for c in run.router_calls if c.layer == layer]
            forwards = [c for c in calls if not c.recomputing]
            recomputes = [c for c in calls if c.recomputing]
            assert len(forwards) == len(recomputes) == NUM_MICRO_BATCHES, f"rank {rank}"
            # Which micro-batch each re-run belongs to, found by its (bitwise equal) input.
            rerun = [
                next(i for i, f in enumerate(forwards) if torch.equal(f.input, r.input))
                for r in recomputes
            ]
            # Each layer re-runs its micro-batches in forward order (a per-layer FIFO holds).
            assert rerun == list(range(NUM_MICRO_BATCHES)), f"rank {rank}, layer {layer}"
            for micro_batch, recompute in zip(rerun, recomputes, strict=True):
                assert torch.equal(recompute.experts, forwards[micro_batch].experts)


def test_a_layers_current_microbatch_is_stale_while_it_is_recomputed(
    all_runs: list[dict[Case, RankRun]],
) -> None:
    # Megatron sets `current_microbatch` before each forward step only. Under 1F1B the
    # first stage runs micro-batch k+1's forward before micro-batch k's backward, so the
    # re-run of k reads k+1: replay must not key recompute on this attribute.
    first_stage = all_runs[0][Case("pp2", True)]
    forwards = [c for c in first_stage.router_calls if c.layer == 3 and not c.recomputing]
    recomputes = [c for c in first_stage.router_calls if c.layer == 3 and c.recomputing]
    rerun = [
        next(i for i, f in enumerate(forwards) if torch.equal(f.input, r.input)) for r in recomputes
    ]
    seen = [r.layer_micro_batch for r in recomputes]
    assert rerun == [0, 1, 2, 3]
    assert seen == [1, 2, 3, 3]


# -- equivalence with PP=1 -------------------------------------------------------------


def test_pipelined_losses_equal_the_pp1_losses(
    case: Case, runs: list[RankRun], reference: RankRun
) -> None:
    losses = torch.stack(last_stage_losses(runs))
    torch.testing.assert_close(losses, torch.stack(reference.losses), rtol=0, atol=1e-5)


def test_forward_only_losses_equal_the_training_losses(case: Case, runs: list[RankRun]) -> None:
    for run in runs:
        assert len(run.forward_only_losses) == len(run.losses)
        for forward_only, trained in zip(run.forward_only_losses, run.losses, strict=True):
            assert abs(forward_only - trained) <= 1e-6


def test_pipelined_gradients_equal_the_pp1_gradients(
    case: Case, runs: list[RankRun], reference: RankRun
) -> None:
    grads = merged_grads(runs if case.layout != "pp1" else runs[:1])
    assert grads.keys() == reference.grads.keys() == set(CHECKED_PARAMETERS)
    for name, grad in grads.items():
        expected = reference.grads[name]
        assert expected.abs().max() > 0, f"{name}: zero reference gradient"
        # Gradients here are 1e-4..1e-2: compare relative to the largest entry.
        error = (grad - expected).abs().max()
        assert error <= 1e-5 * expected.abs().max(), f"{name}: {error:.3g}"


def test_both_pp1_ranks_computed_the_same_reference(all_runs: list[dict[Case, RankRun]]) -> None:
    # DP=2 without a DDP wrapper: nothing reduces, each rank is an independent full run.
    first, second = (per_rank[REFERENCE] for per_rank in all_runs)
    assert torch.equal(torch.stack(first.losses), torch.stack(second.losses))
    for name in CHECKED_PARAMETERS:
        assert torch.equal(first.grads[name], second.grads[name]), name


def test_a_single_process_pp1_run_equals_the_two_rank_reference(reference: RankRun) -> None:
    (alone,) = run_on_ranks(run_single_process_reference, world_size=1, timeout_s=RANK_DEADLINE_S)
    assert torch.equal(torch.stack(alone.losses), torch.stack(reference.losses))
    for name in CHECKED_PARAMETERS:
        assert torch.equal(alone.grads[name], reference.grads[name]), name


# -- the harness itself ----------------------------------------------------------------


def fail_on_rank_one(rank: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    torch.distributed.barrier()  # rank 0 blocks on its lost peer
    return rank


def test_a_failing_rank_fails_the_test_with_its_traceback_instead_of_hanging() -> None:
    with pytest.raises(pytest.fail.Exception, match="rank one fails on purpose"):
        run_on_ranks(fail_on_rank_one, world_size=2, timeout_s=RANK_DEADLINE_S)


def sleep_forever(rank: int) -> None:
    time.sleep(3600)


def test_ranks_past_the_deadline_are_killed_and_reported() -> None:
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="ran past 2 s"):
        run_on_ranks(sleep_forever, world_size=2, timeout_s=2.0)
    assert time.monotonic() - started < 10.0


@pytest.mark.parametrize("case", PIPELINED, ids=str)
def test_global_parameter_names_of_the_pipeline_ranks_partition_the_pp1_names(
    case: Case, runs: list[RankRun], reference: RankRun
) -> None:
    first, second = (set(run.parameter_names) for run in runs)
    assert not first & second
    assert first | second == set(reference.parameter_names)
