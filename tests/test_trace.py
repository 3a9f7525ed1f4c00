"""RoutingTrace: compact storage, strict validation, and engine-style conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routereplay import NO_ROUTE, MoELayout, RoutingTrace, TraceError, storage_dtype


def random_routes(
    leading: tuple[int, ...], layers: int, top_k: int, num_experts: int, seed: int = 0
) -> torch.Tensor:
    """Distinct ids per row: `[*leading, layers, top_k]` int64."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(*leading, layers, num_experts, generator=generator)
    return scores.topk(top_k, dim=-1).indices


# -- storage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_experts", "dtype", "itemsize"),
    [
        (8, torch.int8, 1),
        (128, torch.int8, 1),
        (129, torch.int16, 2),
        (256, torch.int16, 2),
        (32768, torch.int16, 2),
        (32769, torch.int32, 4),
    ],
)
def test_ids_are_stored_in_the_smallest_dtype_that_holds_them_and_minus_one(
    num_experts: int, dtype: torch.dtype, itemsize: int
) -> None:
    assert storage_dtype(num_experts) == dtype
    experts = torch.tensor([[[num_experts - 1, 0]], [[NO_ROUTE, NO_ROUTE]]])
    trace = RoutingTrace(experts, layers=(3,), num_experts=num_experts)
    assert trace.experts.dtype == dtype and trace.experts.element_size() == itemsize
    assert trace.expert_ids().dtype == torch.int64
    assert trace.expert_ids().tolist() == experts.tolist()


def test_an_id_too_large_is_reported_not_wrapped() -> None:
    # ids above 255 wrapped silently in uint8 storage in a peer implementation.
    with pytest.raises(
        TraceError,
        match=r"Row \(token 0\), layer 5, holds expert id 300; ids must lie in \[0, 256\)",
    ):
        RoutingTrace(torch.tensor([[[300, 1]]]), layers=(5,), num_experts=256)


def test_numpy_engine_arrays_are_accepted_read_only_and_uint16() -> None:
    array = np.array([[[1, 2]], [[3, 0]]], dtype=np.uint16)
    array.setflags(write=False)  # SGLang hands out read-only buffers
    trace = RoutingTrace(array, layers=(0,), num_experts=4, source="sglang")
    assert trace.expert_ids().tolist() == [[[1, 2]], [[3, 0]]]


def test_leading_axes_may_be_tokens_or_batch_and_sequence() -> None:
    trace = RoutingTrace(random_routes((2, 5), 3, 2, 8), layers=(1, 2, 4), num_experts=8)
    assert trace.token_shape == (2, 5) and trace.num_rows == 10 and trace.top_k == 2
    flat = trace.reshape_tokens(10)
    assert flat.token_shape == (10,)
    assert torch.equal(flat.layer_experts(4), trace.layer_experts(4).reshape(10, 2))


# -- validation -----------------------------------------------------------------------


def test_duplicate_ids_in_a_row_name_the_row_and_layer() -> None:
    experts = random_routes((2, 4), 2, 2, 8)
    experts[1, 3, 1] = torch.tensor([5, 5])
    with pytest.raises(
        TraceError,
        match=r"Row \(sequence 1, token 3\), layer 7, routes to the same expert twice: \[5, 5\]",
    ):
        RoutingTrace(experts, layers=(2, 7), num_experts=8)


def test_a_zero_row_is_a_duplicate_not_expert_zero() -> None:
    experts = random_routes((4,), 1, 2, 8)
    experts[2, 0] = 0  # zero padding must never become expert 0
    with pytest.raises(
        TraceError, match=r"token 2\), layer 0, routes to the same expert twice.*mark them -1"
    ):
        RoutingTrace(experts, layers=(0,), num_experts=8)


def test_a_row_mixing_minus_one_and_ids_is_rejected() -> None:
    experts = random_routes((3,), 1, 2, 8)
    experts[1, 0, 0] = NO_ROUTE
    with pytest.raises(TraceError, match=r"Row \(token 1\), layer 0, mixes -1 with expert ids"):
        RoutingTrace(experts, layers=(0,), num_experts=8)


def test_negative_ids_other_than_minus_one_are_rejected() -> None:
    with pytest.raises(TraceError, match="holds expert id -2"):
        RoutingTrace(torch.tensor([[[-2, 1]]]), layers=(0,), num_experts=8)


def test_recheck_sees_zeros_written_over_padding_through_any_view() -> None:
    experts = torch.tensor([[[0, 1], [2, 3]], [[-1, -1], [-1, -1]]])
    trace = RoutingTrace(experts, (0, 1), 4)
    stage = trace.select_layers((1,))  # a copy: unaffected by what follows
    layer_view = trace.experts[:, 1]
    trace.recheck()  # nothing written: nothing to do
    layer_view[1] = 0  # the padding row "filled" with zeros, through a view
    with pytest.raises(TraceError, match=r"Row \(token 1\), layer 1, routes to the same expert"):
        trace.recheck()
    stage.recheck()


def batch_of_two() -> RoutingTrace:
    """`[2 sequences, 3 tokens, 1 layer, top-2]`, every id distinct per row."""
    experts = torch.arange(12).reshape(2, 3, 1, 2) % 8
    return RoutingTrace(experts, (5,), 8, source="vllm")


def test_selecting_sequences_keeps_layers_source_and_ids() -> None:
    trace = batch_of_two()
    second = trace.select_tokens(1)
    assert second.token_shape == (3,) and second.layers == (5,) and second.source == "vllm"
    assert torch.equal(second.experts, trace.experts[1])
    assert trace.select_tokens(torch.tensor([True, False])).token_shape == (1, 3)
    assert trace.select_tokens((1, 0)).equal(trace.select_tokens(torch.tensor([1, 0])))
    with pytest.raises(TraceError, match=r"Index 0 leaves no token axis .*token axes \[3\]"):
        second.select_tokens(0)


def test_transposing_token_axes_twice_gives_the_trace_back() -> None:
    trace = batch_of_two()
    assert trace.transpose_tokens().token_shape == (3, 2)
    assert trace.transpose_tokens().transpose_tokens().equal(trace)
    with pytest.raises(TraceError, match=r"needs two of them; .* has \[3\]"):
        trace.select_tokens(0).transpose_tokens()


def test_tokens_left_out_become_minus_one_rows() -> None:
    trace = batch_of_two()
    mask = torch.tensor([[True, False, False], [False, False, True]])
    masked = trace.without_tokens(mask)
    assert bool((masked.experts[mask] == NO_ROUTE).all())
    assert torch.equal(masked.experts[~mask], trace.experts[~mask])
    with pytest.raises(TraceError, match=r"bool \[2, 3\] like the token axes; found torch.int64"):
        trace.without_tokens(mask.long())


def test_layer_ids_must_match_the_layer_axis() -> None:
    with pytest.raises(TraceError, match="The layer axis has 2 slots but 3 layer ids"):
        RoutingTrace(random_routes((3,), 2, 2, 8), layers=(0, 1, 2), num_experts=8)


def test_layer_ids_must_strictly_increase() -> None:
    with pytest.raises(TraceError, match="strictly increasing, found 4 before 2"):
        RoutingTrace(random_routes((3,), 2, 2, 8), layers=(4, 2), num_experts=8)


def test_top_k_above_expert_count_is_rejected() -> None:
    with pytest.raises(TraceError, match="top_k=3 is more than num_experts=2"):
        RoutingTrace(torch.full((1, 1, 3), NO_ROUTE), layers=(0,), num_experts=2)


def test_float_ids_are_rejected() -> None:
    with pytest.raises(TraceError, match="must hold integers, found dtype torch.float32"):
        RoutingTrace(torch.zeros(2, 1, 2), layers=(0,), num_experts=8)


def test_a_trace_without_token_axis_is_rejected() -> None:
    with pytest.raises(TraceError, match=r"at least one token axis, found shape \(1, 2\)"):
        RoutingTrace(torch.tensor([[0, 1]]), layers=(0,), num_experts=8)


def test_check_layout_names_layers_that_do_not_route(hybrid_layout: MoELayout) -> None:
    trace = RoutingTrace(random_routes((3,), 2, 4, 16), layers=(1, 2), num_experts=16)
    with pytest.raises(TraceError, match=r"holds routes for layers \[1\], which do not route"):
        trace.check_layout(hybrid_layout)


def test_check_layout_names_expert_count_and_top_k(hybrid_layout: MoELayout) -> None:
    trace = RoutingTrace(random_routes((3,), 1, 2, 16), layers=(2,), num_experts=16)
    with pytest.raises(TraceError, match="16 experts, top_k=2; the model has 16 experts, top_k=4"):
        trace.check_layout(hybrid_layout)


def test_compatible_traces_share_layers_top_k_and_expert_count() -> None:
    trace = RoutingTrace(random_routes((3,), 2, 2, 8), layers=(2, 3), num_experts=8)
    other = RoutingTrace(random_routes((5,), 2, 2, 8, seed=1), layers=(2, 3), num_experts=8)
    trace.check_compatible(other, names=("a", "b"), fix="join them.")  # other token counts
    wider = RoutingTrace(random_routes((3,), 2, 2, 16), layers=(2, 3), num_experts=16)
    with pytest.raises(
        TraceError,
        match=r"^Trace 1 covers layers \[2, 3\] with top_k=2 of 16 experts; trace 0 covers "
        r"layers \[2, 3\] with top_k=2 of 8 experts: join traces of one model\.$",
    ):
        wider.check_compatible(trace, names=("Trace 1", "trace 0"), fix="join traces of one model.")


def test_compatibility_names_the_token_axes_only_when_they_must_agree() -> None:
    trace = RoutingTrace(random_routes((2, 4), 1, 2, 8), layers=(2,), num_experts=8)
    other_layer = RoutingTrace(random_routes((2, 4), 1, 2, 8), layers=(3,), num_experts=8)
    trace.check_compatible(other_layer, names=("a", "b"), fix="", layers=False, token_shape=True)
    other_tokens = RoutingTrace(random_routes((4, 2), 1, 2, 8), layers=(3,), num_experts=8)
    with pytest.raises(
        TraceError,
        match=r"^Slice 1 has top_k=2 of 8 experts on token axes \[4, 2\]; slice 0 has top_k=2 "
        r"of 8 experts on token axes \[2, 4\]: stack one batch\.$",
    ):
        other_tokens.check_compatible(
            trace,
            names=("Slice 1", "slice 0"),
            fix="stack one batch.",
            layers=False,
            token_shape=True,
        )


def test_a_trace_compatible_with_a_layout_covers_exactly_its_routed_layers(
    hybrid_layout: MoELayout,
) -> None:
    routed = len(hybrid_layout.moe_layers)
    full = RoutingTrace(random_routes((3,), routed, 4, 16), hybrid_layout.moe_layers, 16)
    full.check_compatible(hybrid_layout, names=("the turn", "the layout"), fix="")
    part = full.select_layers([2, 3])
    with pytest.raises(
        TraceError,
        match=r"the turn covers layers \[2, 3\] with top_k=4 of 16 experts; the layout covers "
        r"layers \[2, 3, 4, 5, 6, 7\] with top_k=4 of 16 experts",
    ):
        part.check_compatible(hybrid_layout, names=("the turn", "the layout"), fix="")


def test_selecting_a_layer_the_trace_lacks_is_an_error() -> None:
    trace = RoutingTrace(random_routes((3,), 2, 2, 8), layers=(2, 3), num_experts=8)
    with pytest.raises(TraceError, match=r"no routes for layer 5; it covers layers \[2, 3\]"):
        trace.select_layers([3, 5])


# -- engine-style all-layer arrays ------------------------------------------------------


def engine_array(layout: MoELayout, tokens: int, seed: int = 0) -> np.ndarray:
    """What vLLM returns: uint8 `[tokens, num_layers, top_k]`, dense layers all zeros."""
    full = np.zeros((tokens, layout.num_layers, layout.top_k), dtype=np.uint8)
    routed = random_routes(
        (tokens,), len(layout.moe_layers), layout.top_k, layout.num_experts, seed
    )
    full[:, list(layout.moe_layers)] = routed.numpy()
    return full


def test_all_layer_array_keeps_routed_layers_without_shifting_them(
    hybrid_layout: MoELayout,
) -> None:
    full = engine_array(hybrid_layout, tokens=6)
    trace = RoutingTrace.from_all_layers(full, hybrid_layout, source="vllm")
    assert trace.layers == (2, 3, 4, 5, 6, 7)
    # Layer 2 is the first routed layer: its ids come from column 2, not column 0.
    assert trace.layer_experts(2).tolist() == full[:, 2].tolist()
    assert trace.layer_experts(7).tolist() == full[:, 7].tolist()
    assert torch.equal(
        trace.to_all_layers(hybrid_layout), torch.from_numpy(full).to(trace.experts.dtype)
    )


def test_a_routed_only_array_is_accepted_and_any_other_width_names_both(
    hybrid_layout: MoELayout,
) -> None:
    full = engine_array(hybrid_layout, tokens=3)
    routed_only = full[:, 2:]  # some engine versions send the routed layers only
    assert hybrid_layout.layer_axis(routed_only.shape[1]) == "routed_layers"
    assert RoutingTrace.from_all_layers(routed_only, hybrid_layout).equal(
        RoutingTrace.from_all_layers(full, hybrid_layout)
    )
    with pytest.raises(
        TraceError,
        match=r"The layer axis has 5 slots; expected 8 \(every decoder layer, dense ones as zeros\) or 6 \(the routed layers \[2, 3, 4, 5, 6, 7\] only\).*Found shape \(3, 5, 4\)\.$",
    ):
        RoutingTrace.from_all_layers(full[:, :5], hybrid_layout)


def test_routes_on_a_dense_layer_mean_the_layout_is_wrong(hybrid_layout: MoELayout) -> None:
    full = engine_array(hybrid_layout, tokens=3)
    full[1, 1] = [1, 2, 3, 4]
    with pytest.raises(
        TraceError, match=r"Row \(token 1\), layer 1, holds expert ids \[1, 2, 3, 4\] but is dense"
    ):
        RoutingTrace.from_all_layers(full, hybrid_layout, source="vllm")


def test_a_routed_layer_all_zeros_over_a_sequence_is_a_broken_capture(
    hybrid_layout: MoELayout,
) -> None:
    full = engine_array(hybrid_layout, tokens=5)
    full[:, 4] = 0
    with pytest.raises(
        TraceError,
        match="Layer 4 is all zeros in every routed row of the vllm array: that is a broken capture",
    ):
        RoutingTrace.from_all_layers(full, hybrid_layout, source="vllm")


def test_broken_capture_is_found_per_sequence_of_a_batch() -> None:
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=1)
    full = np.array([[[[3], [4]], [[0], [5]]], [[[0], [6]], [[0], [7]]]])  # [2, 2, 2, 1]
    with pytest.raises(TraceError, match="Layer 0 is all zeros in every routed row of sequence 1"):
        RoutingTrace.from_all_layers(full, layout)


def test_minus_one_rows_pass_through_the_conversion(hybrid_layout: MoELayout) -> None:
    full = engine_array(hybrid_layout, tokens=4).astype(np.int16)
    full[3] = NO_ROUTE  # e.g. a padding token: no route on any layer
    trace = RoutingTrace.from_all_layers(full, hybrid_layout)
    assert trace.routed_mask()[:, 0].tolist() == [True, True, True, False]
    assert (trace.to_all_layers(hybrid_layout)[3, list(hybrid_layout.moe_layers)] == NO_ROUTE).all()


@st.composite
def layouts_and_traces(draw: st.DrawFn) -> tuple[MoELayout, RoutingTrace]:
    pattern = draw(st.lists(st.booleans(), min_size=1, max_size=12).filter(any))
    num_experts = draw(st.sampled_from([2, 8, 64, 200, 40000]))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    layout = MoELayout.from_dense_pattern(pattern, num_experts, top_k)
    leading = draw(st.sampled_from([(5,), (2, 3), (1, 4)]))
    experts = random_routes(
        leading, len(layout.moe_layers), top_k, num_experts, draw(st.integers(0, 999))
    )
    missing = torch.rand(*leading, len(layout.moe_layers)) < draw(st.sampled_from([0.0, 0.3]))
    experts[missing] = NO_ROUTE
    return layout, RoutingTrace(experts, layout.moe_layers, num_experts)


@given(layouts_and_traces())
def test_all_layers_round_trip_is_the_identity(case: tuple[MoELayout, RoutingTrace]) -> None:
    layout, trace = case
    full = trace.to_all_layers(layout)
    assert full.shape[-2] == layout.num_layers
    assert (full[..., list(layout.dense_layers), :] == 0).all()
    # With top_k=1 a layer may route every token of a sequence to expert 0, which an
    # all-layer array cannot tell from a broken capture: that case must be refused.
    per_sequence = trace.experts.reshape(-1, *trace.experts.shape[-3:])
    routed = per_sequence[..., 0] != NO_ROUTE
    zero = (per_sequence == 0).all(-1) | ~routed
    ambiguous = bool((zero.all(1) & routed.any(1)).any())
    if ambiguous:
        with pytest.raises(TraceError, match="broken capture"):
            RoutingTrace.from_all_layers(full, layout)
    else:
        assert RoutingTrace.from_all_layers(full, layout).equal(trace)


@given(layouts_and_traces(), st.data())
def test_selecting_layers_composes_and_keeps_each_layers_ids(
    case: tuple[MoELayout, RoutingTrace], data: st.DataObject
) -> None:
    layout, trace = case
    outer = data.draw(st.lists(st.sampled_from(layout.moe_layers), unique=True))
    inner = data.draw(st.lists(st.sampled_from(outer), unique=True)) if outer else []
    part = trace.select_layers(outer)
    assert part.layers == tuple(sorted(outer))
    for layer in outer:
        assert torch.equal(part.layer_experts(layer), trace.layer_experts(layer))
    assert part.select_layers(inner).equal(trace.select_layers(inner))


def test_duplicates_are_found_in_wide_rows_too() -> None:
    experts = random_routes((3,), 1, 20, 64)
    experts[2, 0, 19] = experts[2, 0, 0]
    with pytest.raises(
        TraceError, match=r"Row \(token 2\), layer 0, routes to the same expert twice"
    ):
        RoutingTrace(experts, layers=(0,), num_experts=64)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RoutingTrace(np.zeros((1, 1, 2)), (0,), 8),
            "must hold integers, found numpy dtype float64",
        ),
        (lambda: RoutingTrace([[[0, 1]]], (0,), 8), "must be a torch tensor or numpy array"),
        (
            lambda: RoutingTrace(torch.tensor([[[0, 1]]]), (0,), 0),
            "num_experts must be at least 1, found 0",
        ),
        (lambda: RoutingTrace(torch.tensor([[[0, 1]]]), (-1,), 8), "global and 0-based, found -1"),
    ],
)
def test_malformed_traces_are_rejected(build: object, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        build()  # type: ignore[operator]


def test_a_broken_capture_is_not_hidden_by_minus_one_rows() -> None:
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=1)
    full = np.array([[[3], [0]], [[4], [0]], [[NO_ROUTE], [NO_ROUTE]]])  # last row: no route
    with pytest.raises(TraceError, match="Layer 1 is all zeros in every routed row"):
        RoutingTrace.from_all_layers(full, layout)


def test_an_array_of_no_tokens_is_an_empty_trace_not_a_broken_capture(
    hybrid_layout: MoELayout,
) -> None:
    empty = engine_array(hybrid_layout, tokens=0)
    assert RoutingTrace.from_all_layers(empty, hybrid_layout).num_rows == 0


@pytest.mark.parametrize(
    ("dtype", "num_experts"), [(torch.int8, 128), (torch.int8, 200), (torch.int16, 32768)]
)
def test_ids_stored_at_the_edge_of_their_dtype_are_range_checked_right(
    dtype: torch.dtype, num_experts: int
) -> None:
    # torch compares int8 with 128 as -128: every id would look out of range.
    top = torch.iinfo(dtype).max
    experts = torch.tensor([[[top, 0]], [[1, 2]]], dtype=dtype)
    trace = RoutingTrace(experts, layers=(0,), num_experts=num_experts)
    again = RoutingTrace(trace.experts, trace.layers, trace.num_experts)  # re-wrap compact
    assert again.equal(trace)


def test_a_replay_of_a_128_expert_trace_validates_on_entry() -> None:
    from routereplay import ReplayController

    layout = MoELayout.from_dense_pattern([1], num_experts=128, top_k=8)
    trace = RoutingTrace(random_routes((4,), 1, 8, 128), layout.moe_layers, 128)
    assert trace.experts.dtype == torch.int8
    with ReplayController(layout).replay(trace):
        pass


# -- integers that are not integers, and unsigned engine dtypes ---------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("layers", (1.7, 2.2), r"layers item must be an integer, found 1\.7 \(float\)"),
        ("layers", "12", r"layers must be a sequence of integers, found '12'"),
        ("layers", (True, 2), r"layers item must be an integer, found True \(bool\)"),
        ("num_experts", 8.5, r"num_experts must be an integer, found 8\.5 \(float\)"),
        ("num_experts", "8", r"num_experts must be an integer, found '8' \(str\)"),
    ],
)
def test_numbers_that_are_not_integers_are_refused_not_truncated(
    field: str, value: object, message: str
) -> None:
    kwargs: dict[str, object] = {"layers": (1, 2), "num_experts": 8} | {field: value}
    with pytest.raises(TraceError, match=message):
        RoutingTrace(torch.zeros((3, 2, 2), dtype=torch.long) + torch.tensor([0, 1]), **kwargs)  # type: ignore[arg-type]


def test_numpy_integer_layer_ids_are_integers() -> None:
    trace = RoutingTrace(torch.tensor([[[0, 1]]]), (np.int64(3),), np.int32(8))  # type: ignore[arg-type]
    assert trace.layers == (3,) and type(trace.layers[0]) is int and trace.num_experts == 8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_torch_ids_from_an_engine_array_are_read_as_themselves(dtype: type) -> None:
    ids = np.array([[[3, 255]], [[0, 7]]], dtype=dtype)
    trace = RoutingTrace(torch.from_numpy(ids), (2,), 300)
    assert trace.expert_ids().tolist() == [[[3, 255]], [[0, 7]]]


def test_unsigned_ids_out_of_range_are_reported_as_themselves() -> None:
    ids = torch.from_numpy(np.array([[[3, 299]]], dtype=np.uint16))
    with pytest.raises(TraceError, match=r"holds expert id 299; ids must lie in \[0, 256\)"):
        RoutingTrace(ids, (2,), 256)
