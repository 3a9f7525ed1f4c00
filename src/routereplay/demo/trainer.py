"""The seam between the GRPO loop and a training framework: `Trainer`, what the loop
asks of one, and `TrainerBatch`, the rollouts it hands over.

Traces crossing the seam are batch-first, `[sequences, seq, layers, top_k]`; a
framework with another token order converts on its side. `hf_trainer.HFTrainer` is
transformers'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from routereplay.align import pad_traces
from routereplay.demo.task import PAD
from routereplay.engines.hf import SamplingParams
from routereplay.rollout import Rollout
from routereplay.stats import LayerStats
from routereplay.trace import RoutingTrace

Objective = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
"""`objective(logprobs, rollout_logprobs, advantages, mask)` (log-probs and mask
`[sequences, seq - 1]`, advantages `[sequences]`) -> (the loss summed over masked
tokens, the count of clipped ones): sums, so that a trainer splitting a batch into
micro-batches normalises over the whole batch."""


@dataclass(frozen=True)
class TrainerBatch:
    """Rollouts as the trainer sees them: prompt + completion, right-padded.

    input_ids, attention_mask `[sequences, seq]`; position t of the log-prob tensors
    scores token t + 1, so `completion_mask`, `rollout_logprobs [sequences, seq - 1]`
    are True / filled where token t + 1 is a sampled one. `routes [sequences, seq,
    layers, top_k]` holds the engine's routes, -1 on padding and each final token.
    `prompt_tokens [sequences, seq]` marks prompt positions; `advantages [sequences]`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    routes: RoutingTrace
    prompt_tokens: torch.Tensor
    advantages: torch.Tensor

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], advantages: torch.Tensor) -> TrainerBatch:
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
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rollout_logprobs=rollout_logprobs,
            routes=pad_traces([t for t in traces if t is not None], width, side="right"),
            prompt_tokens=prompt_tokens,
            advantages=advantages,
        )

    @property
    def sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padding(self) -> torch.Tensor:
        """bool `[sequences, seq]`: True past each sequence's end."""
        return self.attention_mask == 0

    def select(self, rows: torch.Tensor) -> TrainerBatch:
        """The sequences `rows` (int64 `[n]`), for one mini-batch."""
        return TrainerBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            completion_mask=self.completion_mask[rows],
            rollout_logprobs=self.rollout_logprobs[rows],
            routes=self.routes.select_tokens(rows),
            prompt_tokens=self.prompt_tokens[rows],
            advantages=self.advantages[rows],
        )


class ExpertInputs(Protocol):
    """The expert ids a trainer's expert modules received, whoever chose them: an
    independent check that replayed ids reached the experts."""

    def trace(self, padding: torch.Tensor) -> RoutingTrace:
        """`[sequences, seq, layers, top_k]` over the context's forwards (in order),
        with `padding [sequences, seq]` (bool) rows as -1."""
        ...


class RecordedRoutes(Protocol):
    """What a `Trainer.record()` context captured: read `.trace` after the forward."""

    @property
    def trace(self) -> RoutingTrace: ...


class RolloutEngine(Protocol):
    """What the loop asks of a rollout engine: sample, with routes and log-probs."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        """One rollout per prompt, in order, each with `routes` and `logprobs`."""
        ...


class Trainer(Protocol):
    """What the loop asks of a training framework: its fp32 model's forward, its
    routers' record and replay, an optimizer step, and a weight sync into the engine."""

    def replay_stats(self) -> dict[int, LayerStats]:
        """Per global layer (every routed layer of the model), what the last record or
        replay context did: the controllers' `stats()`."""
        ...

    def load_into(self, engine: Any) -> None:
        """Sync the current weights into the rollout engine, as RL frameworks do."""
        ...

    def token_logprobs(self, batch: TrainerBatch, temperature: float) -> torch.Tensor:
        """`[sequences, seq - 1]` float32, see `sampled_logprobs`."""
        ...

    def train_step(
        self, batch: TrainerBatch, temperature: float, objective: Objective
    ) -> tuple[float, float]:
        """Forward `batch`, minimise `objective` normalised by its masked tokens, clip
        the gradient norm to 1, step. Returns (loss, clipped share)."""
        ...

    def expert_inputs(self) -> AbstractContextManager[ExpertInputs]:
        """Log the ids the experts receive in the enclosed forwards."""
        ...

    def record(self) -> AbstractContextManager[RecordedRoutes]:
        """Route the enclosed forward natively and keep its routes."""
        ...

    def replay(self, routes: RoutingTrace) -> AbstractContextManager[None]:
        """Make the enclosed forward's routers use the ids of `routes`."""
        ...


def sampled_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`[sequences, seq - 1]` float32: log-prob of token t + 1 at position t, from
    `logits [sequences, seq, vocab]` under the temperature the engine sampled with (as
    the engine computes its log-probs)."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None])[..., 0]
