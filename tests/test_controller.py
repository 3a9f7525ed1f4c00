"""ReplayController: record, replay, masking, recompute, strictness and isolation."""

from __future__ import annotations

import pytest
import torch
from toy_moe import ToyMoE

from routereplay import (
    NO_ROUTE,
    Mode,
    MoELayout,
    ReplayController,
    ReplayError,
    RouterSpec,
    RoutingTrace,
    TraceError,
    gate_weights,
    select,
)

TOKENS = 12


@pytest.fixture
def model(hybrid_layout: MoELayout, softmax_spec: RouterSpec) -> ToyMoE:
    return ToyMoE(hybrid_layout, softmax_spec)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(7))


def record(model: ToyMoE, x: torch.Tensor) -> RoutingTrace:
    with model.controller.record() as recording:
        model(x)
    return recording.trace


def perturb_routers(model: ToyMoE, scale: float = 2.0) -> None:
    with torch.no_grad():
        for router in model.routers().values():
            router.weight.add_(scale * torch.randn_like(router.weight))


# -- record and replay ----------------------------------------------------------------


def test_recording_is_shaped_like_the_tokens_with_routed_layers_on_the_layer_axis(
    model: ToyMoE,
) -> None:
    x = torch.randn(2 * 6, 16)
    with (
        model.controller.record() as recording,
        model.controller.micro_batch(0, token_shape=(2, 6)),
    ):
        model(x)
    trace = recording.trace
    assert trace.token_shape == (2, 6)
    assert trace.layers == (2, 3, 4, 5, 6, 7)
    assert (trace.num_experts, trace.top_k) == (16, 4)
    assert torch.equal(trace.layer_experts(2).reshape(-1, 4), model.seen(2)[0])


def test_replaying_a_recording_with_unchanged_weights_is_bit_identical(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    native = model(tokens)
    trace = record(model, tokens)
    with model.controller.replay(trace):
        replayed = model(tokens)
    assert torch.equal(replayed, native)
    totals = model.controller.totals()
    assert (totals.replayed, totals.native, totals.disagreed) == (6 * TOKENS, 0, 0)


def test_replay_sends_tokens_to_the_recorded_experts_after_the_router_changed(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    trace = record(model, tokens)
    perturb_routers(model)
    model.expert_calls.clear()
    with model.controller.replay(trace):
        model(tokens)
    for layer in trace.layers:
        # What the experts received, logged by the model, not by the controller.
        assert torch.equal(model.seen(layer)[0], trace.layer_experts(layer).long())


def test_counterfactual_disagreement_counts_rows_native_routing_would_change(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    trace = record(model, tokens)
    perturb_routers(model)
    with model.controller.record() as fresh:
        model(tokens)
    with model.controller.replay(trace):
        model(tokens)
    stats = model.controller.stats()
    # Only the first routed layer sees the same hidden states in both passes; there the
    # native choice is exactly what a fresh recording made.
    first = trace.layers[0]
    old = trace.layer_experts(first).long().sort(-1).values
    new = fresh.trace.layer_experts(first).long().sort(-1).values
    assert stats[first].disagreed == int((old != new).any(-1).sum()) > 0
    assert all(s.disagreed <= s.replayed == TOKENS for s in stats.values())


def test_gradients_reach_the_router_and_equal_the_gate_weight_formula_at_replayed_ids(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec
) -> None:
    single = MoELayout.from_dense_pattern([1], num_experts=16, top_k=4)
    model = ToyMoE(single, softmax_spec)
    x = torch.randn(TOKENS, 16)
    trace = record(model, x)
    perturb_routers(model)
    with model.controller.replay(trace):
        model(x).square().sum().backward()
    router = model.routers()[0]
    replay_grad = router.weight.grad.clone()

    # The same forward written out by hand with the ids fixed to the trace.
    router.weight.grad = None
    block = model.blocks[0]
    ids = trace.layer_experts(0).long()
    weights = gate_weights(router(x), ids, softmax_spec)
    out = x + (weights.unsqueeze(-1) * torch.einsum("th,tkhd->tkd", x, block.experts[ids])).sum(1)
    out.square().sum().backward()
    assert replay_grad.abs().sum() > 0
    assert torch.allclose(replay_grad, router.weight.grad, rtol=0, atol=1e-6)


def test_minus_one_rows_route_natively_and_are_counted(model: ToyMoE, tokens: torch.Tensor) -> None:
    trace = record(model, tokens)
    perturb_routers(model)
    experts = trace.experts.clone()
    experts[-1] = NO_ROUTE  # the last sampled token has no route
    experts[0, 1] = NO_ROUTE  # token 0 on layer 3 only
    masked = RoutingTrace(experts, trace.layers, trace.num_experts)
    model.expert_calls.clear()
    with model.controller.replay(masked):
        model(tokens)
    stats = model.controller.stats()
    assert (stats[2].replayed, stats[2].native) == (TOKENS - 1, 1)
    assert (stats[3].replayed, stats[3].native) == (TOKENS - 2, 2)
    # The native rows got what the live router chooses, the others the trace.
    seen = model.seen(2)[0]
    assert torch.equal(seen[:-1], trace.layer_experts(2)[:-1].long())
    assert not torch.equal(seen[-1], trace.layer_experts(2)[-1].long())


def test_off_mode_routes_natively_and_keeps_nothing(
    softmax_spec: RouterSpec, hybrid_layout: MoELayout
) -> None:
    controller = ReplayController(hybrid_layout)
    logits = torch.randn(5, 16)
    assert controller.mode is Mode.OFF
    routed = controller.route(2, logits, softmax_spec)
    assert torch.equal(routed.ids, select(logits, softmax_spec).ids)
    assert controller.stats() == {}


# -- micro-batches and recompute --------------------------------------------------------


def test_each_micro_batch_gets_its_own_ids_in_any_order(model: ToyMoE) -> None:
    batches = {
        mb: torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(mb)) for mb in range(3)
    }
    with model.controller.record() as recording:
        for mb, x in batches.items():
            with model.controller.micro_batch(mb):
                model(x)
    traces = recording.traces
    assert list(traces) == [0, 1, 2]
    perturb_routers(model)
    model.expert_calls.clear()
    order = [2, 0, 1, 2]  # reversed and repeated, as pipeline schedules do
    with model.controller.replay(traces):
        for mb in order:
            with model.controller.micro_batch(mb):
                model(batches[mb])
    received = model.seen(5)
    for call, mb in enumerate(order):
        assert torch.equal(received[call], traces[mb].layer_experts(5).long())


@pytest.mark.parametrize("mode", ["record", "replay", "replay, layers missing"])
def test_activation_recompute_sees_the_ids_of_the_forward(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec, mode: str
) -> None:
    # Router jitter makes a naive recompute choose differently from the forward.
    model = ToyMoE(hybrid_layout, softmax_spec, jitter=5.0, use_checkpoint=True)
    x = torch.randn(TOKENS, 16, requires_grad=True)
    trace = record(model, x.detach())
    experts = trace.experts.clone()
    experts[::3] = NO_ROUTE  # native rows too must not change on recompute
    masked = RoutingTrace(experts, trace.layers, trace.num_experts)
    model.expert_calls.clear()
    contexts = {
        "record": model.controller.record,
        "replay": lambda: model.controller.replay(masked),
        # Layers 4-7 missing route natively; their recompute must not drift either.
        "replay, layers missing": lambda: model.controller.replay(
            masked.select_layers([2, 3]), strict=False
        ),
    }
    context = contexts[mode]()
    with context:
        model(x).sum().backward()
    for layer in trace.layers:
        forward, recompute = model.seen(layer)
        assert torch.equal(forward, recompute)
    assert all(s.recomputed == TOKENS for s in model.controller.stats().values())


def test_a_recording_of_several_micro_batches_needs_trace_for(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    with model.controller.record() as recording:
        for mb in ("a", "b"):
            with model.controller.micro_batch(mb):
                model(tokens)
    with pytest.raises(TraceError, match=r"holds 2 micro-batches \(\['a', 'b'\]\); use .traces"):
        _ = recording.trace
    assert recording.trace_for("b").token_shape == (TOKENS,)
    with pytest.raises(TraceError, match="Nothing was recorded for micro-batch 'c'"):
        recording.trace_for("c")


# -- strictness -----------------------------------------------------------------------


def test_a_micro_batch_without_routes_is_an_error(model: ToyMoE, tokens: torch.Tensor) -> None:
    trace = record(model, tokens)
    with (
        model.controller.replay({0: trace}),
        model.controller.micro_batch(3),
        pytest.raises(ReplayError, match=r"Layer 2, micro-batch 3: no routes were given .*\[0\]"),
    ):
        model(tokens)


def test_a_layer_missing_from_the_trace_is_an_error(model: ToyMoE, tokens: torch.Tensor) -> None:
    partial = record(model, tokens).select_layers([2, 3, 4])
    missing = (
        r"Layer 5, micro-batch 0: the trace has no routes for this layer \(it covers \[2, 3, 4\]\)"
    )
    with model.controller.replay(partial), pytest.raises(ReplayError, match=missing):
        model(tokens)


def test_non_strict_replay_routes_missing_layers_natively_and_counts_them(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    partial = record(model, tokens).select_layers([2, 3, 4])
    with model.controller.replay(partial, strict=False):
        model(tokens)
    stats = model.controller.stats()
    assert (stats[4].replayed, stats[5].replayed, stats[5].native) == (TOKENS, 0, TOKENS)
    assert model.controller.strict  # strictness came back after the context


def test_a_wrong_token_count_names_layer_micro_batch_and_both_counts(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    trace = record(model, tokens)
    counts = r"Layer 2, micro-batch 0: the router sees 11 tokens but the routes hold 12 rows \(token axes \[12\]\)"
    with model.controller.replay(trace), pytest.raises(ReplayError, match=counts):
        model(tokens[:11])


def test_a_wrong_top_k_or_expert_count_is_an_error(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec
) -> None:
    controller = ReplayController(hybrid_layout)
    experts = torch.stack([torch.randperm(16)[:4] for _ in range(6 * 3)]).reshape(3, 6, 4)
    trace = RoutingTrace(experts, hybrid_layout.moe_layers, 16)
    with controller.replay(trace):
        with pytest.raises(
            ReplayError,
            match="the router has 16 experts and top_k=2; the trace has 16 experts and top_k=4",
        ):
            controller.route(2, torch.randn(3, 16), RouterSpec(top_k=2))
        with pytest.raises(ReplayError, match="the router has 8 experts and top_k=4"):
            controller.route(3, torch.randn(3, 8), softmax_spec)


def test_a_trace_for_another_model_is_refused_on_entry(hybrid_layout: MoELayout) -> None:
    controller = ReplayController(hybrid_layout)
    other = RoutingTrace(torch.tensor([[[0, 1, 2, 3]]]), layers=(1,), num_experts=16)
    with (
        pytest.raises(
            ReplayError, match=r"Micro-batch 0: .*routes for layers \[1\], which do not route"
        ),
        controller.replay(other),
    ):
        pass
    assert controller.mode is Mode.OFF


def test_replay_never_reads_ids_back_from_the_router_device() -> None:
    # A meta tensor has no values: any host read of the router-side ids (a sync per
    # router call on a GPU) would raise here. The trace stays on the host.
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=8, top_k=2)
    trace = RoutingTrace(torch.tensor([[[0, 1], [2, 3]], [[-1, -1], [4, 5]]]), (0, 1), 8)
    controller = ReplayController(layout)
    native = torch.empty(2, 2, dtype=torch.long, device="meta")
    with controller.replay(trace):
        for layer in (0, 1, 0):  # the second call to layer 0 is its recompute
            ids = controller.choose(layer, native, 8)
            assert ids.device.type == "meta" and ids.shape == (2, 2)


def test_replay_revalidates_a_trace_only_once_its_ids_are_written(
    model: ToyMoE, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = record(model, tokens)
    checks = []
    original = RoutingTrace.validate
    monkeypatch.setattr(RoutingTrace, "validate", lambda self: checks.append(original(self)))
    with model.controller.replay(trace):
        pass
    assert checks == []  # validated when built; nothing wrote to it since
    trace.experts[0, 0] = trace.experts[0, 0].flip(0)  # still valid: the same set of ids
    with model.controller.replay(trace):
        pass
    with model.controller.replay(trace):
        pass
    assert len(checks) == 1  # checked again once after the write, then no more


def test_ids_written_into_a_trace_after_construction_are_caught_with_the_micro_batch(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    trace = record(model, tokens)
    trace.experts[4, 2] = torch.tensor([1, 1, 2, 3], dtype=trace.experts.dtype)
    with (
        pytest.raises(
            ReplayError,
            match=r"Micro-batch 'mb7': Row \(token 4\), layer 4, routes to the same expert twice",
        ),
        model.controller.replay({"mb7": trace}),
    ):
        pass
    trace.experts[4, 2] = torch.tensor([1, 99, 2, 3], dtype=trace.experts.dtype)
    with (
        pytest.raises(
            ReplayError, match=r"Micro-batch 'mb7': Row \(token 4\), layer 4, holds expert id 99"
        ),
        model.controller.replay({"mb7": trace}),
    ):
        pass


def test_a_router_on_a_dense_layer_is_an_adapter_bug(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec
) -> None:
    controller = ReplayController(hybrid_layout)
    with (
        controller.record(),
        pytest.raises(ReplayError, match="global layer 1, which does not route .*1-based"),
    ):
        controller.route(1, torch.randn(3, 16), softmax_spec)


# -- lifecycle and isolation --------------------------------------------------------------


def test_an_exception_inside_a_context_leaves_the_controller_clean(
    model: ToyMoE, tokens: torch.Tensor
) -> None:
    trace = record(model, tokens)
    controller = model.controller
    with (
        pytest.raises(RuntimeError, match="boom"),
        controller.replay(trace),
        controller.micro_batch(5),
    ):
        with controller.micro_batch(0):
            model(tokens)
        raise RuntimeError("boom")
    assert controller.mode is Mode.OFF
    # A fresh recording starts from nothing: micro-batch 0, no stale keys.
    fresh = record(model, tokens)
    assert fresh.equal(trace)
    assert all(s.recomputed == 0 for s in controller.stats().values())


def test_a_failed_recording_yields_nothing(model: ToyMoE, tokens: torch.Tensor) -> None:
    with pytest.raises(ReplayError), model.controller.record() as recording:
        model(tokens)
        model.controller.route(0, torch.randn(2, 16), model.spec)  # a dense layer: error
    with pytest.raises(TraceError, match="holds 0 micro-batches"):
        _ = recording.trace


def test_contexts_do_not_nest(model: ToyMoE, tokens: torch.Tensor) -> None:
    trace = record(model, tokens)
    with model.controller.replay(trace):
        with pytest.raises(ReplayError, match="already in replay mode"), model.controller.record():
            pass
        assert model.controller.mode is Mode.REPLAY


def test_two_models_with_two_controllers_never_see_each_others_routes(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec, tokens: torch.Tensor
) -> None:
    actor = ToyMoE(hybrid_layout, softmax_spec, seed=1)
    reference = ToyMoE(hybrid_layout, softmax_spec, seed=2)
    reference_native = reference(tokens)
    actor_trace = record(actor, tokens)
    perturb_routers(actor)
    with actor.controller.replay(actor_trace), reference.controller.record() as ref_recording:
        actor(tokens)
        reference_out = reference(tokens)
    assert torch.equal(reference_out, reference_native)  # the reference routed natively
    assert not ref_recording.trace.equal(actor_trace)
    assert actor.controller.totals().replayed == 6 * TOKENS
    assert reference.controller.totals().replayed == 0


def test_replay_takes_traces_not_raw_tensors(hybrid_layout: MoELayout) -> None:
    controller = ReplayController(hybrid_layout)
    with (
        pytest.raises(
            ReplayError,
            match="Micro-batch 1: replay\\(\\) takes RoutingTrace objects, found Tensor",
        ),
        controller.replay({1: torch.zeros(3, 6, 4)}),
    ):  # type: ignore[dict-item]
        pass


def test_a_micro_batch_with_different_token_counts_per_layer_is_not_one_micro_batch(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec
) -> None:
    controller = ReplayController(hybrid_layout)
    with controller.record() as recording:
        controller.route(2, torch.randn(5, 16), softmax_spec)
        controller.route(3, torch.randn(4, 16), softmax_spec)
    with pytest.raises(
        TraceError, match=r"routed different token counts on different layers \(\[4, 5\]\)"
    ):
        _ = recording.trace


def test_choose_leaves_gate_weights_to_the_framework(
    hybrid_layout: MoELayout, softmax_spec: RouterSpec
) -> None:
    controller = ReplayController(hybrid_layout)
    native = select(torch.randn(5, 16), softmax_spec).ids
    with controller.record() as recording:
        assert torch.equal(controller.choose(2, native, num_experts=16), native)
    other = select(torch.randn(5, 16), softmax_spec).ids
    with controller.replay(recording.trace, strict=False):
        assert torch.equal(controller.choose(2, other, num_experts=16), native)
    assert controller.stats()[2].replayed == 5


def test_each_context_gets_a_new_serial(model: ToyMoE, tokens: torch.Tensor) -> None:
    first = model.controller.context_serial
    trace = record(model, tokens)
    with pytest.raises(RuntimeError), model.controller.replay(trace):
        raise RuntimeError("a failed step still counts")
    assert model.controller.context_serial == first + 2


def test_a_micro_batch_key_keeps_its_case_in_errors() -> None:
    layout = MoELayout(2, (1,), 8, 2)
    controller = ReplayController(layout)
    trace = RoutingTrace(torch.tensor([[[0, 1]]] * 3), (1,), 8).with_tokens(torch.tensor([1, 2, 3]))
    with (
        pytest.raises(ReplayError, match=r"^Micro-batch 'Step-7/GRPO': the trace was recorded"),
        controller.replay({"Step-7/GRPO": trace}),
        controller.micro_batch("Step-7/GRPO"),
    ):
        controller.set_tokens((3,), None, torch.tensor([1, 2, 4]))
