"""The transformers MoE families routereplay knows, one entry per `model_type`.

An entry holds all a family's routing knowledge: which decoder layers route (its
dense-layer rule), how its router turns logits into ids and gate weights
(`RouterSpec`), whether the router computes its logits in float32, and the name of
the router module under each layer's `mlp`. Adding a family is adding an entry to
`FAMILIES`, usually from the rules below; nothing else in the library changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routereplay.errors import LayoutError
from routereplay.families.config import ConfigView
from routereplay.layout import MoELayout
from routereplay.routing import RouterSpec

# Keys that only an MoE config carries: an unknown model type with one of these set
# is an MoE family we do not know, not a dense model.
_ROUTER_KEYS = (
    "num_experts",
    "n_routed_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "num_moe_experts",
)
# Each family's own key first; transformers 5 renames some (Qwen3-MoE stores
# num_local_experts where its config.json says num_experts).
_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
_MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")

# (config, num_layers, num_experts) -> one routes/dense flag per decoder layer.
DenseRule = Callable[[ConfigView, int, int], list[bool]]
# (config, top_k) -> the family's router.
RouterRule = Callable[[ConfigView, int], RouterSpec]


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family routes.

    routed:      which decoder layers have a router.
    router:      the `RouterSpec` of those routers.
    fp32_logits: the router casts hidden states and its weight to float32 before the
                 linear (DeepSeek, GLM), so its logits do not depend on the model dtype.
    router_name: the router's attribute under `layers[i].mlp`.
    """

    routed: DenseRule
    router: RouterRule
    fp32_logits: bool = False
    router_name: str = "gate"


# -- dense-layer rules ------------------------------------------------------------------


def every_layer_routes(config: ConfigView, num_layers: int, num_experts: int) -> list[bool]:
    return [True] * num_layers


def first_k_dense(config: ConfigView, num_layers: int, num_experts: int) -> list[bool]:
    """DeepSeek: the first `first_k_dense_replace` layers are dense, then every
    `moe_layer_freq`-th layer routes."""
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return [i >= first_dense and i % freq == 0 for i in range(num_layers)]


def sparse_step(config: ConfigView, num_layers: int, num_experts: int) -> list[bool]:
    """Qwen: layer i routes when (i + 1) is a multiple of `decoder_sparse_step` and i
    is not in `mlp_only_layers` (0-based)."""
    dense = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or 1)
    outside = sorted(i for i in dense if not 0 <= i < num_layers)
    if outside:
        raise LayoutError(
            f"{config.model_type}: mlp_only_layers {outside} lie outside the "
            f"{num_layers} decoder layers; ids are 0-based."
        )
    return [i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


# -- routers ----------------------------------------------------------------------------


def softmax_router(config: ConfigView, top_k: int) -> RouterSpec:
    """Qwen, OLMoE: softmax over all experts, optional renormalisation, weights back in
    the logits' dtype."""
    norm = bool(config.get("norm_topk_prob"))
    return RouterSpec(top_k, "softmax", renormalize=norm, weights_in_logits_dtype=True)


def mixtral_router(config: ConfigView, top_k: int) -> RouterSpec:
    return RouterSpec(top_k, "softmax", renormalize=True)


def gpt_oss_router(config: ConfigView, top_k: int) -> RouterSpec:
    """Top-k of the raw logits, softmax over the k chosen."""
    return RouterSpec(top_k, "softmax_topk", upcast=False, weights_in_logits_dtype=True)


def deepseek_v2_router(config: ConfigView, top_k: int) -> RouterSpec:
    """Softmax scores; group-limited only with `topk_method="group_limited_greedy"`."""
    grouped = config.get("topk_method") == "group_limited_greedy"
    return RouterSpec(
        top_k,
        "softmax",
        scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        n_group=int(config.get("n_group") or 1) if grouped else 1,
        topk_group=int(config.get("topk_group") or 1) if grouped else 1,
        group_score_top=1,
        masked_score=0.0,
        sorted_ids=False,
    )


def deepseek_v3_router(config: ConfigView, top_k: int) -> RouterSpec:
    """Sigmoid scores, expert bias for selection only, groups scored by their best two."""
    return RouterSpec(
        top_k,
        "sigmoid",
        renormalize=bool(config.get("norm_topk_prob")),
        renorm_eps=1e-20,
        scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        n_group=int(config.get("n_group") or 1),
        topk_group=int(config.get("topk_group") or 1),
        group_score_top=2,
        sorted_ids=False,
    )


_DEEPSEEK_V3 = Family(first_k_dense, deepseek_v3_router, fp32_logits=True)
_QWEN = Family(sparse_step, softmax_router)

FAMILIES: dict[str, Family] = {
    "deepseek_v2": Family(first_k_dense, deepseek_v2_router, fp32_logits=True),
    "deepseek_v3": _DEEPSEEK_V3,
    "deepseek_v32": _DEEPSEEK_V3,
    "kimi_k2": _DEEPSEEK_V3,
    "glm4_moe": _DEEPSEEK_V3,
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "qwen3_next": _QWEN,
    "olmoe": Family(every_layer_routes, softmax_router),
    "mixtral": Family(every_layer_routes, mixtral_router),
    "gpt_oss": Family(every_layer_routes, gpt_oss_router, router_name="router"),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_of(config: Any) -> tuple[Family, ConfigView]:
    """The family entry of a transformers config (object or config.json dict), and a
    view of its text model's fields."""
    view = ConfigView(config)
    family = FAMILIES.get(view.model_type)
    if family is not None:
        return family, view
    found = [k for k in _ROUTER_KEYS if view.get(k)]
    what = (
        f"an MoE config (it sets {', '.join(found)}) of an unsupported family"
        if found
        else "not an MoE config we know"
    )
    raise LayoutError(
        f"model_type {view.model_type!r} is {what}. Supported: "
        f"{', '.join(SUPPORTED_FAMILIES)}. For anything else build the layout directly: "
        "MoELayout(num_layers=..., moe_layers=..., num_experts=..., top_k=...)."
    )


def hf_layout(config: Any) -> MoELayout:
    """The `MoELayout` of a transformers config: which layers route, to how many experts."""
    family, view = family_of(config)
    num_layers = int(view.require("num_hidden_layers"))
    top_k = int(view.require("num_experts_per_tok"))
    mtp = int(next((view.get(k) for k in _MTP_KEYS if view.get(k)), 0) or 0)
    num_experts = int(view.require(*_EXPERT_KEYS))
    pattern = [int(flag) for flag in family.routed(view, num_layers, num_experts)]
    return MoELayout.from_dense_pattern(pattern, num_experts, top_k, mtp, family=view.model_type)


def hf_router_spec(config: Any) -> RouterSpec:
    """The `RouterSpec` of the routers a transformers model of this config builds."""
    layout = hf_layout(config)  # validates the family and the fields
    family, view = family_of(config)
    return family.router(view, layout.top_k)
