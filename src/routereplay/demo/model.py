"""A tiny DeepSeek-V3-style model, and a short supervised warm-up on the demo's task.

Hybrid like the real one: layer 0 is a dense MLP, the rest route each token to
`num_experts_per_tok` of `n_routed_experts` experts (plus a shared expert) with
sigmoid scores, an expert bias that shifts selection only, and group-limited top-k
(`n_group` groups, the best `topk_group` eligible). Random weights, no downloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routereplay.demo.task import EOS, PAD, SortDigits
from routereplay.integrations.hf import find_routers

VOCAB_SIZE = 32

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 64,
    "num_nextn_predict_layers": 0,
    "pad_token_id": PAD,
    "bos_token_id": 1,
    "eos_token_id": EOS,
}


@dataclass(frozen=True)
class WarmUp:
    """Supervised cross-entropy on the task before RL: enough that routing carries
    structure and sampled answers are sometimes right (GRPO needs both outcomes)."""

    steps: int = 120
    batch_size: int = 64
    learning_rate: float = 3e-3
    router_init_std: float = 0.3
    expert_bias_std: float = 0.05


def build_model(model_config: Mapping[str, Any] | None, warm_up: WarmUp, seed: int) -> nn.Module:
    """A random float32 `DeepseekV3ForCausalLM` of `DEFAULT_MODEL_CONFIG` updated with
    `model_config`, routers and expert biases initialised with `warm_up`'s scales."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(**{**DEFAULT_MODEL_CONFIG, **(model_config or {})})
    torch.manual_seed(seed)
    model: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    with torch.no_grad():
        for router in find_routers(model).values():
            weight: Any = router.weight
            bias: Any = router.e_score_correction_bias
            # transformers starts routers near zero: every score ~0.5, selection a
            # coin toss. A wider start gives routing structure that training shapes.
            nn.init.normal_(weight, std=warm_up.router_init_std)
            # The bias DeepSeek-V3 tunes for load balance; it moves selection only.
            bias.normal_(0.0, warm_up.expert_bias_std)
    return model.eval()


def warm_up_model(
    model: nn.Module,
    task: SortDigits,
    warm_up: WarmUp,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float | int]:
    """Train `model` in place on the task's answers, `on_step(done)` after each step;
    returns the loss curve's ends and the time taken."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm_up.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / warm_up.steps)
    )
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(warm_up.steps):
        input_ids, attention_mask, labels = task.supervised_batch(warm_up.batch_size, generator)
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step == 0:
            first = float(loss.detach())
        last = float(loss.detach())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return {
        "steps": warm_up.steps,
        "first_loss": first,
        "final_loss": last,
        "seconds": time.perf_counter() - start,
    }
