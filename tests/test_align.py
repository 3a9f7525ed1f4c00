"""routereplay.align: trainer layouts as index plans, applied alike to tokens and routes."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routereplay import LayoutError, MoELayout, PipelineSplit, RoutingTrace, TraceError
from routereplay.align import (
    MicroBatches,
    Piece,
    ThdPlan,
    TokenPlan,
    balanced_micro_batches,
    concat_traces,
    context_parallel_plans,
    fixed_micro_batches,
    mask_plan,
    pack_plan,
    pack_traces,
    pad_plan,
    pad_traces,
    padded_lengths,
    plan_thd,
    restore,
    restore_trace,
    sequence_parallel_plans,
    split_traces,
    stack_stages,
    stage_slice,
    unpack_traces,
    unpad_traces,
)

# The conftest's hybrid layout: layers 0-1 dense, 2-7 routed, 16 experts, top-4. With
# PP=2 x VPP=2 each chunk holds 2 layers, so chunk (pp 0, vp 0) routes nothing.
LAYOUT = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], num_experts=16, top_k=4)
PP2_VPP2 = PipelineSplit(pp_size=2, vp_size=2)
STAGES = [(pp, vp) for vp in range(2) for pp in range(2)]

lengths_strategy = st.lists(st.integers(0, 12), min_size=1, max_size=6)


def routes_of(token_ids: torch.Tensor) -> torch.Tensor:
    """Routes derived from the token id and layer: `[..., layers, top_k]`, -1 where id is -1."""
    layers = torch.tensor(LAYOUT.moe_layers)
    columns = torch.arange(LAYOUT.top_k) * (LAYOUT.num_experts // LAYOUT.top_k)
    ids = token_ids[..., None, None]
    experts = (3 * ids + 5 * layers[:, None] + columns) % LAYOUT.num_experts
    return torch.where(ids >= 0, experts, -1)


def batch_trace(num_tokens: int) -> RoutingTrace:
    """The batch's routes `[num_tokens, layers, top_k]`, token i's routes = routes_of(i)."""
    return RoutingTrace(routes_of(torch.arange(num_tokens)), LAYOUT.moe_layers, 16)


def sequence_traces(lengths: list[int]) -> list[RoutingTrace]:
    return split_traces(batch_trace(sum(lengths)), lengths)


# -- padding ----------------------------------------------------------------------------


def test_right_padding_puts_minus_one_after_each_sequence() -> None:
    plan = pad_plan([3, 1, 2])
    assert plan.apply(torch.arange(6)).tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert plan.valid_lengths.tolist() == [3, 1, 2]


def test_left_padding_puts_minus_one_before_each_sequence() -> None:
    plan = pad_plan([3, 1, 2], seq_len=4, side="left")
    assert plan.apply(torch.arange(6)).tolist() == [[-1, 0, 1, 2], [-1, -1, -1, 3], [-1, -1, 4, 5]]


def test_token_ids_take_their_own_pad_value() -> None:
    padded = pad_plan([1, 2]).apply(torch.tensor([7, 8, 9]), pad=0)
    assert padded.tolist() == [[7, 0], [8, 9]]


@given(lengths_strategy, st.sampled_from(["right", "left"]), st.integers(0, 3))
def test_a_padded_batch_of_traces_unpads_to_the_same_sequences(
    lengths: list[int], side: Literal["right", "left"], extra: int
) -> None:
    traces = sequence_traces(lengths)
    batch = pad_traces(traces, max(lengths) + extra, side=side)
    assert batch.token_shape == (len(lengths), max(lengths) + extra)
    plan = pad_plan(lengths, max(lengths) + extra, side=side)
    padding = plan.rows.view(batch.token_shape) < 0
    assert bool((batch.experts[padding] == -1).all())
    back = unpad_traces(batch, lengths, side=side)
    assert all(a.equal(b) for a, b in zip(back, traces, strict=True))


def test_a_mask_lays_out_verls_left_padded_prompt_and_right_padded_response() -> None:
    # Row 0: prompt of 2 (left-padded to 3), response of 1 (right-padded to 3).
    mask = torch.tensor(
        [[False, True, True, True, False, False], [True, True, True, True, True, False]]
    )
    plan = mask_plan(mask)
    assert plan.apply(torch.arange(8)).tolist() == [
        [-1, 0, 1, 2, -1, -1],
        [3, 4, 5, 6, 7, -1],
    ]
    assert plan.valid_lengths.tolist() == [3, 5]


masks = st.integers(1, 5).flatmap(
    lambda rows: st.lists(
        st.lists(st.booleans(), min_size=6, max_size=6), min_size=rows, max_size=rows
    )
)


@given(masks)
def test_traces_laid_out_by_a_mask_come_back_out_by_it(rows: list[list[bool]]) -> None:
    mask = torch.tensor(rows)
    traces = sequence_traces(mask.sum(1).tolist())
    batch = pad_traces(traces, mask=mask)
    assert batch.token_shape == tuple(mask.shape)
    assert bool((batch.experts[~mask] == -1).all())
    assert torch.equal(batch.experts[mask], concat_traces(traces)[0].experts)
    back = unpad_traces(batch, mask=mask)
    assert all(a.equal(b) for a, b in zip(back, traces, strict=True))


# -- THD packing ------------------------------------------------------------------------


def test_packing_pads_each_sequence_to_the_multiple_with_padded_cu_seqlens() -> None:
    plan = pack_plan([3, 1, 6], multiple=4)
    assert plan.apply(torch.arange(10)).tolist() == [
        *[0, 1, 2, -1],
        *[3, -1, -1, -1],
        *[4, 5, 6, 7, 8, 9, -1, -1],
    ]
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.tolist() == [0, 4, 8, 16]
    assert plan.valid_lengths.tolist() == [3, 1, 6]


@given(lengths_strategy, st.sampled_from([1, 2, 4, 16]))
def test_packed_traces_unpack_to_the_same_sequences(lengths: list[int], multiple: int) -> None:
    traces = sequence_traces(lengths)
    packed, plan = pack_traces(traces, multiple)
    assert packed.token_shape == (int(padded_lengths(lengths, multiple).sum()),)
    assert torch.equal(packed.experts, routes_of(plan.apply(torch.arange(sum(lengths)))))
    back = unpack_traces(packed, lengths, multiple)
    assert all(a.equal(b) for a, b in zip(back, traces, strict=True))


# -- micro-batches ----------------------------------------------------------------------


def test_fixed_micro_batches_keep_batch_order_with_a_short_last_one() -> None:
    groups = fixed_micro_batches(5, 2)
    assert [g.tolist() for g in groups.groups] == [[0, 1], [2, 3], [4]]
    assert groups.order.tolist() == [0, 1, 2, 3, 4]


@given(st.lists(st.integers(0, 20), min_size=1, max_size=12), st.integers(0, 20))
def test_balanced_micro_batches_stay_under_the_budget_and_hold_every_sequence_once(
    lengths: list[int], slack: int
) -> None:
    budget = max(max(lengths), 1) + slack
    groups = balanced_micro_batches(lengths, budget)
    loads = [sum(lengths[i] for i in g.tolist()) for g in groups.groups]
    assert all(load <= budget for load in loads)
    assert sorted(groups.order.tolist()) == list(range(len(lengths)))


@given(st.lists(st.integers(1, 20), min_size=1, max_size=12))
def test_inverse_order_puts_per_micro_batch_results_back_in_batch_order(lengths: list[int]) -> None:
    groups = balanced_micro_batches(lengths, max(lengths) + 5)
    per_sequence = torch.tensor(lengths) * 10  # a result computed per sequence
    in_micro_batch_order = torch.cat([per_sequence[g] for g in groups.groups])
    assert torch.equal(in_micro_batch_order, per_sequence[groups.order])
    assert torch.equal(in_micro_batch_order[groups.inverse_order], per_sequence)


def test_balanced_micro_batches_reorder_sequences_to_balance_tokens() -> None:
    groups = balanced_micro_batches([5, 3, 8, 2, 7], max_tokens=10)
    assert [g.tolist() for g in groups.groups] == [[2], [3, 4], [0, 1]]  # loads 8, 9, 8
    assert groups.order.tolist() == [2, 3, 4, 0, 1]
    assert groups.inverse_order.tolist() == [3, 4, 0, 1, 2]


def test_micro_batch_count_is_a_multiple_when_asked() -> None:
    groups = balanced_micro_batches([4] * 7, max_tokens=12, multiple_of=4)
    assert len(groups) == 4


def test_too_many_micro_batches_for_the_sequences_is_rejected() -> None:
    with pytest.raises(LayoutError, match="3 sequences cannot fill 4 micro-batches, and at most 2"):
        balanced_micro_batches([4, 4, 4], max_tokens=5, multiple_of=2)


def test_micro_batch_plans_select_their_sequences_tokens() -> None:
    groups = MicroBatches((torch.tensor([2]), torch.tensor([0, 1])), 3)
    plans = groups.plans([2, 1, 3])
    assert [p.apply(torch.arange(6)).tolist() for p in plans] == [[3, 4, 5], [0, 1, 2]]
    assert plans[1].lengths.tolist() == [2, 1]


# -- context and sequence parallelism ------------------------------------------------------


def test_zigzag_cp_gives_rank_r_chunks_r_and_2cp_minus_1_minus_r_of_every_sequence() -> None:
    # Sequence 0 is tokens 0-7 (chunks of 2), sequence 1 tokens 8-11 (chunks of 1).
    ranks = context_parallel_plans([8, 4], cp_size=2)
    ids = torch.arange(12)
    assert ranks[0].apply(ids).tolist() == [0, 1, 6, 7, 8, 11]  # chunks 0 and 3
    assert ranks[1].apply(ids).tolist() == [2, 3, 4, 5, 9, 10]  # chunks 1 and 2
    assert ranks[0].lengths.tolist() == [4, 2]


def test_contiguous_cp_gives_rank_r_the_rth_block_of_every_sequence() -> None:
    ranks = context_parallel_plans([4, 2], cp_size=2, zigzag=False)
    assert [r.apply(torch.arange(6)).tolist() for r in ranks] == [[0, 1, 4], [2, 3, 5]]


@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=5),
    st.integers(1, 3),
    st.booleans(),
)
def test_cp_split_restores_to_the_packed_sequences(
    chunks: list[int], cp_size: int, zigzag: bool
) -> None:
    lengths = [c * 2 * cp_size for c in chunks]
    ranks = context_parallel_plans(lengths, cp_size, zigzag=zigzag)
    trace = batch_trace(sum(lengths))
    pieces = [plan.apply_trace(trace) for plan in ranks]
    assert restore_trace(pieces, ranks).equal(trace)


def test_sequence_parallel_gives_each_tp_rank_a_contiguous_chunk_of_each_row() -> None:
    thd = sequence_parallel_plans(8, tp_size=2)
    assert [p.apply(torch.arange(8)).tolist() for p in thd] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows = sequence_parallel_plans(8, tp_size=2, rows=2)
    assert [p.apply(torch.arange(8)).tolist() for p in rows] == [[0, 1, 4, 5], [2, 3, 6, 7]]


# -- pipeline stages --------------------------------------------------------------------


def test_stage_slices_hold_the_routed_layers_megatron_builds_there() -> None:
    trace = batch_trace(3)
    slices = [stage_slice(trace, LAYOUT, PP2_VPP2, pp, vp) for pp, vp in STAGES]
    assert [s.layers for s in slices] == [(), (2, 3), (4, 5), (6, 7)]
    assert slices[2].experts.data_ptr() == trace.layer_experts(4).data_ptr()  # a view


def test_stage_slices_stack_back_into_every_routed_layer() -> None:
    trace = batch_trace(5)
    slices = [stage_slice(trace, LAYOUT, PP2_VPP2, pp, vp) for pp, vp in STAGES]
    assert stack_stages(slices[::-1], LAYOUT).equal(trace)


# -- the whole batch: micro-batch -> pack -> CP -> SP -> stage, and back --------------------


ThdCase = tuple[list[int], int, int, bool, int | None]

thd_cases = st.tuples(
    st.lists(st.integers(0, 14), min_size=1, max_size=7),
    st.integers(1, 3),  # cp_size
    st.integers(1, 2),  # sp_size
    st.booleans(),  # zigzag
    st.one_of(st.none(), st.integers(0, 30)),  # balanced budget slack, or one micro-batch
)


def build_thd(case: ThdCase) -> tuple[list[int], ThdPlan]:
    lengths, cp_size, sp_size, zigzag, slack = case
    multiple = sp_size * cp_size * 2
    groups = None
    if slack is not None:
        padded = padded_lengths(lengths, multiple)
        groups = balanced_micro_batches(padded, int(padded.max()) + multiple + slack)
    plan = plan_thd(
        lengths, groups, multiple=multiple, cp_size=cp_size, sp_size=sp_size, zigzag=zigzag
    )
    return lengths, plan


@given(thd_cases)
def test_every_step_and_back_restores_each_sequences_routes(case: ThdCase) -> None:
    lengths, plan = build_thd(case)
    traces = sequence_traces(lengths)
    batch, found = concat_traces(traces, lengths)
    on_ranks = plan.apply_trace(batch)
    # Each pipeline stage holds its own layers of each piece; stack them, gather ranks.
    per_stage = {
        piece: [stage_slice(t, LAYOUT, PP2_VPP2, pp, vp) for pp, vp in STAGES]
        for piece, t in on_ranks.items()
    }
    stacked = {piece: stack_stages(slices, LAYOUT) for piece, slices in per_stage.items()}
    back = split_traces(plan.restore_trace(stacked), found)
    assert all(a.equal(b) for a, b in zip(back, traces, strict=True))


@given(thd_cases)
def test_every_token_and_layer_lands_on_exactly_one_rank_and_stage(case: ThdCase) -> None:
    lengths, plan = build_thd(case)
    tokens = sum(lengths)
    placed = torch.zeros(tokens, len(LAYOUT.moe_layers), dtype=torch.int64)
    ids = plan.apply(torch.arange(tokens))
    for piece, trace in plan.apply_trace(batch_trace(tokens)).items():
        assert bool((trace.experts[ids[piece] < 0] == -1).all())  # padding rows are -1
        for pp, vp in STAGES:
            stage = stage_slice(trace, LAYOUT, PP2_VPP2, pp, vp)
            slots = [LAYOUT.moe_ordinal(layer) for layer in stage.layers]
            real = ids[piece][ids[piece] >= 0]
            at = (real[:, None], torch.tensor(slots, dtype=torch.int64)[None, :])
            placed.index_put_(at, torch.ones((), dtype=torch.int64), accumulate=True)
    assert bool((placed == 1).all())


@given(thd_cases)
def test_routes_stay_next_to_their_tokens_through_the_same_plan(case: ThdCase) -> None:
    lengths, plan = build_thd(case)
    tokens = sum(lengths)
    ids = plan.apply(torch.arange(tokens))
    routes = plan.apply_trace(batch_trace(tokens))
    for piece, trace in routes.items():
        assert torch.equal(trace.expert_ids(), routes_of(ids[piece]))


@given(thd_cases, st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1)]))
def test_a_rank_gets_exactly_its_tokens_and_its_stages_layers(
    case: ThdCase, pipeline: tuple[int, int]
) -> None:
    lengths, plan = build_thd(case)
    pp_size, vp_size = pipeline
    batch = batch_trace(sum(lengths))
    everything = plan.apply_trace(batch)
    for piece in everything:
        for pp_rank in range(pp_size):
            layers = LAYOUT.rank_moe_layers(PipelineSplit(pp_size, vp_size), pp_rank)
            routes = plan.rank_routes(batch, piece.cp_rank, piece.tp_rank, layers)
            assert routes[piece.micro_batch].layers == layers
            assert routes[piece.micro_batch].equal(everything[piece].select_layers(layers))


def test_a_rank_of_pp_2_vpp_2_routes_two_separate_layer_runs() -> None:
    assert LAYOUT.rank_moe_layers(PP2_VPP2, 0) == (4, 5)  # vp_stage 0 holds dense layers only
    assert LAYOUT.rank_moe_layers(PP2_VPP2, 1) == (2, 3, 6, 7)
    plan = plan_thd([5, 3], cp_size=2)
    routes = plan.rank_routes(batch_trace(8), cp_rank=1, layers=(2, 3, 6, 7))
    ids = plan.apply(torch.arange(8))[Piece(0, 1, 0)]
    assert torch.equal(routes[0].expert_ids(), routes_of(ids)[:, [0, 1, 4, 5]])


def test_joining_sequences_over_some_layers_copies_only_those() -> None:
    traces = sequence_traces([3, 0, 4])
    joined, lengths = concat_traces(traces, layers=(7, 2, 3))
    assert joined.layers == (2, 3, 7)
    assert joined.equal(concat_traces(traces)[0].select_layers((2, 3, 7)))
    assert lengths.tolist() == [3, 0, 4]


def test_no_layers_gives_an_empty_layer_axis() -> None:
    routes = plan_thd([3]).rank_routes(batch_trace(3), layers=())
    assert routes[0].layers == () and routes[0].experts.shape == (3, 0, 4)


def test_layer_runs_of_an_odd_top_k_move_whole_rows_correctly() -> None:
    layout = MoELayout.from_dense_pattern([1, 1, 1], num_experts=8, top_k=3)
    experts = torch.arange(5 * 3 * 3).reshape(5, 3, 3) % 8  # distinct within each row
    trace = RoutingTrace(experts, layout.moe_layers, 8)
    plan = pad_plan([2, 3], side="left")
    picked = plan.apply_trace(trace, layers=(1, 2))
    assert picked.equal(plan.apply_trace(trace).select_layers((1, 2)))


@given(thd_cases)
def test_plan_thd_equals_chaining_the_single_step_plans(case: ThdCase) -> None:
    lengths, plan = build_thd(case)
    _, cp_size, sp_size, zigzag, _ = case
    for index, select in enumerate(plan.micro_batches.plans(lengths)):
        packed = select.then(pack_plan(select.lengths, sp_size * cp_size * 2))
        assert torch.equal(packed.cu_seqlens, plan.packed[index].cu_seqlens)
        for cp_rank, cp in enumerate(
            context_parallel_plans(packed.lengths, cp_size, zigzag=zigzag)
        ):
            for tp_rank, sp in enumerate(sequence_parallel_plans(cp.num_tokens, sp_size)):
                chained = packed.then(cp).then(sp)
                fused = plan.pieces[Piece(index, cp_rank, tp_rank)]
                assert torch.equal(chained.rows, fused.rows)


def test_thd_plan_with_cp_2_and_sp_2_matches_a_hand_layout() -> None:
    # Two sequences of 5 and 8 tokens, padded to 8 each (sp * cp * 2); zigzag chunks of 2.
    plan = plan_thd([5, 8], cp_size=2, sp_size=2)
    ids = plan.apply(torch.arange(13))
    assert ids[Piece(0, 0, 0)].tolist() == [0, 1, -1, -1]  # seq 0 chunks 0, 3
    assert ids[Piece(0, 0, 1)].tolist() == [5, 6, 11, 12]  # seq 1 chunks 0, 3
    assert ids[Piece(0, 1, 0)].tolist() == [2, 3, 4, -1]  # seq 0 chunks 1, 2
    assert ids[Piece(0, 1, 1)].tolist() == [7, 8, 9, 10]  # seq 1 chunks 1, 2
    assert plan.packed[0].cu_seqlens.tolist() == [0, 8, 16]


@pytest.mark.parametrize(
    ("values", "pad"),
    [
        (torch.arange(6), 0),
        (torch.linspace(0, 1, 6), float("nan")),
        (torch.tensor([True, False, True, True, False, True]), False),
        (torch.arange(36, dtype=torch.int16).view(6, 3, 2), -1),
    ],
)
def test_any_per_token_tensor_goes_through_a_plan_and_back(
    values: torch.Tensor, pad: int | float | bool
) -> None:
    plan = pack_plan([4, 2], multiple=4)
    packed = plan.apply(values, pad)
    assert packed.shape == (8, *values.shape[1:])
    assert torch.equal(restore([packed], [plan]), values)


def test_a_plan_reads_a_layer_range_view_like_the_whole_trace() -> None:
    trace = batch_trace(10)
    plan = pack_plan([3, 7], multiple=4)
    view = trace.experts[:, 1:3]  # not contiguous: rows are 2 of 6 layers
    assert torch.equal(plan.apply(view), plan.apply(trace.experts)[:, 1:3])


# -- errors -------------------------------------------------------------------------------


def test_lengths_that_do_not_match_the_traces_are_rejected() -> None:
    with pytest.raises(TraceError, match="Sequence 1's trace has 3 tokens; the lengths say 4"):
        concat_traces(sequence_traces([2, 3]), [2, 4])


def test_traces_over_different_layers_are_rejected() -> None:
    traces = sequence_traces([2, 3])
    traces[1] = traces[1].select_layers([2, 3, 4])
    with pytest.raises(
        TraceError,
        match=r"Sequence 1's trace covers layers \[2, 3, 4\] with top_k=4 .* sequence 0's covers layers \[2, 3, 4, 5, 6, 7\]",
    ):
        concat_traces(traces)


def test_traces_with_a_different_top_k_are_rejected() -> None:
    other = RoutingTrace(routes_of(torch.arange(2))[..., :2], LAYOUT.moe_layers, 16)
    with pytest.raises(TraceError, match="Sequence 1's trace covers .* with top_k=2"):
        concat_traces([*sequence_traces([3]), other])


def test_a_trace_of_another_token_count_is_rejected_by_a_plan() -> None:
    with pytest.raises(
        TraceError, match="reads a source axis of 6 tokens; the recorded trace has 5"
    ):
        pack_plan([2, 4], multiple=4).apply_trace(batch_trace(5))


def test_a_sequence_longer_than_the_budget_is_rejected() -> None:
    with pytest.raises(
        LayoutError,
        match="Sequence 2 has 9 tokens, more than the micro-batch budget of max_tokens=8",
    ):
        balanced_micro_batches([3, 8, 9], max_tokens=8)


def test_a_sequence_longer_than_the_batch_row_is_rejected() -> None:
    with pytest.raises(LayoutError, match="Sequence 1 has 5 tokens, more than seq_len=4"):
        pad_plan([2, 5], seq_len=4)


def test_unpadding_with_lengths_longer_than_the_rows_names_the_sequence() -> None:
    batch = pad_traces(sequence_traces([2, 3]))
    with pytest.raises(
        TraceError, match="Sequence 0 has 4 tokens, more than the 3 a batch row holds"
    ):
        unpad_traces(batch, [4, 1])


def test_a_mask_must_be_a_bool_batch() -> None:
    with pytest.raises(LayoutError, match=r"bool \[batch, seq\] .* found torch.int64 \[2, 3\]"):
        mask_plan(torch.ones(2, 3, dtype=torch.int64))


def test_traces_that_do_not_fill_their_mask_rows_are_rejected() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(TraceError, match="Sequence 1's trace has 2 tokens; its mask row marks 1"):
        pad_traces(sequence_traces([2, 2]), mask=mask)
    with pytest.raises(TraceError, match=r"3 traces were given for 2 sequences"):
        pad_traces(sequence_traces([2, 1, 1]), mask=mask)
    with pytest.raises(LayoutError, match="Give seq_len or mask, not both"):
        pad_traces(sequence_traces([2, 1]), 3, mask=mask)


def test_unpadding_by_a_mask_of_another_batch_is_rejected() -> None:
    batch = pad_traces(sequence_traces([2, 1]))
    with pytest.raises(
        TraceError, match=r"The mask is \[2, 3\]; the batch's token axes are \[2, 2\]"
    ):
        unpad_traces(batch, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(LayoutError, match="lengths or the batch's mask"):
        unpad_traces(batch)


def test_unpacking_with_other_lengths_than_the_packing_is_rejected() -> None:
    packed, _ = pack_traces(sequence_traces([2, 3]), multiple=4)
    with pytest.raises(TraceError, match="gives 12 tokens; the packed trace has 8"):
        unpack_traces(packed, [2, 5], multiple=4)


def test_cp_needs_sequences_divisible_into_2_cp_chunks() -> None:
    with pytest.raises(
        LayoutError, match=r"Sequence 1 has 6 tokens, not divisible by 2 \* cp_size = 4 \(zigzag\)"
    ):
        context_parallel_plans([8, 6], cp_size=2)


def test_thd_plan_names_the_sequence_whose_padding_does_not_split_over_cp() -> None:
    with pytest.raises(
        LayoutError,
        match=r"Sequence 1 has 5 tokens, padded to 6, not divisible by 2 \* cp_size = 4",
    ):
        plan_thd([4, 5], cp_size=2, multiple=2)


def test_thd_plan_names_the_micro_batch_whose_rank_share_does_not_split_over_sp() -> None:
    with pytest.raises(
        LayoutError,
        match="Micro-batch 1 gives CP rank 0 6 tokens, which do not split into sp_size=4",
    ):
        plan_thd([4, 6], fixed_micro_batches(2, 1), cp_size=1, sp_size=4, multiple=2)


def test_sp_needs_tokens_divisible_by_tp_size() -> None:
    with pytest.raises(LayoutError, match="6 tokens in 1 row.* do not split into tp_size=4"):
        sequence_parallel_plans(6, tp_size=4)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: context_parallel_plans([4], cp_size=0), "cp_size"),
        (lambda: sequence_parallel_plans(4, tp_size=0), "tp_size"),
        (lambda: plan_thd([4], sp_size=0), "sp_size"),
        (lambda: plan_thd([4], cp_size=-1), "cp_size"),
        (lambda: pack_plan([4], multiple=0), "multiple"),
        (lambda: fixed_micro_batches(4, 0), "micro_batch_size"),
    ],
)
def test_parallel_sizes_below_one_are_rejected(build: object, name: str) -> None:
    with pytest.raises(LayoutError, match=f"{name} must be an integer >= 1, found -?[01]"):
        build()  # type: ignore[operator]


def test_restoring_without_every_piece_is_rejected() -> None:
    plan = plan_thd([4, 4], cp_size=2)
    pieces = plan.apply(torch.arange(8))
    del pieces[Piece(0, 1, 0)]
    with pytest.raises(
        TraceError, match=r"no piece for \[Piece\(micro_batch=0, cp_rank=1, tp_rank=0\)\]"
    ):
        plan.restore(pieces)


def test_restoring_a_piece_twice_names_both_holders() -> None:
    ranks = context_parallel_plans([4], cp_size=2)
    with pytest.raises(
        TraceError, match=r"Source token 0 is held by 2 pieces \(Piece 0, Piece 2\)"
    ):
        restore([torch.zeros(2)] * 3, [ranks[0], ranks[1], ranks[0]])


def test_asking_a_plan_for_layers_the_trace_lacks_names_them() -> None:
    trace = batch_trace(4).select_layers((2, 3))
    with pytest.raises(TraceError, match=r"Layers \[4, 5\] were asked for; the .* covers \[2, 3\]"):
        pack_plan([4]).apply_trace(trace, layers=(3, 4, 5))


def test_routes_for_a_rank_outside_the_plan_are_refused() -> None:
    plan = plan_thd([4, 4], cp_size=2)
    with pytest.raises(LayoutError, match=r"\(cp_rank=2, tp_rank=0\) is not a rank .* cp_size=2"):
        plan.rank_routes(batch_trace(8), cp_rank=2)
    with pytest.raises(LayoutError, match="every TP rank replays tp_rank=0's piece"):
        plan.rank_routes(batch_trace(8), tp_rank=1)


def test_a_stage_slice_of_a_trace_without_the_stage_layers_is_rejected() -> None:
    partial = batch_trace(2).select_layers([2, 3])
    with pytest.raises(
        TraceError,
        match=r"stage \(pp_rank=1, vp_stage=0\) routes layers \[4, 5, 6, 7\].* missing \[4, 5, 6, 7\]",
    ):
        stage_slice(partial, LAYOUT, PipelineSplit(pp_size=2), pp_rank=1)


def test_stacking_stages_that_miss_a_layer_is_rejected() -> None:
    trace = batch_trace(2)
    first = stage_slice(trace, LAYOUT, PipelineSplit(pp_size=2), pp_rank=0)
    with pytest.raises(TraceError, match=r"cover layers \[2, 3\].*missing \[4, 5, 6, 7\]"):
        stack_stages([first], LAYOUT)


def test_stacking_slices_of_other_token_axes_names_both() -> None:
    first = stage_slice(batch_trace(4), LAYOUT, PipelineSplit(pp_size=2), pp_rank=0)
    second = stage_slice(batch_trace(6), LAYOUT, PipelineSplit(pp_size=2), pp_rank=1)
    with pytest.raises(
        TraceError,
        match=r"^Stage slice 1 has top_k=4 of 16 experts on token axes \[6\]; slice 0 has top_k=4 "
        r"of 16 experts on token axes \[4\]: stack slices of one piece of one batch\.$",
    ):
        stack_stages([first, second])


def test_restoring_pieces_of_other_layers_names_both() -> None:
    ranks = context_parallel_plans([4], 2, zigzag=False)
    pieces = [plan.apply_trace(batch_trace(4)) for plan in ranks]
    pieces[1] = pieces[1].select_layers([2, 3])
    with pytest.raises(
        TraceError,
        match=r"^Piece 1 covers layers \[2, 3\] with top_k=4 of 16 experts; Piece 0 covers layers "
        r"\[2, 3, 4, 5, 6, 7\] .*: restore one layer slice at a time",
    ):
        restore_trace(pieces, ranks)


def test_stacking_overlapping_stages_is_rejected() -> None:
    trace = batch_trace(2)
    first = stage_slice(trace, LAYOUT, PipelineSplit(pp_size=2), pp_rank=0)
    with pytest.raises(TraceError, match="Layer 2 is in stage slices 0 and 1"):
        stack_stages([first, first])


def test_a_plan_with_indices_outside_its_source_is_rejected() -> None:
    with pytest.raises(TraceError, match=r"must lie in \[-1, 3\), found \[0, 3\]"):
        TokenPlan(torch.tensor([0, 3]), torch.tensor([2]), 3, (2,))


# -- dropping padding drops only padding ----------------------------------------------------


def two_sequences() -> list[RoutingTrace]:
    ids = torch.arange(4).reshape(1, 1, 4).expand(5, 2, 4) % 8
    return [RoutingTrace(ids[:3], (1, 2), 8), RoutingTrace(ids[:5], (1, 2), 8)]


def test_unpadding_from_the_wrong_side_is_refused_not_shifted() -> None:
    batch = pad_traces(two_sequences(), 6, side="right")
    with pytest.raises(
        TraceError,
        match=r"row 0, position 0 holds routes, but the given lengths and padding make it padding",
    ):
        unpad_traces(batch, torch.tensor([3, 5]), side="left")


def test_unpadding_with_wrong_lengths_of_the_same_total_is_refused() -> None:
    batch = pad_traces(two_sequences(), 6, side="right")
    with pytest.raises(
        TraceError, match=r"holds routes, but the given lengths and padding make it padding"
    ):
        unpad_traces(batch, torch.tensor([2, 6]))


def test_unpacking_with_a_wrong_multiple_is_refused() -> None:
    packed, _ = pack_traces(two_sequences(), multiple=4)  # 3 + 1, 5 + 3: 12 tokens
    # Multiple 6 gives the same total (6 + 6), but its padding holds sequence 1's rows.
    with pytest.raises(
        TraceError,
        match=r"position 4 holds routes, but the given lengths and padding make it padding",
    ):
        unpack_traces(packed, torch.tensor([3, 5]), multiple=6)


def test_token_ids_travel_with_their_routes_through_pad_pack_and_back() -> None:
    traces = [
        t.with_tokens(torch.arange(t.num_rows) + 10 * i) for i, t in enumerate(two_sequences())
    ]
    batch = pad_traces(traces, 6, side="left")
    assert batch.tokens is not None
    assert batch.tokens.tolist() == [[-1, -1, -1, 0, 1, 2], [-1, 10, 11, 12, 13, 14]]
    back = unpad_traces(batch, torch.tensor([3, 5]), side="left")
    assert [t.tokens.tolist() for t in back if t.tokens is not None] == [
        [0, 1, 2],
        [10, 11, 12, 13, 14],
    ]
    packed, _ = pack_traces(traces, multiple=4)
    assert packed.tokens is not None and packed.tokens.tolist()[:4] == [0, 1, 2, -1]


def test_a_recording_that_routed_its_padding_unpads_when_told() -> None:
    # megatron-core routes every row: its recording has routes on padding positions.
    routed_everywhere = RoutingTrace(torch.tensor([[[0, 1], [2, 3]]]).expand(2, 6, 2, 2), (1, 2), 8)
    with pytest.raises(TraceError, match=r"pass routed_padding=True"):
        unpad_traces(routed_everywhere, torch.tensor([3, 5]))
    back = unpad_traces(routed_everywhere, torch.tensor([3, 5]), routed_padding=True)
    assert [t.num_rows for t in back] == [3, 5]


def test_stage_slices_of_other_tokens_are_refused() -> None:
    trace = RoutingTrace(torch.tensor([[[0, 1], [2, 3]]] * 3), (1, 2), 8)
    first = trace.select_layers([1]).with_tokens(torch.tensor([5, 6, 7]))
    second = trace.select_layers([2]).with_tokens(torch.tensor([5, 6, 8]))
    with pytest.raises(TraceError, match=r"Stage slices 0 and 1 were recorded for other token ids"):
        stack_stages([first, second])
    joined = stack_stages([first, trace.select_layers([2])])
    assert joined.tokens is not None and joined.tokens.tolist() == [5, 6, 7]


# -- one rank's share straight from per-sequence traces ------------------------------------


@pytest.mark.parametrize("lengths", [[9, 3, 14, 1, 6], [2] * 40, [400, 300]])
@pytest.mark.parametrize("layers", [None, (1, 2), (0, 3)])
def test_a_rank_gathers_from_per_sequence_traces_what_it_gathers_from_the_batch(
    lengths: list[int], layers: tuple[int, ...] | None
) -> None:
    # Long runs are copied one by one, short ones joined per piece first: both read the
    # same rows as the plan applied to the joined batch.
    layout = MoELayout.from_dense_pattern([1, 1, 1, 1], num_experts=16, top_k=2)
    traces = [
        RoutingTrace(
            torch.stack([torch.randperm(16)[:2] for _ in range(n * 4)]).reshape(n, 4, 2),
            layout.moe_layers,
            16,
            tokens=torch.arange(n) + 100 * i,
        )
        for i, n in enumerate(lengths)
    ]
    batch = concat_traces(traces)[0]
    groups = balanced_micro_batches(padded_lengths(torch.tensor(lengths), 4), 400)
    plan = plan_thd(torch.tensor(lengths), groups, multiple=4, cp_size=2)
    for cp_rank in (0, 1):
        want = plan.rank_routes(batch, cp_rank, layers=layers)
        got = plan.rank_routes(traces, cp_rank, layers=layers)
        assert want.keys() == got.keys()
        for micro_batch, trace in want.items():
            assert trace.equal(got[micro_batch])
            assert torch.equal(trace.tokens, got[micro_batch].tokens)


def test_per_sequence_traces_of_another_batch_are_refused() -> None:
    traces = [RoutingTrace(torch.zeros(n, 1, 1, dtype=torch.int64), (0,), 4) for n in (3, 5)]
    plan = plan_thd(torch.tensor([3, 4]))
    with pytest.raises(
        TraceError, match="Sequence 1's trace has 5 tokens; the plan's lengths say 4"
    ):
        plan.rank_routes(traces)
    with pytest.raises(TraceError, match="2 traces were given for the plan's 1 sequences"):
        plan_thd(torch.tensor([3])).rank_routes(traces)
    other = RoutingTrace(torch.zeros(4, 1, 1, dtype=torch.int64), (0,), 5)
    with pytest.raises(TraceError, match="Sequence 1's trace"):
        plan.rank_routes([traces[0], other])
