"""What megatron-core's router computes around the replayed ids (PP=1, one process).

A DeepSeek-style router: sigmoid scores, expert bias, group-limited top-k, scaling
factor, load-balancing aux loss. Under replay:
- the dispatcher gets the trace's ids, each row distinct (routing_map has k per row);
- the gate weights are megatron-core's own formula at those ids, from the live,
  unbiased scores: equal to routereplay's `gate_weights` for the matching spec;
- the expert-bias token counts (`local_tokens_per_expert`) count the replayed ids;
- the aux loss recomputes top-k from the logits, so it reflects native routing, the
  same value whether or not the step replays (as transformers' aux_loss does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from megatron_harness import build_gpt, make_micro_batches, run_on_ranks, run_schedule

from routereplay import MoELayout, RouterSpec, RoutingTrace, gate_weights
from routereplay.integrations import megatron as rr_megatron

pytestmark = pytest.mark.timeout(120)

BATCH, SEQ, EXPERTS, TOP_K = 2, 16, 8, 2
DEEPSEEK_STYLE = {
    "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "moe_router_num_groups": 4,
    "moe_router_group_topk": 2,
    "moe_router_topk_scaling_factor": 2.5,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.01,
}
SPEC = RouterSpec(TOP_K, "sigmoid", renormalize=True, renorm_eps=1e-20, scaling_factor=2.5)


def routes(seed: int = 11) -> dict[int, RoutingTrace]:
    layout = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], EXPERTS, TOP_K)
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((SEQ, BATCH, 6, EXPERTS)), -1)[..., :TOP_K]
    return {0: RoutingTrace(torch.from_numpy(ids), layout.moe_layers, EXPERTS)}


def one_step(rank: int) -> dict[str, Any]:
    chunks = build_gpt(1, None, **DEEPSEEK_STYLE)
    router = chunks[0].decoder.layers[2].mlp.router  # global layer 2 (0-based), routed
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
    seen: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        logits = module.gating(args[0]).reshape(-1, EXPERTS)
        seen.update(logits=logits.detach(), probs=output[0].detach(), routing_map=output[1])

    router.register_forward_hook(capture)
    controller = rr_megatron.attach(chunks)
    batches = make_micro_batches(1, BATCH, SEQ, seed=4)
    aux: dict[str, float] = {}

    def aux_of_step(context: Any) -> tuple[float, torch.Tensor]:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        router.local_tokens_per_expert.zero_()
        with context:
            run_schedule(chunks, batches)
        # Layer 2 is the first routed layer: its input, and so its logits, are the same
        # in both steps; later layers see the outputs of different experts.
        per_layer = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
        return float(per_layer[2]), router.local_tokens_per_expert.clone()

    aux["native"], native_counts = aux_of_step(torch.enable_grad())
    aux["replay"], replay_counts = aux_of_step(controller.replay(routes()))
    return {**seen, "aux": aux, "native_counts": native_counts, "replay_counts": replay_counts}


@pytest.fixture(scope="module")
def step() -> dict[str, Any]:
    return run_on_ranks(one_step, world_size=1, timeout_s=90.0)[0]


def replayed_ids() -> torch.Tensor:
    return routes()[0].layer_experts(2).reshape(-1, TOP_K).long()


def test_the_dispatcher_gets_the_replayed_ids_each_once(step: dict[str, Any]) -> None:
    routing_map = step["routing_map"]
    assert (routing_map.sum(-1) == TOP_K).all()
    chosen = routing_map.nonzero()[:, 1].view(-1, TOP_K)
    assert torch.equal(chosen, replayed_ids().sort(-1).values)


def test_gate_weights_are_megatrons_formula_at_the_replayed_ids(step: dict[str, Any]) -> None:
    ids = replayed_ids()
    ours = gate_weights(step["logits"], ids, SPEC)
    theirs = step["probs"].gather(1, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-7)
    # The expert bias chose nothing: weights are the unbiased scores at the given ids.
    assert (step["probs"] > 0).sum(-1).eq(TOP_K).all()


def test_expert_bias_counts_count_the_routing_that_ran(step: dict[str, Any]) -> None:
    expected = torch.bincount(replayed_ids().flatten(), minlength=EXPERTS).float()
    assert torch.equal(step["replay_counts"].float(), expected)
    assert not torch.equal(step["native_counts"].float(), expected)


def test_the_aux_loss_reflects_native_routing_replayed_or_not(step: dict[str, Any]) -> None:
    # Same logits at layer 2, different ids ran: the aux loss does not see the replay.
    assert step["aux"]["native"] > 0
    assert step["aux"]["replay"] == pytest.approx(step["aux"]["native"], rel=1e-6)
