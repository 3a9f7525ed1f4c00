"""The fast yes/no id checks answer exactly what a row-by-row reading would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from routereplay import MoELayout, RoutingTrace, TraceError, id_checks
from routereplay.id_checks import has_partial_rows, has_repeated_rows, id_range

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
