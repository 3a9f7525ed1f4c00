"""Router replay in real megatron-core models, through megatron-core's real schedules.

One spawn of two gloo ranks runs every case (switching the pipeline layout in place):
a hybrid 8-layer model (layers 0-1 dense, 2-7 routed), 4 micro-batches, under PP=1,
PP=2 and PP=2 + VPP=2, with and without full activation recompute, and an uneven split.
Which experts every router used is read from megatron's own `routing_map` (the
harness's `watch_routers`), independently of routereplay.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron_harness import (
    build_gpt,
    initialize_model_parallel,
    make_micro_batches,
    parameters_by_global_name,
    run_on_ranks,
    run_schedule,
    watch_routers,
)

from routereplay import MoELayout, PipelineSplit, ReplayError, RoutingTrace
from routereplay.align import pad_traces, stack_stages, unpad_traces
from routereplay.integrations import megatron as rr_megatron

pytestmark = pytest.mark.timeout(240)

MICRO_BATCHES, BATCH, SEQ = 4, 2, 16
LAYOUT = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], num_experts=8, top_k=2)
CASES: dict[str, dict[str, Any]] = {
    "pp1": {"pp": 1, "vp": None, "recompute": False},
    "pp2": {"pp": 2, "vp": None, "recompute": False},
    "pp2 recompute": {"pp": 2, "vp": None, "recompute": True},
    "pp2 vpp2": {"pp": 2, "vp": 2, "recompute": False},
    "pp2 vpp2 recompute": {"pp": 2, "vp": 2, "recompute": True},
    "pp2 uneven 3+5": {
        "pp": 2,
        "vp": None,
        "recompute": False,
        "overrides": {
            "num_layers_in_first_pipeline_stage": 3,
            "num_layers_in_last_pipeline_stage": 5,
        },
    },
}


def engine_traces(seed: int = 7) -> dict[int, RoutingTrace]:
    """R3 routes as an engine reports them: per sequence, every decoder layer (dense ones
    as zeros), converted through the layout, batched, then sequence-first for Megatron."""
    rng = np.random.default_rng(seed)
    traces = {}
    for micro_batch in range(MICRO_BATCHES):
        sequences = []
        for _ in range(BATCH):
            engine = np.zeros((SEQ, LAYOUT.num_layers, LAYOUT.top_k), dtype=np.uint8)
            routed = np.argsort(rng.random((SEQ, len(LAYOUT.moe_layers), 8)), -1)[..., :2]
            engine[:, list(LAYOUT.moe_layers)] = routed
            sequences.append(RoutingTrace.from_all_layers(engine, LAYOUT, source="vllm"))
        traces[micro_batch] = rr_megatron.sequence_first(pad_traces(sequences, SEQ))
    return traces


def run_case(case: dict[str, Any], traces: dict[int, RoutingTrace]) -> dict[str, Any]:
    initialize_model_parallel(case["pp"], case["vp"])
    chunks = build_gpt(
        case["pp"], case["vp"], recompute=case["recompute"], **case.get("overrides", {})
    )
    controller = rr_megatron.attach(chunks)
    calls = watch_routers(chunks)
    with controller.replay(traces):
        losses = run_schedule(chunks, make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=3))
    grads = {
        name: p.grad.clone()
        for name, p in parameters_by_global_name(chunks).items()
        if p.grad is not None
    }
    controller.detach()
    return {
        "calls": [(c.layer, c.recomputing, c.experts) for c in calls],
        "losses": losses,
        "grads": grads,
        "stats": controller.stats(),
    }


def record_and_replay(rank: int) -> dict[str, Any]:
    """R2 under PP=2 + VPP=2 with recompute: record in a forward-only pass, gather the
    stage slices of both ranks back into per-sequence traces, replay in the update."""
    initialize_model_parallel(2, 2)
    chunks = build_gpt(2, 2, recompute=True)
    controller = rr_megatron.attach(chunks)
    batches = make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=5)
    with controller.record() as recording:
        run_schedule(chunks, batches, forward_only=True)
    mine = recording.traces  # micro-batch -> [seq, batch, this rank's layers, k]
    everyone: list[Any] = [None, None]
    dist.all_gather_object(everyone, mine)
    sequences = {
        mb: unpad_traces(
            rr_megatron.batch_first(stack_stages([ranks[mb] for ranks in everyone], LAYOUT)),
            [SEQ] * BATCH,
        )
        for mb in range(MICRO_BATCHES)
    }
    # ... and back into the trainer's layout for the update pass, each rank taking only
    # its own layers (rank 1's are two runs, (2, 3) and (6, 7)).
    split = PipelineSplit.from_megatron_config(chunks[0].config)
    assert split == PipelineSplit(pp_size=2, vp_size=2)
    layers = LAYOUT.rank_moe_layers(split, rank)
    update = {
        mb: rr_megatron.sequence_first(pad_traces(seqs, SEQ, layers=layers))
        for mb, seqs in sequences.items()
    }
    calls = watch_routers(chunks)
    with controller.replay(update):
        run_schedule(chunks, batches)
    return {
        "recorded": {mb: t.expert_ids() for mb, t in mine.items()},
        "layers": {mb: t.layers for mb, t in mine.items()},
        "calls": [(c.layer, c.recomputing, c.experts) for c in calls],
        "stats": controller.stats(),
        "sequence_shapes": [s.token_shape for s in sequences[0]],
        "update_layers": update[0].layers,
    }


def bad_inputs(rank: int, traces: dict[int, RoutingTrace]) -> dict[str, str]:
    """The error each malformed input raises, under PP=1 on each rank: a rank that fails
    mid-schedule under PP>1 leaves its peer waiting (see the test of that below)."""
    initialize_model_parallel(1, None)
    chunks = build_gpt(1, None)
    controller = rr_megatron.attach(chunks)
    batches = make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=3)
    wrong = {
        "missing layer": {mb: t.select_layers([2, 3, 4, 6, 7]) for mb, t in traces.items()},
        "wrong token count": {
            mb: RoutingTrace(t.experts[: SEQ // 2], t.layers, t.num_experts)
            for mb, t in traces.items()
        },
        "wrong top_k": {
            mb: RoutingTrace(
                torch.stack([torch.randperm(8)[:3] for _ in range(SEQ * BATCH * 6)]).reshape(
                    SEQ, BATCH, 6, 3
                ),
                t.layers,
                8,
            )
            for mb, t in traces.items()
        },
        "micro-batch missing": {mb: t for mb, t in traces.items() if mb != 2},
    }
    errors = {}
    for name, routes in wrong.items():
        try:
            with controller.replay(routes):
                run_schedule(chunks, batches)
        except ReplayError as error:
            errors[name] = str(error)
        # A failed step leaves no state behind: a good step runs right after.
        with controller.replay(traces):
            run_schedule(chunks, batches)
    return errors


def short_routes_under_vpp(rank: int) -> None:
    """Replays routes for half the tokens under PP=2 + VPP=2: rank 1 fails at once."""
    initialize_model_parallel(2, 2)
    chunks = build_gpt(2, 2)
    controller = rr_megatron.attach(chunks)
    short = {
        mb: RoutingTrace(t.experts[: SEQ // 2], t.layers, t.num_experts)
        for mb, t in engine_traces().items()
    }
    with controller.replay(short):
        run_schedule(chunks, make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=3))


def all_cases(rank: int) -> dict[str, Any]:
    traces = engine_traces()
    results = {name: run_case(case, traces) for name, case in CASES.items()}
    results["r2"] = record_and_replay(rank)
    results["errors"] = bad_inputs(rank, traces)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_on_ranks(all_cases, world_size=2, pp_size=2, timeout_s=200.0)


def expected_experts(traces: dict[int, RoutingTrace], layer: int, micro_batch: int) -> torch.Tensor:
    """`[seq * batch, k]` ascending: the ids a router of `layer` (0-based) must use."""
    trace = traces[micro_batch]
    return trace.layer_experts(layer).reshape(-1, trace.top_k).long().sort(-1).values


def check_calls(calls: list, traces: dict[int, RoutingTrace], recompute: bool) -> set[int]:
    """Every router call used its layer's ids for its micro-batch; returns layers seen.

    Per layer, megatron runs the micro-batches' forwards in order, and full recompute
    re-runs them in forward order too: the k-th call of each kind is micro-batch k.
    """
    seen: dict[tuple[int, bool], int] = {}
    for layer_number, recomputing, experts in calls:
        kind = (layer_number, recomputing)
        micro_batch = seen.get(kind, 0)
        seen[kind] = micro_batch + 1
        expected = expected_experts(traces, layer_number - 1, micro_batch)
        assert torch.equal(experts, expected), f"layer {layer_number}, micro-batch {micro_batch}"
    assert all(count == MICRO_BATCHES for count in seen.values()), seen
    assert any(recomputing for _, recomputing in seen) == recompute
    return {layer for layer, _ in seen}


@pytest.mark.parametrize("name", list(CASES))
def test_every_router_uses_its_layers_ids_for_its_micro_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    traces = engine_traces()
    layers = set()
    for rank in ranks:
        layers |= check_calls(rank[name]["calls"], traces, CASES[name]["recompute"])
    # 1-based layer numbers 3..8: the dense prefix shifts nothing, every routed layer ran.
    assert layers == {3, 4, 5, 6, 7, 8}


@pytest.mark.parametrize("name", [n for n in CASES if n != "pp1"])
def test_loss_and_gradients_equal_a_single_stage_replay(
    ranks: list[dict[str, Any]], name: str
) -> None:
    reference = ranks[0]["pp1"]
    last = ranks[-1][name]  # the last pipeline stage computes the loss
    assert len(last["losses"]) == MICRO_BATCHES
    for ours, theirs in zip(last["losses"], reference["losses"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    grads = {**ranks[0][name]["grads"], **ranks[1][name]["grads"]}
    assert grads.keys() == reference["grads"].keys()
    routers = [n for n in grads if "router" in n]
    assert len(routers) == 6
    for param, grad in grads.items():
        scale = reference["grads"][param].abs().max().clamp(min=1e-12)
        assert (grad - reference["grads"][param]).abs().max() <= 1e-5 * scale, param


@pytest.mark.parametrize("name", list(CASES))
def test_counters_show_replay_overriding_the_live_router(
    ranks: list[dict[str, Any]], name: str
) -> None:
    stats = {**ranks[0][name]["stats"], **ranks[1][name]["stats"]}
    assert sorted(stats) == list(LAYOUT.moe_layers)
    for layer, layer_stats in stats.items():
        assert layer_stats.replayed == MICRO_BATCHES * SEQ * BATCH, layer
        assert layer_stats.disagreed > 0  # random routes: the live router disagrees
        recomputed = MICRO_BATCHES * SEQ * BATCH if CASES[name]["recompute"] else 0
        assert layer_stats.recomputed == recomputed


def test_r2_round_trip_under_vpp_replays_exactly_what_was_recorded(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        r2 = rank["r2"]
        assert r2["sequence_shapes"] == [(SEQ,)] * BATCH
        assert r2["update_layers"] == r2["layers"][0]  # each rank replays only its layers
        traces = {
            mb: RoutingTrace(experts, r2["layers"][mb], 8) for mb, experts in r2["recorded"].items()
        }
        check_calls(r2["calls"], traces, recompute=True)
        # Same weights, same inputs: the live router agrees with its own recording.
        assert all(s.disagreed == 0 and s.replayed > 0 for s in r2["stats"].values())


def test_stages_record_only_their_own_layers(ranks: list[dict[str, Any]]) -> None:
    # VPP=2 over 8 layers: rank 0 holds layers 0-1 (dense) and 4-5, rank 1 2-3 and 6-7.
    assert ranks[0]["r2"]["layers"][0] == (4, 5)
    assert ranks[1]["r2"]["layers"][0] == (2, 3, 6, 7)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "missing layer",
            r"pp_rank 0, vp_stage 0: Layer 5, micro-batch 0: the trace has no routes for this layer",
        ),
        (
            "wrong token count",
            r"pp_rank 0, vp_stage 0: Layer 2, micro-batch 0: the router sees 32 tokens but the "
            r"routes hold 16 rows \(token axes \[8, 2\]\)",
        ),
        ("wrong top_k", r"^pp_rank 0: Micro-batch 0: .*top_k=3; the model has 8 experts, top_k=2"),
        (
            "micro-batch missing",
            r"pp_rank 0, vp_stage 0: Layer 2, micro-batch 2: no routes were given for this "
            r"micro-batch \(routes given for \[0, 1, 3\]\)",
        ),
    ],
)
def test_bad_routes_name_rank_stage_layer_and_micro_batch(
    ranks: list[dict[str, Any]], case: str, message: str
) -> None:
    for rank in ranks:
        assert re.search(message, rank["errors"][case]), rank["errors"][case]


def test_a_rank_failing_inside_the_pipeline_names_itself() -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(short_routes_under_vpp, world_size=2, pp_size=2, timeout_s=60.0)
    assert re.search(
        r"pp_rank 1, vp_stage 0: Layer 2, micro-batch 0: the router sees 32 tokens but the "
        r"routes hold 16 rows",
        str(failure.value),
    )


# -- token-checked replay under PP x VPP ---------------------------------------------------


def tokened_traces(batches: list[Any]) -> dict[int, RoutingTrace]:
    """`engine_traces()`, each sequence knowing the tokens of its micro-batch row."""
    traces = {}
    for micro_batch, trace in engine_traces().items():
        batch_first = rr_megatron.batch_first(trace)  # [batch, seq]
        tokens = batches[micro_batch]["tokens"]
        traces[micro_batch] = rr_megatron.sequence_first(batch_first.with_tokens(tokens))
    return traces


def token_checked_replay(rank: int) -> dict[str, str | None]:
    """The seed's split (PP=2 x VPP=2): routes with their tokens replay; on rank 1 the
    same routes handed to the wrong micro-batches fail both ranks before the schedule."""
    initialize_model_parallel(2, 2)
    chunks = build_gpt(2, 2)
    controller = rr_megatron.attach(chunks)
    batches = make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=3)
    traces = tokened_traces(batches)
    tokens = {k: batch["tokens"] for k, batch in enumerate(batches)}
    outcome: dict[str, str | None] = {}
    rr_megatron.check_routes(controller, traces, tokens)
    with controller.replay(traces):
        run_schedule(chunks, batches)
    outcome["aligned"] = None
    given = {mb: traces[(mb + 1) % MICRO_BATCHES] for mb in traces} if rank == 1 else traces
    try:
        rr_megatron.check_routes(controller, given, tokens)
        with controller.replay(given):
            run_schedule(chunks, batches)
        outcome["swapped"] = None
    except ReplayError as error:
        outcome["swapped"] = str(error)
    # Coverage, before the schedule too: rank 1 lacks the model's last routed layer
    # (its own), then every rank lacks micro-batch 2.
    short = {mb: t.select_layers(t.layers[:-1]) for mb, t in traces.items()}
    without = {mb: t for mb, t in traces.items() if mb != 2}
    for case, routes in (
        ("missing layer", short if rank == 1 else traces),
        ("missing micro-batch", without),
    ):
        try:
            rr_megatron.check_routes(controller, routes, num_micro_batches=MICRO_BATCHES)
            outcome[case] = None
        except ReplayError as error:
            outcome[case] = str(error)
    return outcome


def test_routes_handed_to_the_wrong_micro_batch_fail_every_rank_before_the_schedule() -> None:
    outcomes = run_on_ranks(token_checked_replay, world_size=2, pp_size=2, timeout_s=90.0)
    batches = make_micro_batches(MICRO_BATCHES, BATCH, SEQ, seed=3)
    expected, found = int(batches[1]["tokens"][0, 0]), int(batches[0]["tokens"][0, 0])
    reason = (
        rf"pp_rank 1, micro-batch 0: the trace was recorded for token {expected} at "
        rf"sequence 0, position 0, but the batch holds token {found} there"
    )
    assert [o["aligned"] for o in outcomes] == [None, None]
    assert re.search(
        r"^pp_rank 1: Layer \d+, micro-batch 0: the routes have no layer",
        outcomes[1]["missing layer"] or "",
    )
    assert re.search(
        r"^pp_rank 0: pipeline rank 1 of this group failed its route checks",
        outcomes[0]["missing layer"] or "",
    )
    for outcome in outcomes:
        assert re.search(
            r"micro-batch 2: no routes were given", outcome["missing micro-batch"] or ""
        )
    assert re.search(rf"^{reason}", outcomes[1]["swapped"] or ""), outcomes[1]["swapped"]
    assert re.search(
        rf"^pp_rank 0: pipeline rank 1 of this group failed its route checks, so no rank "
        rf"runs the schedule: {reason}",
        outcomes[0]["swapped"] or "",
    ), outcomes[0]["swapped"]
