"""Replay under PyTorch's own pipeline engine (`torch.distributed.pipelining`).

The model is cut into stages by `integrations.hf_stages` (`split_model`,
`StageModule`); this module runs them under a `ReplayController`. The stages
reference the modules of the full model, so `routereplay.attach(model)` on the full
model, before or after splitting, keys every router by its global layer.

Micro-batch identity comes from the schedule itself: `ReplayPipelineStage` publishes
the chunk id the schedule passes to `forward_one_chunk`, `backward_one_chunk` and
`backward_weight_one_chunk` to the controller before running it. Activation
recompute (transformers' gradient checkpointing or `torch.utils.checkpoint`) runs
inside `backward_one_chunk`, so it replays the micro-batch whose backward is running,
whatever order the schedule chose (LoopedBFS runs its stages' backwards in reverse).
Nothing counts forward calls.

Stages are built with static shapes (`micro_batch_shape`), so the schedule never runs
its shape-inference forward and backward: those would route made-up activations
under no chunk id, and in record mode keep them as a micro-batch's routes. A stage
that would run that pass inside a record or replay context refuses to.

`pipeline_replay` checks the routes against every stage of this rank before the
schedule starts (a rank failing mid-schedule leaves its peers waiting); errors name
the stage, pp_rank, layer and micro-batch. `gather_recording` joins the ranks'
recorded stage slices into whole-model traces per micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from routereplay.align import stack_stages
from routereplay.controller import Mode, ReplayController
from routereplay.errors import ReplayError, RouteReplayError
from routereplay.integrations.agreement import agree_on_checks
from routereplay.integrations.hf_stages import StageModule, split_model
from routereplay.layout import MoELayout
from routereplay.recording import MicroBatch, Recording
from routereplay.trace import RoutingTrace

__all__ = [
    "ReplayPipelineStage",
    "StageModule",
    "build_stages",
    "check_stage_routes",
    "gather_recording",
    "pipeline_replay",
    "sequence_traces",
    "split_model",
    "split_routes",
]


class ReplayPipelineStage(PipelineStage):
    """A `PipelineStage` that tells `controller` which micro-batch it runs.

    `micro_batch_shape` is `(batch, seq)` of one micro-batch: the stage's input and
    output shapes are given to torch up front, so no shape-inference pass runs.
    """

    def __init__(
        self,
        submodule: StageModule,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        controller: ReplayController,
        micro_batch_shape: tuple[int, int],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        batch, seq = micro_batch_shape
        config = submodule.config
        dtype = next(submodule.parameters()).dtype
        hidden = torch.empty(batch, seq, config.hidden_size, dtype=dtype, device=device)
        is_first, is_last = stage_index == 0, stage_index == num_stages - 1
        inputs = (
            torch.empty(batch, seq, dtype=torch.long, device=device)
            if is_first
            else hidden.requires_grad_()
        )
        outputs = (
            torch.empty(batch, seq, config.vocab_size, dtype=dtype, device=device)
            if is_last
            else torch.empty_like(hidden)
        )
        super().__init__(
            submodule,
            stage_index,
            num_stages,
            device,
            input_args=inputs,
            output_args=outputs.requires_grad_(),
            group=group,
        )
        self.controller = controller
        self.routed_layers = tuple(
            i for i in submodule.global_layers if controller.layout.is_moe(i)
        )
        self.micro_batch_shape = (batch, seq)
        controller.on_detach(submodule.register_forward_pre_hook(self._publish_tokens).remove)

    @property
    def where(self) -> str:
        """`"stage 2 (pp_rank 0)"`, named in every error of this stage."""
        return f"stage {self.stage_index} (pp_rank {self.group_rank})"

    def forward_one_chunk(
        self,
        fwd_chunk_id: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        save_forward_output: bool = True,
    ) -> Any:
        self.controller.set_micro_batch(fwd_chunk_id)
        with self._naming_errors():
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    def backward_one_chunk(
        self,
        bwd_chunk_id: int,
        loss: Any = None,
        full_backward: bool = True,
        last_backward: bool = False,
    ) -> None:
        # Recompute of checkpointed layers happens in here: it must see this micro-batch.
        self.controller.set_micro_batch(bwd_chunk_id)
        with self._naming_errors():
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        self.controller.set_micro_batch(bwd_chunk_id)
        with self._naming_errors():
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward)

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        if self.controller.mode is not Mode.OFF:
            raise ReplayError(
                f"{self.where}: torch's shape-inference pass would route made-up activations "
                f"as no micro-batch inside a {self.controller.mode.value} context. Build "
                "every stage of the pipeline as a ReplayPipelineStage (static shapes), or "
                "run one step outside record/replay first."
            )
        return super()._forward_metadata_inference(*args, **kwargs)

    def _publish_tokens(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        inputs = args[0]  # the first stage's input_ids, a later stage's hidden states
        ids = None if inputs.is_floating_point() else inputs
        self.controller.set_tokens(tuple(inputs.shape[:2]), None, ids)

    @contextmanager
    def _naming_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            # torch wraps a forward's exception in a RuntimeError: find ours in the chain.
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, RouteReplayError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise ReplayError(f"{self.where}: {cause}") from error


def build_stages(
    model: nn.Module,
    controller: ReplayController,
    pp_size: int,
    pp_rank: int,
    micro_batch_shape: tuple[int, int],
    *,
    stages_per_rank: int = 1,
    checkpoint_layers: bool = False,
    device: torch.device | None = None,
    group: dist.ProcessGroup | None = None,
) -> list[ReplayPipelineStage]:
    """This rank's `ReplayPipelineStage`s of `model` (attached to `controller`), in
    stage order: pass them to a `PipelineScheduleSingle` (one) or `...Multi` schedule."""
    num_stages = pp_size * stages_per_rank
    where = torch.device("cpu") if device is None else device
    stages = [
        ReplayPipelineStage(
            module, index, num_stages, where, controller, micro_batch_shape, group=group
        )
        for index, module in split_model(
            model,
            pp_size,
            pp_rank,
            stages_per_rank=stages_per_rank,
            checkpoint_layers=checkpoint_layers,
        ).items()
    ]
    # The controller was attached to the whole model; this rank runs its stages' routers.
    controller.limit_routers(layer for stage in stages for layer in stage.routed_layers)
    return stages


def split_routes(trace: RoutingTrace, num_micro_batches: int) -> dict[int, RoutingTrace]:
    """`[batch, seq, layers, top_k]` -> micro-batch k -> its rows, split along dim 0 as
    the schedules split their inputs (`torch.tensor_split`)."""
    if trace.token_shape[0] % num_micro_batches:
        raise ReplayError(
            f"A batch of {trace.token_shape[0]} sequences does not split into "
            f"{num_micro_batches} equal micro-batches."
        )
    size = trace.token_shape[0] // num_micro_batches
    return {
        k: trace.select_tokens(slice(k * size, (k + 1) * size)) for k in range(num_micro_batches)
    }


@contextmanager
def pipeline_replay(
    stages: Sequence[ReplayPipelineStage],
    routes: Mapping[int, RoutingTrace],
    num_micro_batches: int,
    input_ids: torch.Tensor | None = None,
) -> Iterator[None]:
    """Replay `routes` (micro-batch -> `[batch, seq, layers, top_k]`) in the schedule
    step run inside; checked first against every stage of this rank.

    Every rank of the stages' process group learns whether all ranks passed their checks
    (one collective), so a rank with bad routes fails them all at once, each naming the
    rank and the reason, instead of leaving its peers waiting out the group's timeout.
    `input_ids [batch, seq]`, the batch the first stage will split into micro-batches,
    are checked against the routes' token ids in that check too (the first stage checks
    them again as it runs).
    """
    if not stages:
        raise ReplayError("pipeline_replay() needs this rank's stages; none were given.")
    failure: Exception | None = None
    try:
        for stage in stages:
            check_stage_routes(stage, routes, num_micro_batches)
        if input_ids is not None:
            pieces = torch.tensor_split(input_ids, num_micro_batches)
            for micro_batch, trace in routes.items():
                stages[0].controller.check_tokens_of(trace, pieces[micro_batch], micro_batch)
    except Exception as error:  # any failure here is shared, or a peer would hang
        failure = error
    agree_on_checks(failure, stages[0].group, stages[0].where)
    by_micro_batch: dict[MicroBatch, RoutingTrace] = {mb: t for mb, t in routes.items()}
    with stages[0].controller.replay(by_micro_batch):
        yield


def check_stage_routes(
    stage: ReplayPipelineStage, routes: Mapping[int, RoutingTrace], num_micro_batches: int
) -> None:
    """Raise if replaying `routes` would fail in `stage`: what `replay()` checks on entry
    (`ReplayController.check_routes`: each trace against the layout, its ids), then
    that the stage finds, for every micro-batch and routed layer it owns, routes with
    one row per token of its micro-batch. Errors name the stage and its pp_rank."""
    tokens = stage.micro_batch_shape[0] * stage.micro_batch_shape[1]
    try:
        stage.controller.check_routes(
            routes,
            micro_batches=range(num_micro_batches),
            layers=stage.routed_layers,
            rows=tokens,
        )
    except ReplayError as error:
        raise ReplayError(f"{stage.where}: {error}") from error


def gather_recording(
    recording: Recording, layout: MoELayout, group: dist.ProcessGroup | None = None
) -> dict[int, RoutingTrace]:
    """Every rank's recorded stage slices joined: micro-batch -> `[batch, seq, routed
    layers, top_k]` over all routed layers. A collective: call it on every rank."""
    mine = {mb: trace for mb, trace in recording.traces.items() if isinstance(mb, int)}
    size = dist.get_world_size(group)
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    micro_batches = sorted({mb for ranks in everyone for mb in ranks})
    return {
        mb: stack_stages([ranks[mb] for ranks in everyone if mb in ranks], layout)
        for mb in micro_batches
    }


def sequence_traces(traces: Mapping[int, RoutingTrace]) -> list[RoutingTrace]:
    """Micro-batch -> `[batch, seq, layers, top_k]` -> one `[seq, layers, top_k]` trace
    per sequence, in batch order (micro-batch 0's sequences first)."""
    return [
        trace.select_tokens(row)
        for _, trace in sorted(traces.items())
        for row in range(trace.token_shape[0])
    ]
