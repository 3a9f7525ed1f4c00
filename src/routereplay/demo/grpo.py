"""A minimal GRPO loop with router replay: an example of use, not a framework.

Every step does three things, one function each:

    sample  the bf16 engine samples `group_size` completions per prompt and records
            their routes; the task rewards each completion.
    score   the fp32 trainer's log-prob pass: what it thinks of the sampled tokens
            before updating.
    update  one PPO-style clipped step per mini-batch, the importance ratio against
            the rollout's log-probs.

The scheme decides where the trainer's routers take their experts from (`ROUTING`):

    scheme  log-prob pass                   update passes
    none    native                          native
    R2      native, recorded                replay the log-prob pass's routes
    R3      replay the engine's routes      replay the engine's routes

The trainer is one framework's, behind `trainer.Trainer`. Everything the demo
reports is measured here, step by step (see `step_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from routereplay.demo.task import EOS, SortDigits
from routereplay.demo.trainer import RecordedRoutes, RolloutEngine, Trainer, TrainerBatch
from routereplay.engines.hf import SamplingParams
from routereplay.metrics import (
    LogProbMismatch,
    RoutingAgreement,
    logprob_mismatch,
    routing_agreement,
)
from routereplay.rollout import Rollout
from routereplay.stats import LayerStats
from routereplay.trace import RoutingTrace

Scheme = Literal["none", "R2", "R3"]
SCHEMES: tuple[Scheme, ...] = ("none", "R2", "R3")
StepCallback = Callable[[int], None]

LogProbRouting = Literal["native", "record", "replay engine"]
UpdateRouting = Literal["native", "replay recorded", "replay engine"]


@dataclass(frozen=True)
class Routing:
    """Which pass of a step records routes, and which passes replay whose."""

    logprob_pass: LogProbRouting
    update_passes: UpdateRouting


ROUTING: dict[Scheme, Routing] = {
    "none": Routing(logprob_pass="native", update_passes="native"),
    "R2": Routing(logprob_pass="record", update_passes="replay recorded"),
    "R3": Routing(logprob_pass="replay engine", update_passes="replay engine"),
}


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO step: `prompts_per_step * group_size` sampled sequences."""

    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    learning_rate: float = 1e-4
    clip_epsilon: float = 0.2
    mini_batches: int = 2


Audit = Callable[["GRPORun", "TrainerBatch", "Scored"], dict[str, Any] | None]
"""An extra measurement on a step's batch after its log-prob pass (before the update):
its numbers go into the step's report under "audits"; None: nothing this step."""


@dataclass(frozen=True)
class GRPORun:
    """One scheme's training: its trainer, the engine sampling for it, and what every
    scheme shares. Prompts and sampling seeds depend on (seed, step) only, so every
    scheme starts from the same rollouts."""

    scheme: Scheme
    trainer: Trainer
    engine: RolloutEngine
    task: SortDigits
    settings: GRPOSettings
    seed: int
    audits: Sequence[Audit] = ()


@dataclass(frozen=True)
class Samples:
    """A step's rollouts, `prompts_per_step` groups of `group_size`, and their rewards
    `[sequences]`."""

    rollouts: list[Rollout]
    rewards: torch.Tensor


@dataclass(frozen=True)
class Counterfactual:
    """Replayed rows where the trainer's own router would have chosen other experts, in
    the context that just ended: over all routed layers, and per global layer."""

    disagreement: float
    per_layer: dict[int, float]

    @classmethod
    def of(cls, stats: dict[int, LayerStats]) -> Counterfactual:
        per_layer = {layer: s.disagreement_rate for layer, s in stats.items()}
        return cls(total(stats).disagreement_rate, per_layer)


def total(stats: dict[int, LayerStats]) -> LayerStats:
    """Per-layer counters summed over layers."""
    return LayerStats(
        *(sum(getattr(s, name) for s in stats.values()) for name in LayerStats.__annotations__)
    )


@dataclass(frozen=True)
class Scored:
    """The log-prob pass: `logprobs [sequences, seq - 1]`; `experts`, the ids the
    trainer's experts received `[sequences, seq, layers, top_k]`; `recorded`, the
    routes it recorded (R2); `counterfactual` where it replayed (R3)."""

    logprobs: torch.Tensor
    experts: RoutingTrace
    recorded: RoutingTrace | None
    counterfactual: Counterfactual | None


@dataclass(frozen=True)
class NoiseFloor:
    """Two native fp32 trainer passes over the same tokens, compared."""

    routing: RoutingAgreement
    mismatch: LogProbMismatch


@dataclass(frozen=True)
class Updated:
    """The update: loss averaged over mini-batches, the share of clipped ratios in the
    first mini-batch, and the replay counters of each mini-batch (none if native)."""

    loss: float
    clipped_fraction: float
    replay_totals: list[LayerStats]


def train(run: GRPORun, steps: int, on_step: StepCallback | None = None) -> list[dict[str, Any]]:
    """`steps` GRPO steps; one report per step, `on_step(done)` after each."""
    reports = []
    for step in range(steps):
        reports.append(grpo_step(run, step))
        if on_step is not None:
            on_step(step + 1)
    return reports


def grpo_step(run: GRPORun, step: int) -> dict[str, Any]:
    """Sample, score, update. Returns the step's report."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + step)
    samples = sample(run, generator)
    advantages = group_advantages(samples.rewards, run.settings.group_size)
    batch = TrainerBatch.from_rollouts(samples.rollouts, advantages)
    scored = score(run, batch)
    floor = noise_floor(run.trainer, batch, run.settings)
    audits = [a for audit in run.audits if (a := audit(run, batch, scored)) is not None]
    updated = update(run, batch, update_routes(run.scheme, batch, scored), generator)
    report = step_report(
        step=step,
        samples=samples,
        batch=batch,
        scored=scored,
        floor=floor,
        updated=updated,
        seconds=time.perf_counter() - start,
    )
    if audits:
        report["audits"] = {k: v for audit in audits for k, v in audit.items()}
    return report


def sample(run: GRPORun, generator: torch.Generator) -> Samples:
    """`group_size` completions of each of `prompts_per_step` prompts, from the engine
    holding the trainer's current weights, and their rewards."""
    task, settings = run.task, run.settings
    prompts = [
        prompt
        for prompt in task.prompts(settings.prompts_per_step, generator)
        for _ in range(settings.group_size)
    ]
    run.trainer.load_into(run.engine)
    sampling = SamplingParams(
        max_new_tokens=task.max_completion_len,
        temperature=settings.temperature,
        stop_token_ids=(EOS,),
        seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)),
    )
    rollouts = run.engine.generate(prompts, sampling)
    rewards = [
        task.reward(p, r.completion_ids.tolist()) for p, r in zip(prompts, rollouts, strict=True)
    ]
    return Samples(rollouts, torch.tensor(rewards))


def score(run: GRPORun, batch: TrainerBatch) -> Scored:
    """The log-prob pass, routed as `ROUTING[run.scheme].logprob_pass` says."""
    trainer, routing = run.trainer, ROUTING[run.scheme].logprob_pass
    with (
        torch.no_grad(),
        trainer.expert_inputs() as received,
        routed(trainer, routing, batch.routes) as recording,
    ):
        logprobs = trainer.token_logprobs(batch, run.settings.temperature)
    # Read the counters now: they describe the last record/replay context only.
    stats = trainer.replay_stats() if routing == "replay engine" else None
    counterfactual = None if stats is None else Counterfactual.of(stats)
    return Scored(
        logprobs=logprobs,
        experts=received.trace(batch.padding),
        recorded=None if recording is None else recording.trace,
        counterfactual=counterfactual,
    )


@contextmanager
def routed(
    trainer: Trainer, routing: LogProbRouting, engine_routes: RoutingTrace
) -> Iterator[RecordedRoutes | None]:
    """Route the enclosed forward natively, natively and recorded (yields the
    recording), or replaying `engine_routes [sequences, seq, layers, top_k]`."""
    if routing == "record":
        with trainer.record() as recording:
            yield recording
    elif routing == "replay engine":
        with trainer.replay(engine_routes):
            yield None
    else:
        yield None


def update_routes(scheme: Scheme, batch: TrainerBatch, scored: Scored) -> RoutingTrace | None:
    """What the update passes replay, `[sequences, seq, layers, top_k]`; None: native."""
    routing = ROUTING[scheme].update_passes
    if routing == "replay engine":
        return batch.routes
    if routing == "replay recorded":
        return scored.recorded
    return None


def update(
    run: GRPORun, batch: TrainerBatch, routes: RoutingTrace | None, generator: torch.Generator
) -> Updated:
    """One clipped step per mini-batch, shuffled the same way in every scheme, each
    replaying its rows of `routes` if given."""
    trainer, settings = run.trainer, run.settings
    order = torch.randperm(batch.sequences, generator=generator)
    losses, clipped, replay_totals = [], [], []
    for rows in order.chunk(settings.mini_batches):
        part = batch.select(rows)
        replay = nullcontext() if routes is None else trainer.replay(routes.select_tokens(rows))
        objective = partial(clipped_objective, epsilon=settings.clip_epsilon)
        with replay:
            loss, clip_share = trainer.train_step(part, settings.temperature, objective)
        if routes is not None:
            replay_totals.append(total(trainer.replay_stats()))
        losses.append(loss)
        clipped.append(clip_share)
    return Updated(sum(losses) / len(losses), clipped[0], replay_totals)


def noise_floor(trainer: Trainer, batch: TrainerBatch, settings: GRPOSettings) -> NoiseFloor:
    """Two fp32 trainer passes over the same tokens, native routing: the whole batch at
    once, then one micro-batch per prompt group (other matrix shapes, so other
    rounding). What they disagree on is the trainer's own noise, which no replay
    between engine and trainer can remove."""
    groups = torch.split(torch.arange(batch.sequences), settings.group_size)
    with torch.no_grad(), trainer.expert_inputs() as whole:
        logprobs = trainer.token_logprobs(batch, settings.temperature)
    with torch.no_grad(), trainer.expert_inputs() as split:
        split_logprobs = torch.cat(
            [trainer.token_logprobs(batch.select(rows), settings.temperature) for rows in groups]
        )
    return NoiseFloor(
        routing=routing_agreement(whole.trace(batch.padding), split.trace(batch.padding)),
        mismatch=logprob_mismatch(split_logprobs, logprobs, batch.completion_mask),
    )


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
    *,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, negated and summed over `mask`ed tokens, and the count
    of those tokens whose ratio left `[1 - epsilon, 1 + epsilon]` (the trainer divides
    both by the mini-batch's masked tokens).

    logprobs, rollout_logprobs, mask `[sequences, seq - 1]`; advantages `[sequences]`.
    The ratio is against the rollout's log-probs: what the engine sampled from.
    """
    ratio = torch.exp(logprobs - rollout_logprobs)
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)
    clipped = ((ratio - 1).abs() > epsilon) & mask
    return -(surrogate * mask).sum(), clipped.sum()


def step_report(
    *,
    step: int,
    samples: Samples,
    batch: TrainerBatch,
    scored: Scored,
    floor: NoiseFloor,
    updated: Updated,
    seconds: float,
) -> dict[str, Any]:
    """One step's numbers as plain JSON data (None where a number does not apply)."""
    # Engine routes vs the ids the trainer's experts received in the log-prob pass,
    # over every (token, routed layer) row both route (prompt and completion).
    agreement = routing_agreement(batch.routes, scored.experts)
    completion = routing_agreement(batch.routes.without_tokens(batch.prompt_tokens), scored.experts)
    counterfactual: float | None = None
    counterfactual_per_layer: dict[str, float] | None = None
    if scored.counterfactual is not None:
        counterfactual = scored.counterfactual.disagreement
        counterfactual_per_layer = {str(k): v for k, v in scored.counterfactual.per_layer.items()}
    replayed = sum(s.replayed for s in updated.replay_totals)
    disagreed = sum(s.disagreed for s in updated.replay_totals)
    mismatch = logprob_mismatch(scored.logprobs, batch.rollout_logprobs, batch.completion_mask)
    return {
        "step": step,
        "reward": float(samples.rewards.mean()),
        "routing_disagreement": agreement.router_disagreement,
        "routing_pairs": agreement.pairs,
        "token_routing_disagreement": agreement.token_disagreement,
        "completion_routing_disagreement": completion.router_disagreement,
        "routing_per_layer": {str(k): v for k, v in agreement.per_layer.items()},
        # R3 only: what the trainer's router would have chosen instead of the replay.
        "counterfactual_disagreement": counterfactual,
        "counterfactual_per_layer": counterfactual_per_layer,
        # R2 and R3: the same, in the update passes (after the first optimizer step).
        "update_counterfactual_disagreement": disagreed / replayed if replayed else None,
        "mismatch": _finite(mismatch.to_dict()),
        "floor_routing_disagreement": floor.routing.router_disagreement,
        "floor_mismatch": _finite(floor.mismatch.to_dict()),
        "loss": updated.loss,
        "clipped_fraction": updated.clipped_fraction,
        "seconds": seconds,
    }


def _finite(numbers: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf or nan: those become None."""
    return {
        k: None if isinstance(v, float) and not torch.isfinite(torch.tensor(v)) else v
        for k, v in numbers.items()
    }
