"""The random Qwen3-MoE models the whole-model benchmarks time (no download): one place
for the config they share and for the routers' initialisation."""

from __future__ import annotations

from typing import Any

import torch


def random_qwen3_moe(
    *,
    hidden: int,
    layers: int,
    experts: int,
    top_k: int,
    heads: int,
    vocab: int,
    positions: int,
    **config: Any,
) -> Any:
    """A float32 Qwen3-MoE, seeded 0, every layer sparse, `heads` attention heads of
    `hidden // heads` each; `config` adds or overrides `Qwen3MoeConfig` fields. Routers
    start at zero in some families: they get real, distinct logits (weights N(0, 0.5))."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,  # unused: every layer is sparse
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": positions,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen3MoeConfig(**(fields | config)), dtype=torch.float32
    )
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model
