"""A minimal GRPO loop with router replay: an example of use, not a framework.

Every step: the bf16 engine samples `group_size` completions per prompt and records
their routes; the fp32 trainer scores them (the log-prob pass), then takes a
PPO-style clipped step per mini-batch with the importance ratio against the
rollout's log-probs. The scheme decides which experts the trainer's routers use:

    none   native routing everywhere.
    R2     record routes in the log-prob pass, replay them in the update passes.
    R3     replay the engine's routes in the log-prob pass and the update passes.

Everything the demo reports is measured here, step by step (see `step_report`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from routereplay.align import pad_traces
from routereplay.controller import LayerStats, ReplayController
from routereplay.demo.task import EOS, PAD, SortDigits
from routereplay.engines.hf import RecordingEngine, SamplingParams
from routereplay.integrations.hf import attach
from routereplay.metrics import (
    LogProbMismatch,
    RoutingAgreement,
    logprob_mismatch,
    routing_agreement,
)
from routereplay.rollout import Rollout
from routereplay.trace import NO_ROUTE, RoutingTrace

Scheme = Literal["none", "R2", "R3"]
SCHEMES: tuple[Scheme, ...] = ("none", "R2", "R3")
StepCallback = Callable[[int], None]


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO step: `prompts_per_step * group_size` sampled sequences."""

    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    learning_rate: float = 1e-4
    clip_epsilon: float = 0.2
    mini_batches: int = 2


@dataclass(frozen=True)
class TrainerBatch:
    """Rollouts as the trainer sees them: prompt + completion, right-padded.

    input_ids, attention_mask `[sequences, seq]`; position t of the log-prob tensors
    scores token t + 1, so `completion_mask`, `rollout_logprobs [sequences, seq - 1]`
    are True / filled where token t + 1 is a sampled one. `routes [sequences, seq,
    layers, top_k]` holds the engine's routes, -1 on padding and each final token.
    `prompt_tokens [sequences, seq]` marks prompt positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    routes: RoutingTrace
    prompt_tokens: torch.Tensor

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout]) -> TrainerBatch:
        width = max(len(r.token_ids) for r in rollouts)
        shape = (len(rollouts), width)
        input_ids = torch.full(shape, PAD, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        prompt_tokens = torch.zeros(shape, dtype=torch.bool)
        completion_mask = torch.zeros((shape[0], width - 1), dtype=torch.bool)
        rollout_logprobs = torch.zeros((shape[0], width - 1))
        for row, rollout in enumerate(rollouts):
            prompt, total = len(rollout.prompt_ids), len(rollout.token_ids)
            input_ids[row, :total] = rollout.token_ids
            attention_mask[row, :total] = 1
            prompt_tokens[row, :prompt] = True
            completion_mask[row, prompt - 1 : total - 1] = True
            if rollout.logprobs is None:
                raise ValueError("The demo's importance ratios need the engine's log-probs.")
            rollout_logprobs[row, prompt - 1 : total - 1] = rollout.logprobs
        traces = [r.routes for r in rollouts]
        if any(t is None for t in traces):
            raise ValueError("R3 needs routes: generate the rollouts with record_routes=True.")
        routes = pad_traces([t for t in traces if t is not None], width, side="right")
        return cls(
            input_ids, attention_mask, completion_mask, rollout_logprobs, routes, prompt_tokens
        )

    def select(self, rows: torch.Tensor) -> TrainerBatch:
        """The sequences `rows` (int64 `[n]`), for one mini-batch."""
        return TrainerBatch(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.completion_mask[rows],
            self.rollout_logprobs[rows],
            rows_of(self.routes, rows),
            self.prompt_tokens[rows],
        )


def rows_of(trace: RoutingTrace, rows: torch.Tensor) -> RoutingTrace:
    """Sequences `rows` of a `[sequences, seq, layers, top_k]` trace."""
    return trace.select_tokens(rows)


def without_rows(trace: RoutingTrace, rows: torch.Tensor) -> RoutingTrace:
    """`trace` with the token positions `rows` (bool `[sequences, seq]`) set to -1, so
    that comparisons skip them."""
    return trace.without_tokens(rows)


class ExpertInputs:
    """The expert ids each routed layer's `mlp.experts` received, whoever chose them:
    an independent check that replayed ids reached the experts."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], num_experts: int) -> None:
        self.layers, self.num_experts = layers, num_experts
        self.calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        decoder: Any = model.model.layers  # type: ignore[union-attr]
        self._hooks = [
            decoder[layer].mlp.experts.register_forward_pre_hook(self._log(layer), with_kwargs=True)
            for layer in layers
        ]

    def _log(self, layer: int) -> Callable[..., None]:
        def log(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.calls[layer].append(ids.detach().clone())

        return log

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def trace(self, padding: torch.Tensor) -> RoutingTrace:
        """`[sequences, seq, layers, top_k]` over the forwards so far (in order), with
        `padding [sequences, seq]` (bool) rows as -1."""
        per_layer = [torch.cat(self.calls[layer]) for layer in self.layers]  # [tokens, k]
        experts = torch.stack(per_layer, dim=1).reshape(*padding.shape, len(self.layers), -1)
        experts = experts.masked_fill(padding[..., None, None], NO_ROUTE)
        return RoutingTrace(experts, self.layers, self.num_experts, "trainer")


@contextmanager
def expert_inputs(model: nn.Module, controller: ReplayController) -> Iterator[ExpertInputs]:
    layout = controller.layout
    inputs = ExpertInputs(model, layout.moe_layers, layout.num_experts)
    try:
        yield inputs
    finally:
        inputs.remove()


def token_logprobs(model: nn.Module, batch: TrainerBatch, temperature: float) -> torch.Tensor:
    """`[sequences, seq - 1]` float32: log-prob of token t + 1 at position t, under the
    temperature the engine sampled with (as the engine computes its log-probs)."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, over the group's std. `[sequences]`."""
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + 1e-6)).reshape(-1)


def clipped_objective(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, negated and averaged over `mask`ed tokens, and the share
    of those tokens whose ratio left `[1 - epsilon, 1 + epsilon]`.

    logprobs, rollout_logprobs, mask `[sequences, seq - 1]`; advantages `[sequences]`.
    The ratio is against the rollout's log-probs: what the engine sampled from.
    """
    ratio = torch.exp(logprobs - rollout_logprobs)
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)
    loss = -(surrogate * mask).sum() / mask.sum()
    clipped = ((ratio - 1).abs() > epsilon) & mask
    return loss, clipped.sum() / mask.sum()


def run_scheme(
    scheme: Scheme,
    pretrained: nn.Module,
    task: SortDigits,
    settings: GRPOSettings,
    steps: int,
    seed: int,
    on_step: StepCallback | None = None,
) -> list[dict[str, Any]]:
    """GRPO from `pretrained` (left untouched) for `steps` steps in `scheme`; one report
    per step. Prompts and sampling seeds depend on (seed, step) only, so every scheme
    starts from the same rollouts."""
    trainer = copy.deepcopy(pretrained)
    # The engine copies the model: build it before attach() patches the trainer's
    # routers and hooks, so that no copy of them points at the trainer's controller.
    engine = RecordingEngine(trainer, dtype=torch.bfloat16)
    controller = attach(trainer, source="trainer")
    optimizer = torch.optim.Adam(trainer.parameters(), lr=settings.learning_rate)
    reports = []
    try:
        for step in range(steps):
            reports.append(
                grpo_step(
                    scheme, trainer, controller, engine, optimizer, task, settings, seed, step
                )
            )
            if on_step is not None:
                on_step(step + 1)
    finally:
        controller.detach()
    return reports


def grpo_step(
    scheme: Scheme,
    trainer: nn.Module,
    controller: ReplayController,
    engine: RecordingEngine,
    optimizer: torch.optim.Optimizer,
    task: SortDigits,
    settings: GRPOSettings,
    seed: int,
    step: int,
) -> dict[str, Any]:
    """Sample, score, measure, update. Returns the step's report."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    group = settings.group_size
    prompts = [p for p in task.prompts(settings.prompts_per_step, generator) for _ in range(group)]
    engine.load_weights(trainer)
    sampling = SamplingParams(
        max_new_tokens=task.max_completion_len,
        temperature=settings.temperature,
        stop_token_ids=(EOS,),
        seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)),
    )
    rollouts = engine.generate(prompts, sampling)
    rewards = torch.tensor(
        [task.reward(p, r.completion_ids.tolist()) for p, r in zip(prompts, rollouts, strict=True)]
    )
    advantages = group_advantages(rewards, group)
    batch = TrainerBatch.from_rollouts(rollouts)
    padding = batch.attention_mask == 0

    # The log-prob pass: what the trainer thinks of the sampled tokens before updating.
    routing: AbstractContextManager[Any] = nullcontext()
    if scheme == "R2":
        routing = controller.record()
    elif scheme == "R3":
        routing = controller.replay(batch.routes)
    with torch.no_grad(), expert_inputs(trainer, controller) as used, routing as recording:
        logprobs = token_logprobs(trainer, batch, settings.temperature)
    counterfactual = _counterfactual(controller) if scheme == "R3" else None
    trainer_routes = used.trace(padding)
    floor = noise_floor(trainer, controller, batch, settings)
    routes_to_replay: RoutingTrace | None = None
    if scheme == "R2":
        routes_to_replay = recording.trace
    elif scheme == "R3":
        routes_to_replay = batch.routes

    # The update: one clipped step per mini-batch, shuffled the same way in every scheme.
    order = torch.randperm(len(rollouts), generator=generator)
    update_stats: list[LayerStats] = []
    losses, clipped = [], []
    for rows in order.chunk(settings.mini_batches):
        part = batch.select(rows)
        replay: AbstractContextManager[None] = nullcontext()
        if routes_to_replay is not None:
            replay = controller.replay(rows_of(routes_to_replay, rows))
        with replay:
            new_logprobs = token_logprobs(trainer, part, settings.temperature)
        if routes_to_replay is not None:
            update_stats.append(controller.totals())
        loss, clip_share = clipped_objective(
            new_logprobs,
            part.rollout_logprobs,
            advantages[rows],
            part.completion_mask,
            settings.clip_epsilon,
        )
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        clipped.append(float(clip_share))

    return step_report(
        step=step,
        rewards=rewards,
        agreement=routing_agreement(batch.routes, trainer_routes),
        completion_agreement=routing_agreement(
            without_rows(batch.routes, batch.prompt_tokens), trainer_routes
        ),
        mismatch=logprob_mismatch(logprobs, batch.rollout_logprobs, batch.completion_mask),
        counterfactual=counterfactual,
        update_stats=update_stats,
        floor=floor,
        loss=sum(losses) / len(losses),
        clipped_fraction=clipped[0],
        seconds=time.perf_counter() - start,
    )


def noise_floor(
    model: nn.Module, controller: ReplayController, batch: TrainerBatch, settings: GRPOSettings
) -> tuple[RoutingAgreement, LogProbMismatch]:
    """Two fp32 trainer passes over the same tokens, native routing: the whole batch at
    once, then one micro-batch per prompt group (other matrix shapes, so other
    rounding). What they disagree on is the trainer's own noise, which no replay
    between engine and trainer can remove."""
    padding = batch.attention_mask == 0
    groups = torch.split(torch.arange(batch.input_ids.shape[0]), settings.group_size)
    with torch.no_grad(), expert_inputs(model, controller) as whole:
        logprobs = token_logprobs(model, batch, settings.temperature)
    with torch.no_grad(), expert_inputs(model, controller) as split:
        split_logprobs = torch.cat(
            [token_logprobs(model, batch.select(rows), settings.temperature) for rows in groups]
        )
    return (
        routing_agreement(whole.trace(padding), split.trace(padding)),
        logprob_mismatch(split_logprobs, logprobs, batch.completion_mask),
    )


def _counterfactual(controller: ReplayController) -> tuple[float, dict[str, float]]:
    """Replayed rows where the trainer's router would have chosen other experts: over
    all layers, and per layer, in the context that just ended."""
    stats = controller.stats()
    return controller.totals().disagreement_rate, {
        str(layer): s.disagreement_rate for layer, s in stats.items()
    }


def step_report(
    *,
    step: int,
    rewards: torch.Tensor,
    agreement: RoutingAgreement,
    completion_agreement: RoutingAgreement,
    mismatch: LogProbMismatch,
    counterfactual: tuple[float, dict[str, float]] | None,
    update_stats: list[LayerStats],
    floor: tuple[RoutingAgreement, LogProbMismatch],
    loss: float,
    clipped_fraction: float,
    seconds: float,
) -> dict[str, Any]:
    """One step's numbers as plain JSON data (None where a number does not apply)."""
    replayed = sum(s.replayed for s in update_stats)
    disagreed = sum(s.disagreed for s in update_stats)
    floor_routing, floor_mismatch = floor
    return {
        "step": step,
        "reward": float(rewards.mean()),
        # Engine routes vs the ids the trainer's experts received in the log-prob pass,
        # over every (token, routed layer) row both route (prompt and completion).
        "routing_disagreement": agreement.router_disagreement,
        "routing_pairs": agreement.pairs,
        "token_routing_disagreement": agreement.token_disagreement,
        "completion_routing_disagreement": completion_agreement.router_disagreement,
        "routing_per_layer": {str(k): v for k, v in agreement.per_layer.items()},
        # R3 only: what the trainer's router would have chosen instead of the replay.
        "counterfactual_disagreement": None if counterfactual is None else counterfactual[0],
        "counterfactual_per_layer": None if counterfactual is None else counterfactual[1],
        # R2 and R3: the same, in the update passes (after the first optimizer step).
        "update_counterfactual_disagreement": disagreed / replayed if replayed else None,
        "mismatch": _finite(mismatch.to_dict()),
        "floor_routing_disagreement": floor_routing.router_disagreement,
        "floor_mismatch": _finite(floor_mismatch.to_dict()),
        "loss": loss,
        "clipped_fraction": clipped_fraction,
        "seconds": seconds,
    }


def _finite(numbers: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf or nan: those become None."""
    return {
        k: None if isinstance(v, float) and not torch.isfinite(torch.tensor(v)) else v
        for k, v in numbers.items()
    }
