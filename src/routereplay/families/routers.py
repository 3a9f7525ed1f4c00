"""Transformers routers routed through a `ReplayController`: `attach(model)`.

Every router (`model.model.layers[i].mlp.gate`, or the family's `router_name`) gets a
forward that computes its logits exactly as transformers does, then asks the
controller for ids and gate weights. The MoE block passes those to `mlp.experts`
unchanged, so replayed ids reach the experts and the weights keep their gradient.
`controller.detach()` puts the original forwards back.

Both sides use this: the trainer (`routereplay.attach`) and the embedded recording
engine (`routereplay.engines.hf`). Nothing here imports transformers: it works from
the model's structure and config, so it also follows models loaded with
`trust_remote_code` of a known family.
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
from routereplay.families.config import ConfigView
from routereplay.families.table import FAMILIES, SUPPORTED_FAMILIES, family_of, hf_layout
from routereplay.routing import RouterSpec

# Marks a router this module patched (and no other library's hook).
_PATCHED = "_routereplay_attached"
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
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    layout = hf_layout(config)
    family, view = family_of(config)
    spec = family.router(view, layout.top_k)
    routers = find_routers(model)
    if tuple(routers) != layout.moe_layers:
        raise LayoutError(
            f"The {layout.family} config routes layers {list(layout.moe_layers)} but the model "
            f"has routers on layers {list(routers)}. Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}."
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
    for layer, router in routers.items():
        _patch_router(router, layer, controller, spec, family.fp32_logits)
    hook = model.register_forward_pre_hook(_publish_tokens(controller), with_kwargs=True)
    controller.on_detach(hook.remove)
    return controller


def instance_patches(model: nn.Module) -> list[str]:
    """What a copy of `model` would carry over from its instance: the names of modules
    whose `forward` is patched (routereplay's routers, an offloading hook) and "a
    pre-forward hook" for hooks on the model itself (routereplay's token hook). Empty
    for a plain model."""
    patched = [name for name, module in model.named_modules() if "forward" in vars(module)]
    # torch has no public way to list a module's hooks.
    return patched + (["a pre-forward hook"] if model._forward_pre_hooks else [])


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Router modules by global decoder layer id, in layer order: the modules named by
    the model's family (`Family.router_name`) under `layers[i].mlp`; any family's name
    for a model whose config names no family we know."""
    path = _router_path(model)
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = path.search(_WRAPPER_LEVEL.sub("", name))
        # shared_expert_gate and plain Linear gates are not routers: a router has experts
        # beside it and a `top_k`.
        if match and hasattr(module, "top_k") and hasattr(module, "weight"):
            found[int(match.group(1))] = module
    return dict(sorted(found.items()))


def _router_path(model: nn.Module) -> re.Pattern[str]:
    config = getattr(model, "config", None)
    family = FAMILIES.get(ConfigView(config).model_type) if config is not None else None
    names = {family.router_name} if family else {f.router_name for f in FAMILIES.values()}
    alternatives = "|".join(sorted(re.escape(name) for name in names))
    return re.compile(rf"(?:^|\.)layers\.(\d+)\.mlp\.(?:{alternatives})$")


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
