"""The fast yes/no id checks answer exactly what a row-by-row reading would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from routereplay import MoELayout, RoutingTrace, TraceError, id_checks
from routereplay.id_checks import has_partial_rows, has_repeated_rows, id_range, row_faults

# [rows, layers, top_k] ids in -1..5, small enough that repeats and -1 mixes are common.
ids = st.integers(1, 4).flatmap(
    lambda top_k: arrays(
        np.int8,
        st.tuples(st.integers(1, 9), st.integers(1, 3), st.just(top_k)),
        elements=st.integers(-1, 5),
    )
)


def partial_by_rows(experts: np.ndarray) -> bool:
    rows = experts.reshape(-1, experts.shape[-1])
    return any((row == -1).any() and not (row == -1).all() for row in rows)


def repeated_by_rows(experts: np.ndarray) -> bool:
    rows = experts.reshape(-1, experts.shape[-1])
    return any(row[0] != -1 and len(set(row.tolist())) < len(row) for row in rows)


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks of 4 rows, so that small examples cross block boundaries.
    monkeypatch.setattr(id_checks, "BLOCK_ROWS", 4)


@settings(max_examples=300, deadline=None)
@given(ids)
def test_partial_rows_are_found_wherever_they_are(experts: np.ndarray) -> None:
    expected = partial_by_rows(experts)
    assert has_partial_rows(experts) == expected
    assert has_partial_rows(torch.from_numpy(experts)) == expected


@settings(max_examples=300, deadline=None)
@given(ids)
def test_repeated_experts_are_found_wherever_they_are(experts: np.ndarray) -> None:
    expected = repeated_by_rows(experts)
    assert has_repeated_rows(experts) == expected
    assert has_repeated_rows(torch.from_numpy(experts)) == expected
    assert has_repeated_rows(torch.from_numpy(experts).transpose(0, 1)) == expected


@settings(max_examples=100, deadline=None)
@given(ids)
def test_id_range_is_the_smallest_and_largest_id(experts: np.ndarray) -> None:
    assert id_range(experts) == (int(experts.min()), int(experts.max()))
    assert id_range(torch.from_numpy(experts)) == (int(experts.min()), int(experts.max()))


def test_an_empty_array_has_no_range() -> None:
    assert id_range(np.zeros((0, 2, 2), np.int8)) == (0, -1)


def test_engine_rows_are_placed_once_into_the_compact_dtype() -> None:
    layout = MoELayout.from_dense_pattern([0, 1, 1], num_experts=8, top_k=2)
    rows = np.array([[[0, 0], [1, 2], [3, 4]], [[0, 0], [5, 6], [7, 0]]], np.uint8)
    rows.setflags(write=False)  # engines hand out read-only buffers
    trace = RoutingTrace.from_all_layers(rows, layout, "vllm", start=1, num_tokens=4)
    assert trace.experts.dtype == torch.int8
    assert trace.experts[:, :, 0].tolist() == [[-1, -1], [1, 3], [5, 7], [-1, -1]]


def test_an_id_beyond_the_experts_is_reported_at_its_sequence_position() -> None:
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=2)
    rows = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 200]]], np.uint8)
    with pytest.raises(TraceError, match=r"token 3\), layer 1, holds expert id 200"):
        RoutingTrace.from_all_layers(rows, layout, "vllm", start=2, num_tokens=5)


def test_a_dense_layer_holding_ids_is_reported_at_its_sequence_position() -> None:
    layout = MoELayout.from_dense_pattern([0, 1], num_experts=8, top_k=2)
    rows = np.array([[[0, 0], [3, 4]], [[1, 2], [5, 6]]], np.uint8)
    with pytest.raises(TraceError, match=r"token 4\), layer 0,.*dense"):
        RoutingTrace.from_all_layers(rows, layout, "vllm", start=3, num_tokens=6)


def test_unsigned_ids_hold_no_route_on_every_path() -> None:
    # 255 is an expert id in uint8, never -1: torch would compare it equal to -1.
    experts = torch.tensor([[[255, 3]], [[3, 3]]], dtype=torch.uint8)
    assert not has_partial_rows(experts)
    assert not has_partial_rows(experts.numpy())
    assert has_repeated_rows(experts) and has_repeated_rows(experts.numpy())
    assert id_range(torch.tensor([[[7, 300]]], dtype=torch.uint16)) == (7, 300)


def test_rows_of_no_or_one_expert_repeat_nothing() -> None:
    assert not has_repeated_rows(np.zeros((3, 2, 1), np.int8))
    assert not has_partial_rows(np.zeros((3, 2, 0), np.int8))
    assert not has_repeated_rows(np.zeros((3, 2, 0), np.int8))


def test_rows_placed_outside_their_sequence_are_refused() -> None:
    layout = MoELayout.from_dense_pattern([1], num_experts=8, top_k=2)
    rows = np.array([[[1, 2]], [[3, 4]]], np.uint8)
    for start, num_tokens in ((-1, 3), (2, 3)):
        with pytest.raises(TraceError, match="do not fit a sequence"):
            RoutingTrace.from_all_layers(rows, layout, start=start, num_tokens=num_tokens)
    batch = rows[None]
    with pytest.raises(TraceError, match="one token axis"):
        RoutingTrace.from_all_layers(batch, layout, start=1, num_tokens=3)


def test_a_trace_never_shares_the_callers_tensor() -> None:
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=2)
    experts = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.int8)
    trace = RoutingTrace.from_all_layers(experts, layout)
    experts[0, 0, 0] = 7
    assert trace.experts[0, 0, 0] == 1


@settings(max_examples=300, deadline=None)
@given(ids)
def test_one_scan_answers_both_questions_a_mixed_row_first(experts: np.ndarray) -> None:
    # validate() names a mixed row before a repeat, so only then may the scan stop early.
    for given_ids in (experts, torch.from_numpy(experts)):
        partial, repeated = row_faults(given_ids)
        assert partial == partial_by_rows(experts)
        if not partial:
            assert repeated == repeated_by_rows(experts)
