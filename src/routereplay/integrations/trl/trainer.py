"""Router replay in TRL's GRPOTrainer: one option, `router_replay="off" | "R2" | "R3"`.

    from routereplay.integrations.trl import GRPOTrainer   # instead of trl's

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                          train_dataset=..., router_replay="R3")

`RouterReplayMixin` gives the option to any GRPOTrainer subclass
(`class MyTrainer(RouterReplayMixin, MyGRPOTrainer)`). Each override below only tells
`PassRouting` which pass TRL is in (see `passes` for what each pass does) and logs
the controller's counts among TRL's metrics:

    router_replay/{old_logps,loss}/disagreement   replayed rows the live router would
                                                  route elsewhere (the counterfactual)
    router_replay/{old_logps,loss}/replayed_rows  (token, layer) rows replayed
    router_replay/{old_logps,loss}/native_rows    rows routed natively (padding, the
                                                  final sampled token)
    router_replay/loss/recomputed_rows            rows routed again in backward

`old_logps` is R3's replay in the old-log-prob pass: the gap between the rollout
engine's routing and the trainer's at the rollout's weights.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import torch
import trl
from accelerate.utils import broadcast_object_list
from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

import routereplay
from routereplay.controller import LayerStats
from routereplay.errors import SetupError, TraceError
from routereplay.integrations.trl.client import RoutedVLLMClient
from routereplay.integrations.trl.passes import PassRouting, ReplayMode, check_mode
from routereplay.rollout import Rollout

logger = logging.getLogger(__name__)

METRIC = "router_replay"


class RouterReplayMixin:
    """Adds `router_replay` to a `trl.GRPOTrainer` subclass; put it first in the bases."""

    def __init__(self, *args: Any, router_replay: ReplayMode = "off", **kwargs: Any) -> None:
        mode = check_mode(router_replay)
        if mode == "R3":
            _check_r3_setup(kwargs.get("args", args[2] if len(args) > 2 else None), kwargs)
        super().__init__(*args, **kwargs)
        self.router_replay: ReplayMode = mode
        self._passes: PassRouting | None = None
        self._loss_step: ExitStack | None = None
        self._loss_replayed = False
        if mode == "off":
            return  # TRL exactly as it is: nothing attached
        trainer: Any = self
        policy = trainer.accelerator.unwrap_model(trainer.model)
        self._passes = PassRouting(mode, policy, routereplay.attach(policy, source="trl"))
        if mode == "R3" and trainer.use_vllm and trainer.accelerator.is_main_process:
            generation = trainer.vllm_generation
            generation.vllm_client = RoutedVLLMClient.adopt(generation.vllm_client)
        if mode == "R2" and not _runs_old_logps(trainer):
            logger.warning(
                "router_replay='R2' records in TRL's old-log-prob pass, which TRL skips "
                "here (gradient_accumulation_steps is a multiple of steps_per_generation * "
                "num_iterations, without vLLM): every loss pass of a generation batch runs "
                "before the same optimizer step, so routing cannot go stale and stays native."
            )

    # -- sampling ---------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        trainer: Any = self
        run = super()._generate_single_turn  # type: ignore[misc]
        passes = self._passes
        if passes is None or passes.mode != "R3" or not trainer.model.training:
            return run(prompt_ids, *args, **kwargs)
        if not trainer.use_vllm:
            return passes.record_generation(lambda: run(prompt_ids, *args, **kwargs), prompt_ids)
        completion_ids, logprobs = run(prompt_ids, *args, **kwargs)
        passes.keep_rollouts(_vllm_rollouts(trainer, passes, prompt_ids, completion_ids))
        return completion_ids, logprobs

    # -- the generation batch ---------------------------------------------------------

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        trainer: Any = self
        passes = self._passes
        if passes is None or not trainer.model.training:
            return super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        passes.start_generation()
        try:
            output: dict[str, Any] = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        finally:
            passes.generating = False
        if _runs_old_logps(trainer) and not passes.old_logps_seen:
            raise SetupError(
                "TRL computed old log-probs without calling _get_per_token_logps_and_entropies "
                f"on the policy (trl {trl.__version__}): routereplay cannot record or replay "
                "that pass. Use the trl version in routereplay's constraints."
            )
        output.update(passes.batch_fields(output))
        return output

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        trainer: Any = self
        run = super()._get_per_token_logps_and_entropies  # type: ignore[misc]

        def logps() -> Any:
            return run(
                model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs
            )

        passes = self._passes
        # TRL's old-log-prob pass is the generation's first call on the policy; the
        # reference pass (the reference model, or the policy with adapters off) follows.
        is_old_logps = (
            passes is not None
            and passes.generating
            and not passes.old_logps_seen
            and model is trainer.model
            and _runs_old_logps(trainer)
        )
        if not is_old_logps:
            return logps()
        assert passes is not None
        result, stats = passes.old_logps_pass(
            logps, input_ids, attention_mask, logits_to_keep, batch_size
        )
        if stats is not None:
            _log_stats(trainer, "old_logps", stats)
        return result

    # -- the loss passes --------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        trainer: Any = self
        self._loss_replayed = False
        with ExitStack() as step:
            self._loss_step = step
            try:
                loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
            finally:
                self._loss_step = None
        # The replay entered in _prepare_inputs closed with the stack, after backward.
        if self._loss_replayed and self._passes is not None:
            _log_stats(trainer, "loss", self._passes.controller.totals())
        return loss

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        trainer: Any = self
        inputs = super()._prepare_inputs(generation_batch)  # type: ignore[misc]
        passes, step = self._passes, self._loss_step
        if passes is not None and step is not None and trainer.model.training:
            # Entered here, closed by training_step after backward: recompute in
            # backward runs the routers again and must get the same ids.
            self._loss_replayed = step.enter_context(passes.loss_pass(inputs))
        return inputs


class GRPOTrainer(RouterReplayMixin, TRLGRPOTrainer):
    """`trl.GRPOTrainer` with `router_replay="off" | "R2" | "R3"`."""


def _runs_old_logps(trainer: Any) -> bool:
    """Whether TRL runs its no-grad old-log-prob pass (its own condition, trl 1.16)."""
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return bool(
        trainer.args.gradient_accumulation_steps % generate_every != 0
        or (trainer.use_vllm and trainer.vllm_importance_sampling_correction)
    )


def _check_r3_setup(args: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, before TRL builds anything, the setups whose rollouts carry no routes.
    `args`: the GRPOConfig (None: TRL's defaults, which sample with the model)."""
    found = None
    if getattr(args, "use_vllm", False) and args.vllm_mode != "server":
        found = (
            f"vllm_mode={args.vllm_mode!r}: TRL builds its colocated LLM(...) with a fixed "
            "argument list, without enable_return_routed_experts. Use vllm_mode='server' "
            "(vllm serve ... --enable-return-routed-experts) or use_vllm=False"
        )
    elif kwargs.get("rollout_func") is not None:
        found = "a rollout_func: its rollouts return no routes. Use 'R2', or TRL's own generation"
    elif kwargs.get("tools") or kwargs.get("environment_factory") is not None:
        found = (
            "tools: tool output is spliced into the completion after sampling, so the "
            "engine never routed it as it stands. Use 'R2'"
        )
    elif getattr(args, "use_transformers_continuous_batching", False):
        found = (
            "use_transformers_continuous_batching: generate_batch() runs many sequences "
            "per forward in an order routereplay cannot key. Use the default generate()"
        )
    if found is not None:
        raise SetupError(
            f"router_replay='R3' needs the rollout's routes, but the trainer has {found}."
        )


def _vllm_rollouts(
    trainer: Any,
    passes: PassRouting,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
) -> list[Rollout]:
    """This process's rollouts of the last vLLM generation, checked against the ids TRL
    kept. The main process posted for every process (all prompts, prompt-major), as
    TRL's VLLMGeneration does; the others receive their slice."""
    everyone: list[list[Rollout] | None] = [None]
    if trainer.accelerator.is_main_process:
        client = trainer.vllm_generation.vllm_client
        everyone = [client.take_rollouts(passes.controller.layout)]
    broadcast_object_list(everyone, from_process=0)
    assert everyone[0] is not None
    start = trainer.accelerator.process_index * len(prompt_ids)
    rollouts = everyone[0][start : start + len(prompt_ids)]
    if len(rollouts) != len(prompt_ids):
        raise TraceError(
            f"vLLM returned {len(everyone[0])} choices; this process needs rows {start}.."
            f"{start + len(prompt_ids) - 1}."
        )
    for row, rollout in enumerate(rollouts):
        if rollout.prompt_ids.tolist() != list(
            prompt_ids[row]
        ) or rollout.completion_ids.tolist() != list(completion_ids[row]):
            raise TraceError(
                f"Sequence {row}: vLLM's choice {rollout.sequence_id} holds other token ids "
                "than TRL kept for it: the response's choices are not in TRL's order."
            )
    return rollouts


def _log_stats(trainer: Any, phase: str, stats: LayerStats) -> None:
    """Counts summed over processes into TRL's metrics (averaged by TRL per log step)."""
    counts = torch.tensor(
        [stats.replayed, stats.native, stats.disagreed, stats.recomputed],
        dtype=torch.float64,
        device=trainer.accelerator.device,
    )
    replayed, native, disagreed, recomputed = (
        trainer.accelerator.gather(counts).view(-1, 4).sum(0).tolist()
    )
    metrics = trainer._metrics["train"]
    metrics[f"{METRIC}/{phase}/disagreement"].append(disagreed / replayed if replayed else 0.0)
    metrics[f"{METRIC}/{phase}/replayed_rows"].append(replayed)
    metrics[f"{METRIC}/{phase}/native_rows"].append(native)
    if phase == "loss":
        metrics[f"{METRIC}/{phase}/recomputed_rows"].append(recomputed)
