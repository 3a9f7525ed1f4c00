"""Router replay under `torch.distributed.pipelining`, on two real gloo processes.

One spawn runs every case: a hybrid DeepSeek-V3 (8 layers, the first 3 dense), 4
micro-batches, under ScheduleGPipe and Schedule1F1B (one stage per rank) and
ScheduleInterleaved1F1B and ScheduleLoopedBFS (stages r and r + 2 on rank r), each
without checkpointing, with transformers' gradient checkpointing and with
`torch.utils.checkpoint`. Which experts ran is read from the experts' own arguments;
which micro-batch a call belonged to is read from its hidden states, matched against
a single-process replay of the same routes, never from routereplay or the schedule.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import torch
from pipelining_harness import (
    BATCH,
    MICRO_BATCH,
    MICRO_BATCHES,
    ROUTED_LAYERS,
    SEQ,
    ExpertCalls,
    batch,
    build_model,
    loss_fn,
    random_routes,
    run_on_ranks,
)
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)

import routereplay
from routereplay import ReplayError, RoutingTrace
from routereplay.integrations.pipelining import (
    build_stages,
    check_stage_routes,
    gather_recording,
    pipeline_replay,
    sequence_traces,
    split_routes,
)

pytest.importorskip("transformers")

# Covers the spawn (in the first test's setup); the ranks' deadline is shorter.
pytestmark = pytest.mark.timeout(150)

SCHEDULES: dict[str, Any] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
}
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs")
CHECKPOINTING = ("none", "transformers", "torch")
CASES = [(schedule, ckpt) for schedule in SCHEDULES for ckpt in CHECKPOINTING]


# -- on the ranks ----------------------------------------------------------------------


def run_step(rank: int, schedule_name: str, checkpointing: str) -> dict[str, Any]:
    """One training step replaying `random_routes()` under the schedule."""
    model = build_model()
    controller = routereplay.attach(model)
    if checkpointing == "transformers":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    stages = build_stages(
        model,
        controller,
        pp_size=2,
        pp_rank=rank,
        micro_batch_shape=(MICRO_BATCH, SEQ),
        stages_per_rank=2 if schedule_name in MULTI_STAGE else 1,
        checkpoint_layers=checkpointing == "torch",
    )
    single = schedule_name not in MULTI_STAGE
    schedule = SCHEDULES[schedule_name](
        stages[0] if single else stages, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn
    )
    experts = ExpertCalls(model)
    input_ids, targets = batch()
    losses: list[torch.Tensor] = []
    with pipeline_replay(stages, random_routes(), MICRO_BATCHES):
        if rank == 0:  # holds stage 0
            schedule.step(input_ids, target=targets, losses=losses)
        else:
            schedule.step(target=targets, losses=losses)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {
        "stages": [(s.stage_index, s.submod.global_layers) for s in stages],  # type: ignore[union-attr]
        "experts": experts.calls,
        "losses": [loss.detach() for loss in losses],
        "grads": grads,
        "stats": controller.stats(),
    }


def record_then_replay(rank: int) -> dict[str, Any]:
    """R2 under LoopedBFS: record in a forward-only pass, gather the ranks' stage
    slices into whole-model traces, replay them in the update step."""
    model = build_model()
    controller = routereplay.attach(model)
    stages = build_stages(model, controller, 2, rank, (MICRO_BATCH, SEQ), stages_per_rank=2)
    schedule = ScheduleLoopedBFS(stages, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    input_ids, targets = batch()
    with torch.no_grad(), controller.record() as recording:
        schedule.eval(*((input_ids,) if rank == 0 else ()), target=targets)
    mine = {mb: trace.layers for mb, trace in recording.traces.items()}
    recorded = gather_recording(recording, controller.layout)
    experts = ExpertCalls(model)
    with pipeline_replay(stages, recorded, MICRO_BATCHES):
        schedule.step(*((input_ids,) if rank == 0 else ()), target=targets)
    return {
        "own_layers": mine,
        "recorded": {mb: t.expert_ids() for mb, t in recorded.items()},
        "sequences": [t.token_shape for t in sequence_traces(recorded)],
        "experts": experts.calls,
        "stats": controller.stats(),
    }


def bad_routes(rank: int) -> dict[str, str | None]:
    """The error each malformed input raises on this rank, on entry to pipeline_replay
    (before the schedule, where a failing rank cannot leave its peer waiting)."""
    model = build_model()
    controller = routereplay.attach(model)
    stages = build_stages(model, controller, 2, rank, (MICRO_BATCH, SEQ), stages_per_rank=2)
    routes = random_routes()
    wrong = {
        "missing layer": {mb: t.select_layers([3, 4, 5, 7]) for mb, t in routes.items()},
        "extra micro-batch": {**routes, 7: routes[0]},
        "missing micro-batch": {mb: t for mb, t in routes.items() if mb != 2},
        "wrong token count": split_routes(
            RoutingTrace(
                torch.cat([t.experts for t in routes.values()])[:, : SEQ // 2],
                ROUTED_LAYERS,
                8,
            ),
            MICRO_BATCHES,
        ),
    }
    errors: dict[str, str | None] = {}
    for name, given in wrong.items():
        try:
            # What pipeline_replay checks on entry, before the schedule runs.
            for stage in stages:
                check_stage_routes(stage, given, MICRO_BATCHES)
            errors[name] = None
        except ReplayError as error:
            errors[name] = str(error)
    # torch's shape inference would route made-up activations as no micro-batch.
    try:
        with controller.replay(routes):
            stages[0]._forward_metadata_inference(None)
        errors["shape inference"] = None
    except ReplayError as error:
        errors["shape inference"] = str(error)
    return errors


def all_cases(rank: int) -> dict[Any, Any]:
    results: dict[Any, Any] = {case: run_step(rank, *case) for case in CASES}
    results["r2"] = record_then_replay(rank)
    results["errors"] = bad_routes(rank)
    return results


# -- the single-process reference ------------------------------------------------------


def single_process_replay() -> dict[str, Any]:
    """The same step without a pipeline: each micro-batch replayed in order, the loss
    averaged over micro-batches as the schedules scale gradients."""
    model = build_model()
    controller = routereplay.attach(model)
    experts = ExpertCalls(model)
    input_ids, targets = batch()
    routes = random_routes()
    losses = []
    per_micro_batch = []
    with controller.replay(routes):
        for mb, (ids, tgt) in enumerate(
            zip(input_ids.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES), strict=True)
        ):
            with controller.micro_batch(mb):
                loss = loss_fn(model(ids).logits, tgt)
            (loss / MICRO_BATCHES).backward()
            losses.append(loss.detach())
            per_micro_batch.append({layer: calls[-1] for layer, calls in experts.calls.items()})
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads, "experts": per_micro_batch}


def single_process_recording() -> dict[int, RoutingTrace]:
    model = build_model()
    controller = routereplay.attach(model)
    input_ids, _ = batch()
    with torch.no_grad(), controller.record() as recording:
        for mb, ids in enumerate(input_ids.chunk(MICRO_BATCHES)):
            with controller.micro_batch(mb):
                model(ids)
    return recording.traces


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks() -> list[dict[Any, Any]]:
    return run_on_ranks(all_cases, timeout_s=120.0)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return single_process_replay()


def micro_batch_of(hidden: torch.Tensor, layer: int, reference: dict[str, Any]) -> int:
    """The micro-batch whose tokens these are, from their hidden states alone."""
    matches = [
        mb
        for mb, calls in enumerate(reference["experts"])
        if torch.allclose(hidden, calls[layer][0], atol=1e-5, rtol=0)
    ]
    assert len(matches) == 1, f"layer {layer}: hidden states match micro-batches {matches}"
    return matches[0]


# -- the behaviours --------------------------------------------------------------------


def test_the_stages_hold_the_loop_layout_with_global_layer_ids(ranks: list[dict[Any, Any]]) -> None:
    assert ranks[0][("gpipe", "none")]["stages"] == [(0, (0, 1, 2, 3))]
    assert ranks[1][("gpipe", "none")]["stages"] == [(1, (4, 5, 6, 7))]
    assert ranks[0][("looped_bfs", "none")]["stages"] == [(0, (0, 1)), (2, (4, 5))]
    assert ranks[1][("looped_bfs", "none")]["stages"] == [(1, (2, 3)), (3, (6, 7))]


def test_random_routes_differ_between_micro_batches_and_from_native_routing(
    ranks: list[dict[Any, Any]],
) -> None:
    # Otherwise a micro-batch replaying another's routes would go unnoticed.
    routes = random_routes()
    for layer in ROUTED_LAYERS:
        ids = [routes[mb].layer_experts(layer) for mb in range(MICRO_BATCHES)]
        assert all(not torch.equal(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    stats = {**ranks[0][("gpipe", "none")]["stats"], **ranks[1][("gpipe", "none")]["stats"]}
    assert all(s.disagreed > 0 for s in stats.values())


@pytest.mark.parametrize(("schedule", "checkpointing"), CASES)
def test_every_routed_layer_runs_the_replayed_experts_of_its_micro_batch(
    ranks: list[dict[Any, Any]], reference: dict[str, Any], schedule: str, checkpointing: str
) -> None:
    routes = random_routes()
    runs = 1 if checkpointing == "none" else 2  # forward, and recompute inside backward
    seen: dict[int, list[int]] = {}
    for rank in ranks:
        for layer, calls in rank[(schedule, checkpointing)]["experts"].items():
            for hidden, ids in calls:
                mb = micro_batch_of(hidden, layer, reference)
                expected = routes[mb].layer_experts(layer).reshape(-1, 2).long()
                assert torch.equal(ids, expected), f"layer {layer}, micro-batch {mb}"
                seen.setdefault(layer, []).append(mb)
    assert sorted(seen) == list(ROUTED_LAYERS)
    for layer, micro_batches in seen.items():
        assert sorted(micro_batches) == sorted(list(range(MICRO_BATCHES)) * runs), layer


@pytest.mark.parametrize(("schedule", "checkpointing"), CASES)
def test_counters_show_every_row_replayed_once_and_recomputed_under_checkpointing(
    ranks: list[dict[Any, Any]], schedule: str, checkpointing: str
) -> None:
    stats = {**ranks[0][(schedule, checkpointing)]["stats"]}
    stats.update(ranks[1][(schedule, checkpointing)]["stats"])
    assert sorted(stats) == list(ROUTED_LAYERS)
    rows = BATCH * SEQ
    for layer, layer_stats in stats.items():
        recomputed = 0 if checkpointing == "none" else rows
        assert (layer_stats.replayed, layer_stats.native, layer_stats.recomputed) == (
            rows,
            0,
            recomputed,
        ), layer


@pytest.mark.parametrize(("schedule", "checkpointing"), CASES)
def test_loss_and_gradients_equal_a_single_process_replay(
    ranks: list[dict[Any, Any]], reference: dict[str, Any], schedule: str, checkpointing: str
) -> None:
    last = ranks[1][(schedule, checkpointing)]  # rank 1 holds the last stage
    assert len(last["losses"]) == MICRO_BATCHES
    for ours, theirs in zip(last["losses"], reference["losses"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    grads = {**ranks[0][(schedule, checkpointing)]["grads"], **last["grads"]}
    assert grads.keys() == reference["grads"].keys()
    assert sum(".mlp.gate.weight" in name for name in grads) == len(ROUTED_LAYERS)
    for name, grad in grads.items():
        expected = reference["grads"][name]
        tolerance = 1e-5 * max(float(expected.abs().max()), 1e-12)
        assert float((grad - expected).abs().max()) <= tolerance, name


def test_r2_recording_gathered_from_the_stages_equals_a_single_process_recording(
    ranks: list[dict[Any, Any]],
) -> None:
    expected = single_process_recording()
    assert ranks[0]["r2"]["own_layers"] == {mb: (4, 5) for mb in range(MICRO_BATCHES)}
    assert ranks[1]["r2"]["own_layers"] == {mb: (3, 6, 7) for mb in range(MICRO_BATCHES)}
    for rank in ranks:
        recorded = rank["r2"]["recorded"]
        assert sorted(recorded) == list(range(MICRO_BATCHES))
        for mb, ids in recorded.items():
            assert torch.equal(ids, expected[mb].expert_ids()), f"micro-batch {mb}"
        assert rank["r2"]["sequences"] == [(SEQ,)] * BATCH


def test_r2_replay_of_the_gathered_recording_reaches_the_experts_of_each_micro_batch(
    ranks: list[dict[Any, Any]],
) -> None:
    for rank in ranks:
        recorded = rank["r2"]["recorded"]  # micro-batch -> [MICRO_BATCH, SEQ, layers, k]
        for layer, calls in rank["r2"]["experts"].items():
            slot = ROUTED_LAYERS.index(layer)
            matched = sorted(
                mb
                for _, ids in calls
                for mb, experts in recorded.items()
                if torch.equal(ids, experts[:, :, slot].reshape(-1, 2))
            )
            assert matched == list(range(MICRO_BATCHES)), f"layer {layer}: {matched}"
        # Same weights, same inputs: the live router agrees with its own recording.
        assert all(s.disagreed == 0 and s.replayed > 0 for s in rank["r2"]["stats"].values())
    seen = {layer for rank in ranks for layer in rank["r2"]["experts"]}
    assert seen == set(ROUTED_LAYERS)


@pytest.mark.parametrize(
    ("case", "messages"),
    [
        (
            "missing layer",
            [
                None,
                r"^stage 3 \(pp_rank 1\): Layer 6, micro-batch 0: the routes have no layer 6 "
                r"\(they cover \[3, 4, 5, 7\]\); the routers here route \[6, 7\]",
            ],
        ),
        (
            "extra micro-batch",
            [
                r"^stage 0 \(pp_rank 0\): Routes were given for micro-batch 7, which the "
                r"schedule does not run \(it runs \[0, 1, 2, 3\]\)",
                r"^stage 1 \(pp_rank 1\): Routes were given for micro-batch 7",
            ],
        ),
        (
            "missing micro-batch",
            [
                r"^stage 2 \(pp_rank 0\): Layer 4, micro-batch 2: no routes were given for "
                r"this micro-batch \(routes given for \[0, 1, 3\]\)",
                r"^stage 1 \(pp_rank 1\): Layer 3, micro-batch 2: no routes",
            ],
        ),
        (
            "wrong token count",
            [
                r"^stage 2 \(pp_rank 0\): Layer 4, micro-batch 0: the routes hold 8 rows "
                r"\(token axes \[2, 4\]\) but the micro-batch is 16 tokens",
                r"^stage 1 \(pp_rank 1\): Layer 3, micro-batch 0: the routes hold 8 rows",
            ],
        ),
        (
            "shape inference",
            [r"^stage 0 \(pp_rank 0\): torch's shape-inference pass", r"^stage 1 \(pp_rank 1\)"],
        ),
    ],
)
def test_bad_routes_name_stage_rank_layer_and_micro_batch(
    ranks: list[dict[Any, Any]], case: str, messages: list[str | None]
) -> None:
    for rank, message in zip(ranks, messages, strict=True):
        error = rank["errors"][case]
        if message is None:
            assert error is None, error
        else:
            assert error is not None and re.search(message, error), error


def missing_layer_mid_schedule(rank: int) -> None:
    """Bypasses pipeline_replay's up-front check: rank 1 fails inside 1F1B's first
    forward, while rank 0 waits for its gradients."""
    model = build_model()
    controller = routereplay.attach(model)
    stages = build_stages(model, controller, 2, rank, (MICRO_BATCH, SEQ))
    schedule = Schedule1F1B(stages[0], n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    routes = {mb: t.select_layers([3, 4, 5, 7]) for mb, t in random_routes().items()}
    input_ids, targets = batch()
    with controller.replay(routes):
        schedule.step(*((input_ids,) if rank == 0 else ()), target=targets)


def test_a_stage_failing_inside_the_schedule_names_itself() -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(missing_layer_mid_schedule, timeout_s=60.0)
    assert re.search(
        r"ReplayError: stage 1 \(pp_rank 1\): Layer 6, micro-batch 0: the trace has no "
        r"routes for this layer \(it covers \[3, 4, 5, 7\]\)",
        str(failure.value),
    ), str(failure.value)


def replay_error_of_a_1f1b_step(
    rank: int, routes: dict[int, RoutingTrace], input_ids: torch.Tensor | None = None
) -> str:
    """What one 1F1B step under `pipeline_replay(routes)` raises on this rank."""
    model = build_model()
    controller = routereplay.attach(model)
    stages = build_stages(model, controller, 2, rank, (MICRO_BATCH, SEQ))
    schedule = Schedule1F1B(stages[0], n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    inputs, targets = batch()
    try:
        with pipeline_replay(stages, routes, MICRO_BATCHES, input_ids=input_ids):
            schedule.step(*((inputs,) if rank == 0 else ()), target=targets)
    except ReplayError as error:
        return str(error)
    return "no error"


def one_rank_with_bad_routes(rank: int) -> str:
    """Rank 1 lacks a layer its stage routes; rank 0's routes are fine. Both enter
    pipeline_replay: the one collective of its checks must fail both, at once."""
    routes = random_routes()
    if rank == 1:
        routes = {mb: t.select_layers([3, 4, 5, 7]) for mb, t in routes.items()}
    return replay_error_of_a_1f1b_step(rank, routes)


def test_a_rank_whose_routes_fail_the_checks_fails_every_rank_before_the_schedule() -> None:
    start = time.monotonic()
    messages = run_on_ranks(one_rank_with_bad_routes, timeout_s=60.0)
    assert time.monotonic() - start < 45  # no rank waits out a process-group timeout
    assert re.search(
        r"^stage 1 \(pp_rank 1\): Layer 6, micro-batch 0: the routes have no layer 6", messages[1]
    )
    assert re.search(
        r"^stage 0 \(pp_rank 0\): pipeline rank 1 of this group failed its route checks, so no "
        r"rank runs the schedule: stage 1 \(pp_rank 1\): Layer 6",
        messages[0],
    ), messages[0]


def routes_of_other_micro_batches(rank: int) -> str:
    """The routes know their tokens; rank 0 hands them to the wrong micro-batches."""
    input_ids, _ = batch()
    pieces = torch.tensor_split(input_ids, MICRO_BATCHES)
    routes = {mb: t.with_tokens(pieces[mb]) for mb, t in random_routes().items()}
    if rank == 0:
        routes = {mb: routes[(mb + 1) % MICRO_BATCHES] for mb in routes}
    return replay_error_of_a_1f1b_step(rank, routes, input_ids)


def test_routes_of_other_micro_batches_are_caught_by_their_tokens_on_every_rank() -> None:
    messages = run_on_ranks(routes_of_other_micro_batches, timeout_s=60.0)
    assert re.search(
        r"^Micro-batch 0: the trace was recorded for token \d+ at sequence 0, position 0, but the batch holds token \d+ there",
        messages[0],
    ), messages[0]
    assert re.search(r"pipeline rank 0 of this group failed its route checks", messages[1]), (
        messages[1]
    )


def one_rank_with_routes_of_another_model(rank: int) -> str:
    """Rank 1's routes have 16 experts, the model 8: the layout check, which replay()
    runs on entry, is shared before the schedule too."""
    routes = random_routes()
    if rank == 1:
        routes = {mb: RoutingTrace(t.experts, t.layers, 16) for mb, t in routes.items()}
    return replay_error_of_a_1f1b_step(rank, routes)


def test_routes_of_another_model_on_one_rank_fail_every_rank_before_the_schedule() -> None:
    messages = run_on_ranks(one_rank_with_routes_of_another_model, timeout_s=60.0)
    assert "16 experts" in messages[1], messages[1]
    assert "pipeline rank 1 of this group failed its route checks" in messages[0], messages[0]
