"""Routing agreement and training-inference log-prob mismatch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routereplay import NO_ROUTE, MoELayout, ReplayController, RouterSpec, RoutingTrace, TraceError
from routereplay.metrics import counterfactual_disagreement, logprob_mismatch, routing_agreement


def trace(ids: list, layers: tuple[int, ...] = (2, 3)) -> RoutingTrace:
    return RoutingTrace(torch.tensor(ids), layers, num_experts=8)


A = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [1, 3]]]  # [tokens 3, layers 2, k 2]


def test_identical_routings_agree_fully() -> None:
    agreement = routing_agreement(trace(A), trace(A))
    assert (agreement.pairs, agreement.skipped) == (6, 0)
    assert agreement.router_disagreement == agreement.token_disagreement == 0.0
    assert agreement.overlap_at_k == agreement.jaccard == 1.0


def test_column_order_does_not_route() -> None:
    flipped = [[row[::-1] for row in token] for token in A]
    assert routing_agreement(trace(A), trace(flipped)).router_disagreement == 0.0


def test_disagreement_overlap_and_jaccard_by_hand() -> None:
    b = [[[0, 1], [2, 4]], [[4, 5], [6, 7]], [[5, 6], [1, 3]]]
    agreement = routing_agreement(trace(A), trace(b))
    # Rows differing: token 0 layer 3 (one of two shared), token 2 layer 2 (none shared).
    assert agreement.router_disagreement == pytest.approx(2 / 6)
    assert agreement.token_disagreement == pytest.approx(2 / 3)
    assert agreement.per_layer == {2: pytest.approx(1 / 3), 3: pytest.approx(1 / 3)}
    assert agreement.overlap_at_k == pytest.approx((4 * 1 + 0.5 + 0) / 6)
    assert agreement.jaccard == pytest.approx((4 * 1 + 1 / 3 + 0) / 6)


def test_rows_without_a_route_are_excluded_and_counted() -> None:
    b = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[NO_ROUTE, NO_ROUTE], [5, 6]]]
    agreement = routing_agreement(trace(A), trace(b))
    assert (agreement.pairs, agreement.skipped) == (5, 1)
    assert agreement.router_disagreement == pytest.approx(1 / 5)


def test_traces_of_different_tokens_are_not_compared() -> None:
    with pytest.raises(TraceError, match="must cover the same tokens and layers"):
        routing_agreement(trace(A), trace(A[:2]))


def test_logprob_mismatch_by_hand() -> None:
    train = torch.tensor([math.log(3.0), 0.0, 5.0])
    rollout = torch.zeros(3)
    mask = torch.tensor([True, True, False])  # the third token is not a response token
    m = logprob_mismatch(train, rollout, mask)
    assert m.tokens == 2
    assert m.mean_abs_delta == pytest.approx(math.log(3) / 2)
    assert m.k3_kl == pytest.approx((3 - 1 - math.log(3)) / 2)
    assert m.direct_kl == pytest.approx(-math.log(3) / 2)
    assert m.extreme_fraction == 0.5  # ratio 3 is outside [1/2, 2]
    assert m.chi_squared == pytest.approx(2.0)
    assert m.max_ratio == pytest.approx(3.0)


def test_a_ratio_of_exactly_tau_is_not_extreme() -> None:
    half = torch.tensor([math.log(2.0), -math.log(2.0)], dtype=torch.float64)
    m = logprob_mismatch(half, torch.zeros(2, dtype=torch.float64))
    assert m.extreme_fraction == 0.0


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=50))
def test_k3_is_non_negative_and_grows_with_mismatch(deltas: list[float]) -> None:
    delta = torch.tensor(deltas, dtype=torch.float64)
    m = logprob_mismatch(delta, torch.zeros_like(delta))
    assert m.k3_kl >= 0
    if (delta.abs() > 1e-6).any():
        assert m.k3_kl > 0
    if (delta == 0).all():
        assert m.k3_kl == 0


def test_logprob_shapes_must_match() -> None:
    with pytest.raises(TraceError, match=r"shapes \(3,\) \(trainer\) and \(2,\) \(rollout\)"):
        logprob_mismatch(torch.zeros(3), torch.zeros(2))


def test_counterfactual_disagreement_is_read_per_layer_from_the_controller() -> None:
    layout = MoELayout.from_dense_pattern([0, 1], num_experts=8, top_k=2)
    controller = ReplayController(layout)
    spec = RouterSpec(top_k=2)
    logits = torch.randn(10, 8)
    with controller.record() as recording:
        controller.route(1, logits, spec)
    with controller.replay(recording.trace):
        controller.route(1, -logits, spec)  # the opposite preference: every row differs
    assert counterfactual_disagreement(controller) == {1: 1.0}
