"""What router replay does in each of the forward passes GRPOTrainer runs.

One generation batch of TRL's GRPO goes through:

    sampling        vLLM (server mode) or `model.generate()`     R3: routes kept / recorded
    old log-probs   one no-grad pass over the whole batch,       R2: recorded
                    in row chunks                                R3: replayed
    reference       the reference model (or adapters off)        never replayed
    loss            a forward + backward per training step,      R2, R3: replayed
                    on TRL's shuffled split of the batch,
                    num_iterations times; routers run again
                    in backward under gradient checkpointing

`PassRouting` holds the controller and what passes between them; the trainer mixin
only tells it which pass is running. Routes ride in the generation batch as tensors
(see `batch`), so they follow TRL's shuffle and split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from routereplay.controller import LayerStats, ReplayController
from routereplay.errors import SetupError
from routereplay.integrations.trl import batch as batch_routes
from routereplay.integrations.trl.forwards import generation_steps, row_chunks
from routereplay.integrations.trl.generation import generated_rollouts
from routereplay.rollout import Rollout
from routereplay.trace import RoutingTrace

ReplayMode = Literal["off", "R2", "R3"]
MODES: tuple[ReplayMode, ...] = ("off", "R2", "R3")

T = TypeVar("T")


def check_mode(mode: object) -> ReplayMode:
    """`mode` as a `ReplayMode`, or a `SetupError` naming the choices."""
    for known in MODES:
        if mode == known:
            return known
    raise SetupError(
        f"router_replay must be one of {', '.join(repr(m) for m in MODES)}; found {mode!r}. "
        "'R2' replays the trainer's own old-log-prob routing in the loss passes, 'R3' the "
        "rollout engine's routing in every training pass."
    )


class PassRouting:
    """Router replay across the passes of one GRPOTrainer (see the module doc)."""

    def __init__(self, mode: ReplayMode, policy: nn.Module, controller: ReplayController) -> None:
        self.mode: ReplayMode = mode
        self.policy = policy
        self.controller = controller
        # Rollouts of the batch being generated (R3), until they are laid out.
        self._rollouts: list[Rollout] | None = None
        self._batch_routes: RoutingTrace | None = None
        self.old_logps_seen = False
        # True while TRL builds a training generation batch (sampling, log-prob passes).
        self.generating = False

    # -- sampling (R3) ----------------------------------------------------------------

    def keep_rollouts(self, rollouts: list[Rollout]) -> None:
        """The rollouts of the batch being generated, in TRL's order (R3)."""
        self._rollouts = rollouts

    def record_generation(
        self,
        generate: Callable[[], tuple[list[list[int]], T]],
        prompt_ids: list[list[int]],
    ) -> tuple[list[list[int]], T]:
        """Run TRL's `model.generate()` path (`generate` returns its completion ids and
        log-probs) recording every forward's routes, and keep them as rollouts: R3
        replays exactly what the sampling forwards chose."""
        with generation_steps(self.policy, self.controller), self.controller.record() as steps:
            completion_ids, logprobs = generate()
        traces = {int(step): trace for step, trace in steps.traces.items()}  # type: ignore[call-overload]
        self.keep_rollouts(generated_rollouts(traces, prompt_ids, completion_ids))
        return completion_ids, logprobs

    # -- the old-log-prob pass ----------------------------------------------------------

    def start_generation(self) -> None:
        self.generating = True
        self._rollouts = None
        self._batch_routes = None
        self.old_logps_seen = False

    def old_logps_pass(
        self,
        run: Callable[[], T],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_width: int,
        chunk_rows: int | None,
    ) -> tuple[T, LayerStats | None]:
        """Run TRL's no-grad old-log-prob pass (`run`): R2 records it, R3 replays the
        rollouts laid out as its batch. Returns its result and, under R3, the stats
        of the replay (the rollout/trainer disagreement at the rollout's weights)."""
        self.old_logps_seen = True
        size = chunk_rows or input_ids.shape[0]
        with row_chunks(self.policy, self.controller, input_ids):
            if self.mode == "R2":
                with self.controller.record() as recording:
                    result = run()
                chunked = {int(row): trace for row, trace in recording.traces.items()}  # type: ignore[call-overload]
                self._batch_routes = batch_routes.join_chunks(chunked)
                return result, None
            routes = self.lay_out(input_ids, attention_mask, completion_width)
            with self.controller.replay(batch_routes.chunks(routes, size)):
                result = run()
            self._batch_routes = routes
            return result, self.controller.totals()

    def lay_out(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int
    ) -> RoutingTrace:
        """The kept rollouts laid out as TRL's batch (R3)."""
        if self._rollouts is None:
            raise SetupError(
                "router_replay='R3' found no rollout routes for this batch: TRL generated "
                "it by a path routereplay does not read (rollout_func, tools, continuous "
                "batching or vLLM colocate mode)."
            )
        return batch_routes.lay_out_rollouts(
            self._rollouts, input_ids, attention_mask, completion_width
        )

    def batch_fields(self, output: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The route tensors to add to TRL's generation batch `output`: R2's recording
        or R3's laid-out rollouts (laid out here when TRL ran no old-log-prob pass)."""
        routes = self._batch_routes
        if routes is None and self.mode == "R3":
            prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            routes = self.lay_out(input_ids, mask, completion_ids.shape[1])
        self._rollouts = None
        self._batch_routes = None
        return {} if routes is None else batch_routes.to_batch_fields(routes)

    # -- the loss passes --------------------------------------------------------------

    @contextmanager
    def loss_pass(self, inputs: Mapping[str, Any]) -> Iterator[bool]:
        """Replay the batch's routes over one training step's forward and backward
        (activation recompute included); yields whether anything is replayed."""
        layout = self.controller.layout
        routes = batch_routes.from_batch_fields(inputs, layout, self.controller.source)
        if routes is None:
            yield False
            return
        with self.controller.replay(routes):
            yield True
