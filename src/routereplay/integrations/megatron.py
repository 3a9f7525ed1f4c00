"""Replay inside megatron-core models: `attach(chunks)` -> `ReplayController`.

Routers are found by walking the model chunks this rank built (one per virtual
pipeline stage) and keyed by their global `layer_number` (1-based in Megatron,
0-based here), never by construction order or megatron-core's process-global list;
routers not reachable from the chunks (orphans of a rebuilt decoder) are never used.

Each `TopKRouter` gets, in place of megatron-core's `RouterReplay`, an object that asks
the controller for the ids: `topk_routing_with_score_function` calls its
`get_replay_topk(scores, ...)` with the scores it ranks (expert bias included), and
takes back the ids and their scores gathered from the live, unbiased scores, from
which it computes the gate weights itself (softmax over the k, sigmoid
renormalisation, scaling factor). So megatron-core's own math makes the weights, the
dispatcher gets the replayed ids (distinct: traces are validated), and the expert-bias
token counts, which read `routing_map`, count the routing that ran. The load-balancing
aux losses recompute top-k from the logits (`compute_routing_scores_for_aux_loss`):
they reflect what the live router would pick, replayed or not, as transformers'
`aux_loss` does; z-loss reads the logits only.

Micro-batches: megatron-core's schedules run each chunk's micro-batches in order, so
the k-th forward of a chunk within a record/replay context is micro-batch k. Each
chunk output gets a gradient hook that names its micro-batch again when its backward
starts, so full activation recompute (which re-runs the routers inside backward, in
any schedule order) replays the right micro-batch.

Token order: Megatron's hidden states are `[seq, batch, hidden]`, so a router sees its
tokens sequence-first. Traces given to `replay` for Megatron are `[seq, batch, layers,
top_k]` (`sequence_first(trace)` converts a `[batch, seq, ...]` one), or `[tokens,
...]` for packed (THD) input, holding exactly this rank's tokens (after context- and
sequence-parallel splits) and at least its stages' routed layers; recorded traces
come back sequence-first (`batch_first` converts).

MTP layers route natively: engines report no routes for them, and their routers are
never given decoder routes. Routers with `moe_router_fusion` (Transformer Engine's fused
top-k) or sinkhorn routing bypass `get_replay_topk` and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from routereplay.controller import ReplayController
from routereplay.errors import LayoutError, ReplayError, RouteReplayError
from routereplay.integrations.agreement import agree_on_checks
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit
from routereplay.trace import RoutingTrace

_MTP_PATH = re.compile(r"(?:^|\.)mtp\.")


def attach(
    chunks: nn.Module | Sequence[nn.Module],
    *,
    strict: bool = True,
    source: str = "megatron",
    pp_rank: int | None = None,
) -> ReplayController:
    """Hook every decoder router in this rank's model chunks to a new controller.

    `chunks`: the `GPTModel` (or a list, one per virtual pipeline stage, in vp_stage
    order) this rank built. `pp_rank` defaults to megatron-core's parallel state.
    """
    models = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    config = _config_of(models[0])
    layout = MoELayout.from_megatron_config(config)
    _refuse_unreplayable(config)
    split = PipelineSplit.from_megatron_config(config)
    rank = _pipeline_rank() if pp_rank is None else pp_rank
    controller = ReplayController(layout, strict=strict, source=source, label=f"pp_rank {rank}")
    for stage, model in enumerate(models):
        routers = find_routers(model)
        vp_stage = getattr(model, "vp_stage", None)
        vp_stage = stage if vp_stage is None else vp_stage
        expected = layout.stage_moe_layers(split, rank, vp_stage)
        if tuple(routers) != expected:
            raise LayoutError(
                f"Model chunk {stage} (pp_rank {rank}) has routers on global layers "
                f"{list(routers)} (0-based), but megatron-core's placement of this layout "
                f"puts routed layers {list(expected)} there. The chunks do not match the "
                "config: check num_layers_in_first/last_pipeline_stage and moe_layer_freq."
            )
        where = f"pp_rank {rank}, vp_stage {vp_stage}"
        for layer, router in routers.items():
            _install(router, _KeyedRouterReplay(controller, layer, where), controller)
            controller.add_router(layer)
        _count_micro_batches(model, stage, controller)
    return controller


def check_routes(
    controller: ReplayController,
    routes: Mapping[int, RoutingTrace],
    token_ids: Mapping[int, torch.Tensor] | None = None,
    *,
    num_micro_batches: int | None = None,
    group: Any = None,
) -> None:
    """Check, before the schedule runs, this rank's routes (micro-batch k -> sequence-first
    trace) against the layout, that each covers every router attached on this rank
    (and, with `num_micro_batches`, that micro-batches 0..n-1 all have routes), and,
    where `token_ids` (micro-batch k -> its input ids `[batch, seq]`) are given and the
    traces know their tokens, against the tokens; then agree with every rank of the
    pipeline `group` (default: megatron-core's) in one collective, so that a rank with
    bad routes fails all ranks at once instead of leaving them waiting inside the
    schedule.
    """
    failure: Exception | None = None
    try:
        scheduled = list(routes) if num_micro_batches is None else range(num_micro_batches)
        controller.check_routes(dict(routes), micro_batches=scheduled)
        for micro_batch, ids in (token_ids or {}).items():
            trace = routes.get(micro_batch)
            if trace is not None:
                controller.check_tokens_of(trace, ids, micro_batch, sequence_first=True)
    except Exception as error:  # any failure here is shared, or a peer would hang
        failure = error
    if group is None and dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
    agree_on_checks(failure, group, controller.label or "this rank")


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder `TopKRouter`s reachable from `model`, by global 0-based layer id."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ != "TopKRouter" or _MTP_PATH.search(name):
            continue
        layer = int(module.layer_number) - 1
        if layer in found:
            raise LayoutError(
                f"Two routers claim global layer {layer} (layer_number {layer + 1}), one at "
                f"{name}: a rebuilt or duplicated decoder. Attach to the chunks the "
                "schedule runs."
            )
        found[layer] = module
    return dict(sorted(found.items()))


def sequence_first(trace: RoutingTrace) -> RoutingTrace:
    """`[batch, seq, layers, k]` -> `[seq, batch, layers, k]`, the order a Megatron router
    sees its tokens in."""
    return _swap_token_axes(trace)


def batch_first(trace: RoutingTrace) -> RoutingTrace:
    """`[seq, batch, layers, k]` (a Megatron recording) -> `[batch, seq, layers, k]`."""
    return _swap_token_axes(trace)


class _KeyedRouterReplay:
    """Stands in for megatron-core's `RouterReplay` on one router: the controller
    decides its ids by (micro-batch, global layer)."""

    def __init__(self, controller: ReplayController, layer: int, where: str) -> None:
        self.controller = controller
        self.layer = layer
        self.where = where  # "pp_rank 1, vp_stage 0", named in every error

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores [tokens, topk] at the chosen ids, ids [tokens, topk])`."""
        assert default_compute_topk is not None
        with torch.no_grad():
            _, native = default_compute_topk(
                scores, topk, num_groups=num_groups, group_topk=group_topk
            )
        try:
            ids = self.controller.choose(self.layer, native, scores.shape[-1])
        except RouteReplayError as error:
            raise ReplayError(f"{self.where}: {error}") from error
        # Gathering at native ids equals top-k's values bit for bit, with the same
        # gradient: one path whatever the mode, so a recompute builds the same graph.
        return scores.gather(1, ids), ids


def _install(router: nn.Module, replay: _KeyedRouterReplay, controller: ReplayController) -> None:
    previous = getattr(router, "router_replay", None)
    router.router_replay = replay  # type: ignore[assignment]

    def publish_tokens(module: nn.Module, args: tuple[Any, ...]) -> None:
        hidden = args[0]  # [seq, batch, hidden]: the recording takes this token shape
        controller.set_tokens(tuple(hidden.shape[:-1]))

    hook = router.register_forward_pre_hook(publish_tokens)

    def undo() -> None:
        hook.remove()
        router.router_replay = previous  # type: ignore[assignment]

    controller.on_detach(undo)


def _count_micro_batches(model: nn.Module, stage: int, controller: ReplayController) -> None:
    """Name the micro-batch of each forward of this chunk, and again at its backward."""
    state = {"serial": -1, "forwards": 0}

    def before_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
        if state["serial"] != controller.context_serial:  # a new step: count from 0
            state["serial"], state["forwards"] = controller.context_serial, 0
        controller.set_micro_batch(state["forwards"])
        state["forwards"] += 1
        ids = args[0] if args else None  # GPTModel(input_ids, ...): None past stage 0
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            # The routers see hidden states only: the routes' token ids are checked here.
            controller.check_tokens(ids, sequence_first=True)

    def after_forward(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        micro_batch = controller.current_micro_batch
        outputs = output if isinstance(output, tuple | list) else (output,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                # Runs as this micro-batch's backward begins: before any recompute in it.
                tensor.register_hook(_naming(controller, micro_batch))  # type: ignore[no-untyped-call]

    controller.on_detach(model.register_forward_pre_hook(before_forward).remove)
    controller.on_detach(model.register_forward_hook(after_forward).remove)


def _naming(controller: ReplayController, micro_batch: Any) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        controller.set_micro_batch(micro_batch)

    return hook


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_moe_experts"):
        raise LayoutError(
            f"{type(model).__name__} has no megatron-core TransformerConfig (.config): "
            "attach() takes the GPTModel chunks a rank built."
        )
    return config


def _refuse_unreplayable(config: Any) -> None:
    if getattr(config, "moe_router_fusion", False):
        raise LayoutError(
            "moe_router_fusion=True routes through Transformer Engine's fused top-k, which "
            "cannot take given ids: set moe_router_fusion=False to replay."
        )
    if getattr(config, "moe_router_load_balancing_type", None) == "sinkhorn":
        raise LayoutError("Sinkhorn routing cannot take given ids; use top-k routing to replay.")


def _pipeline_rank() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return int(parallel_state.get_pipeline_model_parallel_rank())


def _swap_token_axes(trace: RoutingTrace) -> RoutingTrace:
    if len(trace.token_shape) != 2:
        raise LayoutError(
            f"Swapping batch and sequence needs a trace with two token axes, found "
            f"{list(trace.token_shape)}; packed (THD) traces have one and need none."
        )
    return trace.transpose_tokens()
