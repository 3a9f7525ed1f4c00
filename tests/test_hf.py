"""Replay inside real transformers MoE models, for every supported family."""

from __future__ import annotations

import copy
from types import MethodType
from typing import Any

import pytest
import torch
from hf_models import FAMILIES, ExpertIds, perturb_routers, router_of, tiny_model

import routereplay
from routereplay import (
    NO_ROUTE,
    LayoutError,
    ReplayError,
    RouterSpec,
    RoutingTrace,
    TraceError,
    gate_weights,
)
from routereplay.integrations.hf import load_balancing_loss

BATCH, SEQ = 2, 9


def token_ids(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def recorded(
    controller: routereplay.ReplayController, model: Any, ids: torch.Tensor, **kw: Any
) -> RoutingTrace:
    with torch.no_grad(), controller.record() as recording:
        model(ids, **kw)
    return recording.trace


# -- 1. identity ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_a_recording_with_unchanged_weights_is_bit_identical(family: str) -> None:
    model = tiny_model(family)
    ids = token_ids()
    with torch.no_grad():
        native = model(ids).logits
    controller = routereplay.attach(model)
    trace = recorded(controller, model, ids)
    assert trace.token_shape == (BATCH, SEQ)
    assert trace.layers == controller.layout.moe_layers
    with torch.no_grad(), controller.replay(trace):
        replayed = model(ids).logits
    assert torch.equal(replayed, native)
    assert controller.totals().disagreed == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_model_exactly(family: str) -> None:
    model = tiny_model(family)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
    controller = routereplay.attach(model)
    assert controller.attached
    recorded(controller, model, token_ids(seed=5))
    controller.detach()
    assert not controller.attached
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    routers = [router_of(layer) for layer in model.model.layers]
    assert all("forward" not in vars(r) for r in routers if r is not None)
    assert not model._forward_pre_hooks


# -- 2. effect ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_ids_reach_the_experts_after_the_router_changed(family: str) -> None:
    model = tiny_model(family)
    ids = token_ids()
    controller = routereplay.attach(model)
    trace = recorded(controller, model, ids)
    perturb_routers(model)
    experts = ExpertIds(model)
    with torch.no_grad(), controller.replay(trace):
        model(ids)
    for layer in trace.layers:
        assert torch.equal(
            experts.last(layer), trace.layer_experts(layer).reshape(-1, trace.top_k).long()
        )
    # Native routing with the new weights would have differed on most rows.
    totals = controller.totals()
    assert totals.replayed == len(trace.layers) * BATCH * SEQ
    assert totals.disagreed > totals.replayed / 2


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_router_as_the_gate_weight_formula_at_replayed_ids(family: str) -> None:
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    ids = token_ids()
    controller = routereplay.attach(model)
    trace = recorded(controller, model, ids)
    perturb_routers(model)
    perturb_routers(reference)
    with controller.replay(trace):
        model(ids).logits.square().mean().backward()

    # The reference routes by hand: transformers' own logits, our formula, trace ids.
    spec = RouterSpec.from_hf_config(reference.config)
    for index, layer in enumerate(reference.model.layers):
        router = router_of(layer)
        if router is not None:
            _force_ids(router, trace.layer_experts(index).reshape(-1, trace.top_k).long(), spec)
    reference(ids).logits.square().mean().backward()

    for ours, theirs in zip(model.model.layers, reference.model.layers, strict=True):
        if router_of(ours) is None:
            continue
        grad = router_of(ours).weight.grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, router_of(theirs).weight.grad, rtol=1e-5, atol=1e-7)


def _force_ids(router: Any, forced: torch.Tensor, spec: RouterSpec) -> None:
    original = type(router).forward

    def forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = original(self, hidden_states)[0]
        return logits, gate_weights(logits, forced, spec), forced

    router.forward = MethodType(forward, router)


# -- 3. masking -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_minus_one_rows_route_natively_and_are_counted(family: str) -> None:
    model = tiny_model(family)
    ids = token_ids()
    controller = routereplay.attach(model)
    trace = recorded(controller, model, ids)
    perturb_routers(model)
    experts = trace.experts.clone()
    experts[:, -1] = NO_ROUTE  # the final sampled token of every sequence
    masked = RoutingTrace(experts, trace.layers, trace.num_experts)
    seen = ExpertIds(model)
    with torch.no_grad(), controller.replay(masked):
        model(ids)
    first = trace.layers[0]
    stats = controller.stats()[first]
    assert (stats.replayed, stats.native) == (BATCH * (SEQ - 1), BATCH)
    got = seen.last(first).reshape(BATCH, SEQ, -1)
    assert torch.equal(got[:, :-1], trace.layer_experts(first)[:, :-1].long())
    # The last rows are what the live (perturbed) router picks: record it to compare.
    fresh = recorded(controller, model, ids)
    assert torch.equal(got[:, -1], fresh.layer_experts(first)[:, -1].long())


# -- batches, padding, packing, checkpointing -------------------------------------------------


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    lengths = [SEQ, 5]
    sequences = [token_ids(seed=10 + i, batch=1, seq=n)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, SEQ - len(seq) :] = seq
        mask[row, SEQ - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, sequences


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_left_padded_batch_records_padding_as_minus_one_and_real_tokens_as_alone(
    family: str,
) -> None:
    model = tiny_model(family)
    controller = routereplay.attach(model)
    ids, mask, positions, sequences = left_padded_batch()
    trace = recorded(controller, model, ids, attention_mask=mask, position_ids=positions)
    assert trace.token_shape == (BATCH, SEQ)
    routed = trace.routed_mask()[..., 0]
    assert torch.equal(routed, mask.bool())
    for row, seq in enumerate(sequences):
        alone = recorded(controller, model, seq[None])
        assert torch.equal(trace.experts[row, SEQ - len(seq) :], alone.experts[0])


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_a_padded_batch_replays_its_own_trace_shape(family: str) -> None:
    model = tiny_model(family)
    controller = routereplay.attach(model)
    ids, mask, positions, _ = left_padded_batch()
    with torch.no_grad():
        native = model(ids, attention_mask=mask, position_ids=positions).logits
    trace = recorded(controller, model, ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad(), controller.replay(trace):
        replayed = model(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(replayed[mask.bool()], native[mask.bool()])
    stats = controller.totals()
    assert stats.native == len(trace.layers) * int((mask == 0).sum())  # padding: native


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_packed_sequences_replay_their_concatenated_traces(family: str) -> None:
    model = tiny_model(family)
    controller = routereplay.attach(model)
    sequences = [token_ids(seed=20 + i, batch=1, seq=n) for i, n in enumerate((6, 4, 7))]
    traces = [recorded(controller, model, seq) for seq in sequences]
    with torch.no_grad():
        alone = torch.cat([model(seq).logits[0] for seq in sequences])
    packed_ids = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(seq.shape[1]) for seq in sequences])[None]
    packed_trace = RoutingTrace(
        torch.cat([t.experts for t in traces], dim=1), traces[0].layers, traces[0].num_experts
    )
    perturb_routers(model, scale=0.0)  # same weights: the packed pass must match each alone
    seen = ExpertIds(model)
    with torch.no_grad(), controller.replay(packed_trace):
        # Training-style forward: no KV cache, so transformers reads packing from positions.
        packed = model(packed_ids, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    first = packed_trace.layers[0]
    assert torch.equal(seen.last(first), packed_trace.layer_experts(first)[0].long())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["record", "replay"])
def test_activation_checkpointing_recompute_sees_the_forward_ids(
    mode: str, reentrant: bool
) -> None:
    # Mixtral jitters router inputs in training; without a rewound RNG a recompute would
    # route differently, unless replay is keyed by (micro-batch, layer).
    model = tiny_model("mixtral", router_jitter_noise=0.5).train()
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant, "preserve_rng_state": False}
    )
    ids = token_ids()
    controller = routereplay.attach(model)
    trace = recorded(controller, model, ids)
    seen = ExpertIds(model)
    context = controller.record() if mode == "record" else controller.replay(trace)
    with context:
        model(ids).logits.sum().backward()
    for layer in controller.layout.moe_layers:
        forward, recompute = seen.calls[layer]
        assert torch.equal(forward, recompute)
        if mode == "replay":
            assert torch.equal(forward, trace.layer_experts(layer).reshape(-1, 2).long())
    assert all(s.recomputed == BATCH * SEQ for s in controller.stats().values())


# -- load-balancing loss ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_load_balancing_loss_matches_transformers_when_routing_is_native(family: str) -> None:
    model = tiny_model(family)
    controller = routereplay.attach(model)
    ids, mask, positions, _ = left_padded_batch()
    out = model(ids, attention_mask=mask, position_ids=positions, output_router_logits=True)
    ours = load_balancing_loss(out.router_logits, controller, attention_mask=mask)
    torch.testing.assert_close(ours, out.aux_loss, rtol=1e-6, atol=1e-7)


def test_load_balancing_loss_under_replay_counts_the_replayed_ids() -> None:
    model = tiny_model("mixtral")
    controller = routereplay.attach(model)
    ids = token_ids()
    trace = recorded(controller, model, ids)
    perturb_routers(model)
    with controller.replay(trace):
        out = model(ids, output_router_logits=True)
    ours = load_balancing_loss(out.router_logits, controller)
    # By hand: fraction of (token, slot) pairs per expert from the trace's ids, times the
    # mean live router probability per expert, summed, times the expert count.
    logits = torch.cat(out.router_logits)
    replayed = torch.cat([trace.layer_experts(i).reshape(-1, 2).long() for i in trace.layers])
    fraction = torch.nn.functional.one_hot(replayed, 8).float().mean(0)
    expected = (fraction * logits.softmax(-1).mean(0)).sum() * 8
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, out.aux_loss)  # transformers' counts native top-k
    ours.backward()
    assert router_of(model.model.layers[0]).weight.grad.abs().sum() > 0


# -- 4. strictness ---------------------------------------------------------------------------


@pytest.fixture
def qwen() -> tuple[Any, routereplay.ReplayController, RoutingTrace]:
    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0])
    controller = routereplay.attach(model)
    return model, controller, recorded(controller, model, token_ids())


def test_a_missing_layer_is_named(qwen: tuple) -> None:
    model, controller, trace = qwen
    with (
        controller.replay(trace.select_layers([1, 2])),
        pytest.raises(
            ReplayError, match=r"Layer 3, micro-batch 0: the trace has no routes for this layer"
        ),
    ):
        model(token_ids())


def test_a_wrong_top_k_is_refused(qwen: tuple) -> None:
    _model, controller, trace = qwen
    wider = RoutingTrace(
        torch.stack([torch.randperm(8)[:3] for _ in range(BATCH * SEQ * 3)]).reshape(
            BATCH, SEQ, 3, 3
        ),
        trace.layers,
        8,
    )
    with (
        pytest.raises(ReplayError, match="top_k=3; the model has 8 experts, top_k=2"),
        controller.replay(wider),
    ):
        pass


def test_a_wrong_token_count_names_the_micro_batch_and_both_shapes(qwen: tuple) -> None:
    model, controller, trace = qwen
    with (
        pytest.raises(
            ReplayError,
            match=r"Micro-batch 0: the batch has token axes \[2, 8\] \(16 tokens\); the trace holds \[2, 9\] \(18\)",
        ),
        controller.replay(trace),
    ):
        model(token_ids(seq=8))


def test_out_of_range_and_duplicated_ids_name_the_row_and_layer(qwen: tuple) -> None:
    _, controller, trace = qwen
    experts = trace.experts.clone()
    experts[1, 4, 2] = torch.tensor([9, 0])
    with pytest.raises(
        TraceError, match=r"Row \(sequence 1, token 4\), layer 3, holds expert id 9"
    ):
        RoutingTrace(experts, trace.layers, 8)
    trace.experts[0, 6, 0] = torch.tensor([5, 5], dtype=trace.experts.dtype)
    with (
        pytest.raises(
            ReplayError,
            match=r"Row \(sequence 0, token 6\), layer 1, routes to the same expert twice",
        ),
        controller.replay(trace),
    ):
        pass


def test_a_model_without_routers_lists_the_supported_families() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    with pytest.raises(
        LayoutError, match="'llama' is not an MoE config we know. Supported: deepseek_v2, .*gpt_oss"
    ):
        routereplay.attach(dense)


def test_an_unsupported_moe_family_lists_the_supported_ones() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "phimoe",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    with pytest.raises(
        LayoutError, match="'phimoe' is an MoE config .* of an unsupported family. Supported: "
    ):
        routereplay.attach(AutoModelForCausalLM.from_config(config))


# -- 5. isolation -----------------------------------------------------------------------------


def test_actor_and_reference_models_do_not_interfere() -> None:
    actor, reference = tiny_model("deepseek_v3", seed=1), tiny_model("deepseek_v3", seed=2)
    ids = token_ids()
    with torch.no_grad():
        reference_native = reference(ids).logits
    actor_controller = routereplay.attach(actor)
    reference_controller = routereplay.attach(reference)
    trace = recorded(actor_controller, actor, ids)
    perturb_routers(actor)
    with torch.no_grad(), actor_controller.replay(trace), reference_controller.record() as ref:
        actor(ids)
        reference_out = reference(ids).logits
    assert torch.equal(reference_out, reference_native)
    assert actor_controller.totals().replayed == 3 * BATCH * SEQ
    assert reference_controller.totals().replayed == 0
    assert not ref.trace.equal(trace)


def test_layers_wrapped_by_checkpoint_wrapper_are_still_found() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    model = tiny_model("deepseek_v3").train()
    apply_activation_checkpointing(
        model, check_fn=lambda m: type(m).__name__.endswith("DecoderLayer")
    )
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    controller = routereplay.attach(model)
    ids = token_ids()
    trace = recorded(controller, model, ids)
    perturb_routers(model)
    with controller.replay(trace):
        # Without use_cache=False the KV cache grows again on recompute (a transformers
        # matter: the plain model fails the same way).
        model(ids, use_cache=False).logits.sum().backward()
    assert controller.totals().replayed == 3 * BATCH * SEQ
    assert all(s.recomputed == BATCH * SEQ for s in controller.stats().values())


def test_a_second_attach_on_one_model_is_refused() -> None:
    model = tiny_model("qwen3_moe")
    first = routereplay.attach(model)
    with pytest.raises(
        ReplayError, match=r"are already attached to a controller.*detach the first"
    ):
        routereplay.attach(model)
    first.detach()
    routereplay.attach(model).detach()  # once detached, the model takes a new controller


def test_a_strict_replay_that_no_router_asked_is_an_error() -> None:
    model = tiny_model("qwen3_moe")
    controller = routereplay.attach(model)
    ids = token_ids()
    trace = recorded(controller, model, ids)
    controller.detach()  # the model now runs without this controller
    with (
        pytest.raises(
            ReplayError,
            match=r"no router asked this controller for ids during replay\(\): nothing was replayed",
        ),
        torch.no_grad(),
        controller.replay(trace),
    ):
        model(ids)


def test_a_router_patched_by_another_library_is_not_blamed_on_a_controller() -> None:
    model = tiny_model("qwen3_moe")
    router = next(r for layer in model.model.layers if (r := router_of(layer)) is not None)
    router.forward = MethodType(type(router).forward, router)  # as an offloading hook would
    with pytest.raises(LayoutError, match=r"have a forward patched by another library"):
        routereplay.attach(model)
