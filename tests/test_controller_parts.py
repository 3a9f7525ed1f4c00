"""The controller's parts, each on its own: one context's routes and decisions, the
counts, and what adapters attached."""

from __future__ import annotations

import pytest
import torch

from routereplay import MoELayout, ReplayController, ReplayError, RoutingTrace
from routereplay.attachment import Attachment
from routereplay.context_routes import ContextRoutes
from routereplay.recording import Recording
from routereplay.stats import LayerStats, RouteCounts


def test_a_recompute_gets_the_ids_of_the_first_visit_not_a_new_choice() -> None:
    counts = RouteCounts()
    routes = ContextRoutes(8, counts, recording=Recording(8, "test"))
    first = routes.choose((0, 3), torch.tensor([[1, 2]]), 8, None)
    again = routes.choose((0, 3), torch.tensor([[5, 6]]), 8, None)
    assert first.tolist() == again.tolist() == [[1, 2]]
    assert counts.per_layer()[3] == LayerStats(native=1, recomputed=1)


def test_replayed_rows_count_their_disagreement_with_the_live_router() -> None:
    trace = RoutingTrace(torch.tensor([[[1, 2]], [[3, 4]], [[-1, -1]]]), (3,), 8)
    counts = RouteCounts()
    routes = ContextRoutes(8, counts, routes={0: trace})
    ids = routes.choose((0, 3), torch.tensor([[1, 2], [3, 5], [6, 7]]), 8, None)
    assert ids.tolist() == [[1, 2], [3, 4], [6, 7]]
    assert counts.total() == LayerStats(replayed=2, native=1, disagreed=1)


def test_a_missing_layer_is_an_error_only_when_strict() -> None:
    trace = RoutingTrace(torch.tensor([[[1, 2]]]), (3,), 8)
    native = torch.tensor([[5, 6]])
    with pytest.raises(ReplayError, match="Layer 4, micro-batch 0: the trace has no routes"):
        ContextRoutes(8, RouteCounts(), routes={0: trace}).choose((0, 4), native, 8, None)
    lenient = ContextRoutes(8, RouteCounts(), routes={0: trace}, strict=False)
    assert lenient.choose((0, 4), native, 8, None).tolist() == [[5, 6]]


def test_strict_changed_inside_a_replay_context_applies_at_once() -> None:
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=2)
    controller = ReplayController(layout)
    trace = RoutingTrace(torch.tensor([[[1, 2]]]), (0,), 8)
    with controller.replay(trace):
        controller.strict = False
        assert controller.choose(1, torch.tensor([[5, 6]]), 8).tolist() == [[5, 6]]


def test_attachment_undoes_last_first_and_keeps_its_routers() -> None:
    attachment, undone = Attachment(), []
    attachment.add_router(2)
    attachment.add_router(5)
    attachment.on_undo(lambda: undone.append("patch"))
    attachment.on_undo(lambda: undone.append("hook"))
    attachment.limit_routers([5, 7])
    assert attachment.changed and attachment.routers == {5}
    attachment.undo()
    assert undone == ["hook", "patch"] and not attachment.changed
    assert attachment.routers == {5}
