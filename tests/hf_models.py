"""Tiny random transformers MoE models, built from config classes (no downloads).

One place that knows how to make each family small, shared by every test that needs
a real model or a real router.
"""

from __future__ import annotations

from typing import Any

import torch

COMMON: dict[str, Any] = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "num_experts_per_tok": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "norm_topk_prob": True,
    },
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 16, "head_dim": 8},
    "qwen3_next": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "head_dim": 8,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 2,
        "layer_types": ["linear_attention", "full_attention"] * 2,
        "norm_topk_prob": True,
    },
    "deepseek_v3": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_key_value_heads": 4,  # multi-head latent attention has no grouped KV
    },
    "glm4_moe": {
        "n_routed_experts": 8,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "head_dim": 8,
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": True,
    },
    "mixtral": {"num_local_experts": 8, "head_dim": 8},
    "olmoe": {"num_experts": 8},
    "gpt_oss": {
        "num_local_experts": 8,
        "head_dim": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 16,
        # YaRN checks this against rope's original_max_position_embeddings (4096) * 32.
        "max_position_embeddings": 131072,
    },
}

FAMILIES = tuple(FAMILY_CONFIG)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config of `family`, small enough to build in milliseconds."""
    from transformers import AutoConfig

    kwargs = {**COMMON, **FAMILY_CONFIG[family], **overrides}
    if "layer_types" in kwargs and "layer_types" not in overrides:
        # Alternate the family's two attention kinds over however many layers we build.
        kinds = kwargs["layer_types"][:2]
        kwargs["layer_types"] = [kinds[i % 2] for i in range(kwargs["num_hidden_layers"])]
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random `AutoModelForCausalLM` of `family` in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Routers start at zero in some families: give them real, distinct logits.
    for module in model.modules():
        if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model.eval()


def router_of(layer: Any) -> Any | None:
    """The router module of a decoder layer, or None for a dense layer."""
    mlp = layer.mlp
    if not hasattr(mlp, "experts"):
        return None
    return getattr(mlp, "router", None) or mlp.gate


class ExpertIds:
    """Logs the ids every `mlp.experts` module receives, by decoder layer, independently
    of routereplay: the check that replay really reached the experts."""

    def __init__(self, model: Any) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {}
        self._handles = []
        for index, layer in enumerate(model.model.layers):
            if router_of(layer) is not None:
                hook = layer.mlp.experts.register_forward_pre_hook(self._logger(index))
                self._handles.append(hook)

    def _logger(self, index: int) -> Any:
        def log(module: Any, args: tuple[Any, ...]) -> None:
            self.calls.setdefault(index, []).append(args[1].detach().clone())

        return log

    def last(self, layer: int) -> torch.Tensor:
        return self.calls[layer][-1]

    def clear(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def perturb_routers(model: Any, scale: float = 1.0, seed: int = 123) -> None:
    """Move every router's weights so that native routing changes on most rows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            router = router_of(layer)
            if router is not None:
                noise = torch.randn(router.weight.shape, generator=generator)
                router.weight.add_(scale * noise.to(router.weight.dtype))
