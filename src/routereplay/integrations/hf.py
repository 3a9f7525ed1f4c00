"""Replay inside transformers MoE causal LMs: `attach(model)` -> `ReplayController`.

Every router (`model.model.layers[i].mlp.gate`, GPT-OSS: `.mlp.router`) gets a
forward that computes its logits exactly as transformers does, then asks the
controller for ids and gate weights. The MoE block passes those to `mlp.experts`
unchanged, so replayed ids reach the experts and the weights keep their gradient.
`controller.detach()` puts the original forwards back.

Nothing here imports transformers: the adapter works from the model's structure and
config, so it also follows models loaded with `trust_remote_code` of a known family.

Load-balancing loss: transformers' own `aux_loss` recomputes top-k from the router
logits, so under replay it describes the routing the live router *would* choose.
`load_balancing_loss` below counts the routing that actually ran (the replayed ids)
with the same formula; use it when adding an aux loss to a replayed update.
"""

from __future__ import annotations

import re
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from routereplay.controller import ReplayController
from routereplay.errors import LayoutError, ReplayError
from routereplay.errors import short_ids as _short
from routereplay.layout import SUPPORTED_HF_FAMILIES, MoELayout
from routereplay.routing import RouterSpec

# Families whose router casts hidden states and weight to float32 before the linear.
_FP32_LOGITS = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe")
# Marks a router this adapter patched (and no other library's hook).
_PATCHED = "_routereplay_attached"
_ROUTER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(?:gate|router)$")
# Wrappers that insert a level into module names: activation checkpointing's
# checkpoint_wrapper, FSDP1, torch.compile.
_WRAPPER_LEVEL = re.compile(
    r"(?:^|\.)(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)(?=\.|$)"
)


def attach(model: nn.Module, *, strict: bool = True, source: str = "hf") -> ReplayController:
    """Hook every router of a transformers MoE causal LM to a new `ReplayController`.

    The controller records `[batch, seq, routed layers, top_k]` traces (padding from
    the attention mask as -1) and replays traces of the same shape, or `[tokens, ...]`
    ones for packed input.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise LayoutError(
            f"{type(model).__name__} has no .config: attach() takes a transformers model. "
            f"Supported families: {', '.join(SUPPORTED_HF_FAMILIES)}."
        )
    layout = MoELayout.from_hf_config(config)
    spec = RouterSpec.from_hf_config(config)
    routers = find_routers(model)
    if tuple(routers) != layout.moe_layers:
        raise LayoutError(
            f"The {layout.family} config routes layers {list(layout.moe_layers)} but the model "
            f"has routers on layers {list(routers)}. Supported families: "
            f"{', '.join(SUPPORTED_HF_FAMILIES)}."
        )
    ours = [layer for layer, router in routers.items() if hasattr(router, _PATCHED)]
    if ours:
        raise ReplayError(
            f"The routers of layers {_short(ours)} are already attached to a controller. "
            "Two controllers on one model would take each other's patches, and detaching "
            "one would silently switch the other off: detach the first "
            "(controller.detach()) before attaching again."
        )
    theirs = [layer for layer, router in routers.items() if "forward" in vars(router)]
    if theirs:
        raise LayoutError(
            f"The routers of layers {_short(theirs)} have a forward patched by another "
            "library (an offloading or device-map hook?); routereplay replaces the router's "
            "forward and would drop it. Attach before that library's hooks, or without them."
        )
    controller = ReplayController(layout, strict=strict, source=source)
    fp32 = layout.family in _FP32_LOGITS
    for layer, router in routers.items():
        _patch_router(router, layer, controller, spec, fp32)
    hook = model.register_forward_pre_hook(_publish_tokens(controller), with_kwargs=True)
    controller.on_detach(hook.remove)
    return controller


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Router modules by global decoder layer id, in layer order."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = _ROUTER_PATH.search(_WRAPPER_LEVEL.sub("", name))
        # shared_expert_gate and plain Linear gates are not routers: a router has experts
        # beside it and a `top_k`.
        if match and hasattr(module, "top_k") and hasattr(module, "weight"):
            found[int(match.group(1))] = module
    return dict(sorted(found.items()))


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    controller: ReplayController,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss of the routing that ran in the latest forward.

    `router_logits`: the model output's `router_logits`, one `[tokens, experts]` per
    routed layer in layer order. Same formula as transformers'
    `load_balancing_loss_func`, but the expert counts come from the ids the routers
    used (replayed or native), not from a fresh top-k of the logits; the gradient
    flows through the live router probabilities as there.
    """
    layout = controller.layout
    if len(router_logits) != len(layout.moe_layers):
        raise LayoutError(
            f"Expected router logits for {len(layout.moe_layers)} routed layers, "
            f"found {len(router_logits)}."
        )
    device = router_logits[0].device
    logits = torch.cat([x.to(device) for x in router_logits], dim=0)
    ids = torch.cat([controller.last_ids(layer).to(device) for layer in layout.moe_layers])
    probs = F.softmax(logits, dim=-1)
    expert_mask = F.one_hot(ids, layout.num_experts).float()  # [tokens * layers, k, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        # Padding tokens count for nothing: weight every (layer, token) by the mask.
        weight = attention_mask.reshape(-1).to(device, probs.dtype).repeat(len(router_logits))
        tokens_per_expert = (expert_mask * weight[:, None, None]).sum(0) / weight.sum()
        prob_per_expert = (probs * weight[:, None]).sum(0) / weight.sum()
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * layout.num_experts


def _patch_router(
    router: nn.Module, layer: int, controller: ReplayController, spec: RouterSpec, fp32: bool
) -> None:
    """Give `router` a forward that routes through `controller`; undone on detach."""

    def forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight: torch.Tensor = self.weight  # [experts, hidden]
        hidden = hidden_states.reshape(-1, weight.shape[-1])
        if fp32:
            logits = F.linear(hidden.float(), weight.float())
        else:
            logits = F.linear(hidden, weight, getattr(self, "bias", None))
        bias = getattr(self, "e_score_correction_bias", None)
        weights, ids = controller.route(layer, logits, spec, bias)
        return logits, weights, ids

    router.forward = MethodType(forward, router)
    setattr(router, _PATCHED, True)
    controller.add_router(layer)

    def undo() -> None:
        del router.forward
        delattr(router, _PATCHED)

    controller.on_detach(undo)


def _publish_tokens(controller: ReplayController) -> Any:
    """A model pre-forward hook telling the controller the token axes, padding and token
    ids (which replay checks against an engine trace's)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            controller.set_tokens(None)
            return
        shape = tuple(tokens.shape[:2])
        mask = kwargs.get("attention_mask")
        padding = None
        # A 2-D mask marks padding (and covers cached tokens too while generating: its
        # last columns are the tokens of this forward); 4-D masks are not padding.
        if mask is not None and mask.ndim == 2:
            padding = mask[:, -shape[1] :] == 0
        controller.set_tokens(shape, padding, ids if ids is not None and ids.ndim == 2 else None)

    return hook
