"""Token-checked replay: routes know the tokens they were recorded for, and replay
refuses a batch that holds other tokens at their positions, before a route is used.

Rollouts come from the embedded engine, as vLLM's would: one trace per sequence with
its token ids; the trainer lays them out (padding either side, packing, CP pieces) as
its batch, and any misalignment of the seed's kind is an error naming the sequence,
the position and both token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hf_models import ExpertIds, tiny_model

import routereplay
from routereplay import ReplayError, Rollout, RoutingTrace
from routereplay.align import (
    balanced_micro_batches,
    concat_traces,
    pad_traces,
    padded_lengths,
    plan_thd,
)
from routereplay.engines.hf import RecordingEngine, SamplingParams

PROMPTS = ([11, 12, 13], [21, 22, 23, 24, 25])


@pytest.fixture(scope="module")
def rollouts() -> tuple[Any, list[Rollout]]:
    model = tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[0])
    engine = RecordingEngine(model, dtype=torch.float32)
    sampled = engine.generate([list(p) for p in PROMPTS], SamplingParams(max_new_tokens=4))
    return model, sampled


@contextmanager
def attached(model: Any) -> Iterator[routereplay.ReplayController]:
    """`routereplay.attach(model)`, detached again however the block ends."""
    controller = routereplay.attach(model)
    try:
        yield controller
    finally:
        controller.detach()


def right_padded(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, RoutingTrace]:
    """input_ids and attention mask of the rollouts right-padded, and their trace."""
    width = max(len(r.token_ids) for r in rollouts)
    ids = torch.zeros((len(rollouts), width), dtype=torch.long)
    mask = torch.zeros((len(rollouts), width), dtype=torch.long)
    for row, rollout in enumerate(rollouts):
        ids[row, : len(rollout.token_ids)] = rollout.token_ids
        mask[row, : len(rollout.token_ids)] = 1
    traces = [r.routes for r in rollouts if r.routes is not None]
    return ids, mask, pad_traces(traces, mask=mask.bool())


def test_engine_traces_carry_their_token_ids(rollouts: tuple[Any, list[Rollout]]) -> None:
    _, sampled = rollouts
    for rollout in sampled:
        assert rollout.routes is not None and rollout.routes.tokens is not None
        assert rollout.routes.tokens.tolist() == rollout.token_ids.tolist()


def test_a_batch_laid_out_like_the_trace_replays(rollouts: tuple[Any, list[Rollout]]) -> None:
    model, sampled = rollouts
    ids, mask, trace = right_padded(sampled)
    assert trace.tokens is not None and (trace.tokens[mask == 0] == -1).all()
    experts = ExpertIds(model)
    try:
        with attached(model) as controller, torch.no_grad(), controller.replay(trace):
            model(ids, attention_mask=mask)
        ran = experts.last(1).reshape(*ids.shape, -1)  # [batch, seq, top_k] at mlp.experts
        wanted = trace.layer_experts(1).long()
        routed = wanted[..., 0] >= 0
        assert torch.equal(ran[routed].sort(-1).values, wanted[routed].sort(-1).values)
        assert controller.totals().replayed > 0
    finally:
        experts.remove()


def replay_error(model: Any, trace: RoutingTrace, ids: torch.Tensor, **kwargs: Any) -> str:
    with (
        attached(model) as controller,
        torch.no_grad(),
        pytest.raises(ReplayError) as error,
        controller.replay(trace),
    ):
        model(ids, **kwargs)
    return str(error.value)


def test_a_right_padded_trace_on_a_left_padded_batch_is_refused(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids, mask, trace = right_padded(sampled)
    shift = [int((1 - row).sum()) for row in mask]  # padding per row
    left_ids = torch.stack([row.roll(s) for row, s in zip(ids, shift, strict=True)])
    left_mask = torch.stack([row.roll(s) for row, s in zip(mask, shift, strict=True)])
    # The trace knows its tokens: they are what gives it away.
    message = replay_error(model, trace, left_ids, attention_mask=left_mask)
    assert "Micro-batch 0: the trace was recorded for token" in message
    # Without token ids, the routes on padding positions do.
    message = replay_error(model, trace.with_tokens(None), left_ids, attention_mask=left_mask)
    assert "Micro-batch 0: the trace routes sequence 0, position" in message
    assert (
        "which the attention mask marks padding" in message
        and "padded on the other side" in message
    )


def test_a_recording_made_without_a_mask_replays_with_one(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    # Its padding positions were routed (no mask said otherwise), but it knows its
    # tokens, and they are the batch's: harmless routes on padding, not a misalignment.
    model, sampled = rollouts
    ids, mask, _ = right_padded(sampled)
    with attached(model) as controller:
        with torch.no_grad(), controller.record() as recording:
            model(ids)
        with torch.no_grad(), controller.replay(recording.trace):
            model(ids, attention_mask=mask)


def test_token_ids_are_kept_as_they_were_when_the_input_buffer_is_reused(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids, mask, _ = right_padded(sampled)
    buffer = ids.clone()  # a static input buffer, written in place between forwards
    with attached(model) as controller:
        with torch.no_grad(), controller.record() as recording:
            model(buffer, attention_mask=mask)
            buffer[0, 0] += 1
            with pytest.raises(
                ReplayError,
                match=r"a second forward runs other tokens \(token \d+ at flat position 0, where the first forward had \d+\)",
            ):
                model(buffer, attention_mask=mask)
        assert recording.trace.tokens is not None
        assert torch.equal(recording.trace.tokens.long(), ids.masked_fill(mask == 0, -1))


def test_a_micro_batch_published_by_hand_still_tells_batches_apart(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids, mask, _ = right_padded(sampled)
    with (
        attached(model) as controller,
        torch.no_grad(),
        controller.record(),
        controller.micro_batch(0, tuple(ids.shape)),
    ):
        model(ids, attention_mask=mask)
        with pytest.raises(ReplayError, match=r"a second forward runs other tokens"):
            model(ids.flip(0), attention_mask=mask.flip(0))


def test_a_shifted_row_names_the_sequence_position_and_both_tokens(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids, mask, trace = right_padded(sampled)
    shifted = ids.clone()
    shifted[1, 1:] = ids[1, :-1]  # a prompt token dropped in front: everything moves by one
    message = replay_error(model, trace, shifted, attention_mask=mask)
    assert (
        f"the trace was recorded for token {int(ids[1, 1])} at sequence 1, position 1, but the "
        f"batch holds token {int(ids[1, 0])} there"
    ) in message


def test_swapped_sequences_are_refused(rollouts: tuple[Any, list[Rollout]]) -> None:
    model, sampled = rollouts
    first, second = sampled[0], sampled[1]
    assert first.routes is not None and second.routes is not None
    width = len(first.token_ids)  # two sequences of one length: no padding to tell them apart
    trace = pad_traces([first.routes, second.routes.select_tokens(slice(0, width))])
    ids = torch.stack([first.token_ids, second.token_ids[:width]])
    message = replay_error(model, trace, ids.flip(0))
    assert (
        f"the trace was recorded for token {int(ids[0, 0])} at sequence 0, position 0, but "
        f"the batch holds token {int(ids[1, 0])} there"
    ) in message


def test_a_sequence_first_trace_on_a_batch_first_input_is_refused(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids = torch.stack([sampled[1].token_ids[:6], sampled[1].token_ids[1:7]])  # [2, 6]
    with attached(model) as controller, torch.no_grad(), controller.record() as recording:
        model(ids)
    trace = recording.trace.reshape_tokens(6, 2)  # the same ids laid out [6, 2]
    message = replay_error(model, trace, ids)
    assert (
        "the batch has token axes [2, 6]; the trace [6, 2]: the same count, laid out otherwise"
        in message
    )


def test_a_swapped_context_parallel_piece_is_refused(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    traces = [r.routes for r in sampled if r.routes is not None]
    batch, found = concat_traces(traces)
    groups = balanced_micro_batches(padded_lengths(found, 4), 10_000)
    plan = plan_thd(found, groups, cp_size=2)
    tokens = torch.cat([r.token_ids for r in sampled])
    rank0, rank1 = plan.rank_routes(batch, 0), plan.rank_routes(batch, 1)
    ids = {piece.cp_rank: ids for piece, ids in plan.apply(tokens, pad=0).items()}
    # Rank 0 runs its own tokens, packed as one row, with rank 1's routes.
    message = replay_error(model, rank1[0].reshape_tokens(1, -1), ids[0][None])
    assert "the trace was recorded for token" in message and "but the batch holds token" in message
    # Its own routes replay.
    with (
        attached(model) as controller,
        torch.no_grad(),
        controller.replay(rank0[0].reshape_tokens(1, -1)),
    ):
        model(ids[0][None], position_ids=torch.arange(ids[0].numel())[None])


def test_a_recording_keeps_the_batchs_tokens_for_r2(rollouts: tuple[Any, list[Rollout]]) -> None:
    model, sampled = rollouts
    ids, mask, _ = right_padded(sampled)
    with attached(model) as controller:
        with torch.no_grad(), controller.record() as recording:
            model(ids, attention_mask=mask)
        trace = recording.trace
        assert trace.tokens is not None
        assert torch.equal(trace.tokens.long(), ids.masked_fill(mask == 0, -1))
        other = ids.clone()
        other[0, 0] += 1
        with (
            torch.no_grad(),
            pytest.raises(ReplayError, match=r"sequence 0, position 0"),
            controller.replay(trace),
        ):
            model(other, attention_mask=mask)


def test_a_second_batch_under_one_micro_batch_key_is_not_taken_for_recompute(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, sampled = rollouts
    ids, mask, _ = right_padded(sampled)
    with attached(model) as controller, torch.no_grad(), controller.record():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)  # the same batch again: fine
        with pytest.raises(
            ReplayError,
            match=r"a second forward runs other tokens .* under the same micro-batch key",
        ):
            model(ids.flip(0), attention_mask=mask.flip(0))


def test_generate_under_record_says_how_to_record_generation(
    rollouts: tuple[Any, list[Rollout]],
) -> None:
    model, _ = rollouts
    with (
        attached(model) as controller,
        torch.no_grad(),
        controller.record(),
        pytest.raises(
            ReplayError,
            match=r"model\.generate\(\) runs a forward per new token: record generation with routereplay\.engines\.hf\.RecordingEngine",
        ),
    ):
        model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=3, do_sample=False)
