"""The demo's trainer on megatron-core: `trainer.Trainer` for `GPTModel` chunks split
over pipeline ranks (and virtual stages), run through megatron's own schedules with
full activation recompute, trained with Adam in fp32.

Every method is collective: each rank runs the same GRPO loop on the same batch, and
calls the same methods in the same order. A batch of `n` sequences runs as
`micro_batch_count(n)` equal micro-batches of contiguous rows; log-probs and losses
come from the last stage and are broadcast; routes and counters are gathered from
every rank, so the loop sees the whole model's.

Token order: the loop's traces are batch-first `[sequences, seq, layers, top_k]`;
megatron's routers see `[seq, micro-batch]`. `replay` converts each micro-batch's rows
with `sequence_first` and keeps this rank's layers; `record` and `expert_inputs` do the
inverse and stack the ranks' layers back together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from routereplay.align import stack_stages
from routereplay.controller import ReplayController
from routereplay.demo.megatron_engine import MegatronEngine
from routereplay.demo.megatron_model import causal_mask, named_weights, position_ids
from routereplay.demo.trainer import Objective, TrainerBatch, sampled_logprobs
from routereplay.integrations import megatron as rr_megatron
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit
from routereplay.stats import LayerStats
from routereplay.trace import NO_ROUTE, RoutingTrace

MicroBatch = dict[str, torch.Tensor]
MAX_MICRO_BATCHES = 4


def micro_batch_count(sequences: int, split: PipelineSplit) -> int:
    """Micro-batches for `sequences` rows: equal sizes, at most `MAX_MICRO_BATCHES`, a
    multiple of the pipeline size (the interleaved schedule needs it)."""
    counts = [
        c for c in range(split.pp_size, MAX_MICRO_BATCHES + 1, split.pp_size) if sequences % c == 0
    ]
    if not counts:
        raise ValueError(
            f"{sequences} sequences do not split into equal micro-batches a multiple of "
            f"pp_size={split.pp_size} in number: use an even prompts x group size."
        )
    return max(counts)


class MegatronTrainer:
    """This rank's chunks of the model, a controller over their routers, an optimizer."""

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        layout: MoELayout,
        split: PipelineSplit,
        pp_rank: int,
        learning_rate: float,
    ) -> None:
        self.chunks = list(chunks)
        self.layout, self.split, self.pp_rank = layout, split, pp_rank
        self.controller: ReplayController = rr_megatron.attach(
            self.chunks, source="trainer", pp_rank=pp_rank
        )
        self.layers = layout.rank_moe_layers(split, pp_rank)
        self.parameters = [p for chunk in self.chunks for p in chunk.parameters()]
        self.optimizer = torch.optim.Adam(self.parameters, lr=learning_rate)

    def set_learning_rate(self, learning_rate: float) -> None:
        """The optimizer's learning rate from the next step on (the warm-up's schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    def restore(self, weights: dict[str, torch.Tensor], learning_rate: float) -> None:
        """This rank's weights back to `weights` (global names), a fresh optimizer."""
        with torch.no_grad():
            for name, tensor in named_weights(self.chunks).items():
                tensor.copy_(weights[name])
        self.optimizer = torch.optim.Adam(self.parameters, lr=learning_rate)

    # -- what the loop asks ------------------------------------------------------------

    def load_into(self, engine: MegatronEngine) -> None:
        """Every rank's weights, by global name, into the engine copy (on every rank)."""
        mine = {name: t.detach().clone() for name, t in named_weights(self.chunks).items()}
        everyone: list[Any] = [None] * self.split.pp_size
        dist.all_gather_object(everyone, mine)
        engine.load_weights({name: t for weights in everyone for name, t in weights.items()})

    def replay_stats(self) -> dict[int, LayerStats]:
        """Every rank's per-layer counters of the last record/replay context."""
        everyone: list[Any] = [None] * self.split.pp_size
        dist.all_gather_object(everyone, self.controller.stats())
        return dict(sorted((k, v) for stats in everyone for k, v in stats.items()))

    def token_logprobs(self, batch: TrainerBatch, temperature: float) -> torch.Tensor:
        """`[sequences, seq - 1]` float32 (see `sampled_logprobs`), a forward-only pass."""
        results = self._run(batch, partial(_logprob_loss, temperature), forward_only=True)
        return torch.cat([r["logprobs"] for r in results])

    def train_step(
        self, batch: TrainerBatch, temperature: float, objective: Objective
    ) -> tuple[float, float]:
        """Forward and backward through the schedule, clip the global gradient norm to 1,
        step. `objective` gives each micro-batch's (loss sum, clipped count) over its
        masked tokens; both are normalised by the batch's masked tokens. Returns the
        loss and the clipped share."""
        tokens = float(batch.completion_mask.sum())
        count = micro_batch_count(batch.sequences, self.split)
        loss_func = partial(_objective_loss, temperature, objective, tokens, count)
        self.optimizer.zero_grad(set_to_none=True)
        results = self._run(batch, loss_func, forward_only=False)
        self._clip_grad_norm(1.0)
        self.optimizer.step()
        loss = sum(float(r["loss"]) for r in results)
        clipped = sum(float(r["clipped"]) for r in results)
        return loss / tokens, clipped / tokens

    @contextmanager
    def record(self) -> Iterator[GatheredRecording]:
        """Route the enclosed schedule natively and keep every rank's routes."""
        gathered = GatheredRecording()
        with self.controller.record() as recording:
            yield gathered
        gathered.trace = self._gather(
            [recording.traces[mb] for mb in sorted(recording.traces)]  # type: ignore[type-var]
        )

    @contextmanager
    def replay(self, routes: RoutingTrace) -> Iterator[None]:
        """Make the enclosed schedule's routers use `routes [sequences, seq, layers,
        top_k]` (every routed layer; each rank keeps its own), checked on every rank
        before the schedule starts."""
        count = micro_batch_count(routes.token_shape[0], self.split)
        size = routes.token_shape[0] // count
        mine = {
            mb: rr_megatron.sequence_first(
                routes.select_tokens(slice(mb * size, (mb + 1) * size))
            ).select_layers(self.layers)
            for mb in range(count)
        }
        # One collective before the schedule: a rank with bad routes fails every rank.
        rr_megatron.check_routes(self.controller, mine)
        with self.controller.replay(mine):
            yield

    @contextmanager
    def expert_inputs(self) -> Iterator[RouterOutputs]:
        """Log the expert ids this rank's routers hand the dispatcher meanwhile."""
        outputs = RouterOutputs(self)
        try:
            yield outputs
        finally:
            outputs.remove()

    # -- internals ---------------------------------------------------------------------

    def _run(
        self, batch: TrainerBatch, loss_func: Callable[..., Any], forward_only: bool
    ) -> list[dict[str, torch.Tensor]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        count = micro_batch_count(batch.sequences, self.split)
        size, seq = batch.sequences // count, int(batch.input_ids.shape[1])
        micro_batches = [
            _micro_batch(batch, slice(mb * size, (mb + 1) * size)) for mb in range(count)
        ]
        iterators = [iter(micro_batches) for _ in self.chunks]

        def forward_step(data: Iterator[MicroBatch], model: nn.Module) -> tuple[Any, Any]:
            micro_batch = next(data)
            output = model(micro_batch["tokens"], micro_batch["position_ids"], micro_batch["mask"])
            return output, partial(loss_func, micro_batch)

        for chunk in self.chunks:
            chunk.train(not forward_only)
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=count,
            seq_length=seq,
            micro_batch_size=size,
            forward_only=forward_only,
        )
        # Results exist on the last stage only; every rank runs the same loop.
        shared = [results if self.pp_rank == self.split.pp_size - 1 else None]
        dist.broadcast_object_list(shared, src=self.split.pp_size - 1)
        return shared[0]  # type: ignore[return-value]

    def _clip_grad_norm(self, max_norm: float) -> None:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        square = torch.zeros(()) if not grads else sum(g.pow(2).sum() for g in grads)
        total = torch.as_tensor(square, dtype=torch.float32).reshape(1)
        dist.all_reduce(total)  # the norm of the whole model's gradient
        scale = max_norm / (float(total.sqrt()) + 1e-6)
        if scale < 1:
            for g in grads:
                g.mul_(scale)

    def _gather(self, mine: list[RoutingTrace]) -> RoutingTrace:
        """This rank's micro-batch traces `[seq, micro-batch, rank layers, k]` -> the
        batch's `[sequences, seq, layers, top_k]` over every rank's layers."""
        everyone: list[Any] = [None] * self.split.pp_size
        dist.all_gather_object(everyone, mine)
        stacked = [
            rr_megatron.batch_first(stack_stages([ranks[mb] for ranks in everyone], self.layout))
            for mb in range(len(mine))
        ]
        return RoutingTrace(
            torch.cat([t.experts for t in stacked]),
            self.layout.moe_layers,
            self.layout.num_experts,
            "trainer",
        )


class GatheredRecording:
    """What `MegatronTrainer.record()` captured, every rank's layers: `.trace`
    `[sequences, seq, layers, top_k]`, set when the context ends."""

    trace: RoutingTrace


class RouterOutputs:
    """The expert ids megatron's routers handed the dispatcher (`routing_map`), logged by
    forward hooks: whoever chose them, router or replay."""

    def __init__(self, trainer: MegatronTrainer) -> None:
        self.trainer = trainer
        self.calls: dict[int, list[torch.Tensor]] = {}
        self._hooks = []
        for chunk in trainer.chunks:
            for layer, router in rr_megatron.find_routers(chunk).items():
                self.calls[layer] = []
                self._hooks.append(router.register_forward_hook(self._log(layer)))

    def _log(self, layer: int) -> Callable[..., None]:
        def log(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden, (_, routing_map) = args[0], output  # routing_map [tokens, experts] bool
            ids = routing_map.nonzero()[:, 1].view(routing_map.shape[0], -1)
            self.calls[layer].append(ids.view(*hidden.shape[:2], -1).transpose(0, 1).clone())

        return log

    def remove(self) -> None:
        """Stop logging."""
        for hook in self._hooks:
            hook.remove()

    def trace(self, padding: torch.Tensor) -> RoutingTrace:
        """`[sequences, seq, layers, top_k]` over the forwards so far (in order), every
        rank's layers, `padding [sequences, seq]` (bool) rows as -1. Collective."""
        mine = {layer: torch.cat(calls) for layer, calls in self.calls.items()}
        everyone: list[Any] = [None] * self.trainer.split.pp_size
        dist.all_gather_object(everyone, mine)
        per_layer = {k: v for ranks in everyone for k, v in ranks.items()}
        layers = self.trainer.layout.moe_layers
        experts = torch.stack([per_layer[layer] for layer in layers], dim=2)
        experts = experts.masked_fill(padding[..., None, None], NO_ROUTE)
        return RoutingTrace(experts, layers, self.trainer.layout.num_experts, "trainer")


def _micro_batch(batch: TrainerBatch, rows: slice) -> MicroBatch:
    tokens = batch.input_ids[rows]
    return {
        "tokens": tokens,
        "position_ids": position_ids(*tokens.shape),
        "mask": causal_mask(int(tokens.shape[1])),
        "completion_mask": batch.completion_mask[rows],
        "rollout_logprobs": batch.rollout_logprobs[rows],
        "advantages": batch.advantages[rows],
    }


def _logprob_loss(
    temperature: float, micro_batch: MicroBatch, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's loss_func for the log-prob pass: `logits [mbs, seq, vocab]` -> the
    sampled tokens' log-probs, and a zero loss."""
    logprobs = sampled_logprobs(logits, micro_batch["tokens"], temperature)
    return logits.sum() * 0.0, {"logprobs": logprobs.detach()}


def _objective_loss(
    temperature: float,
    objective: Objective,
    tokens: float,
    count: int,
    micro_batch: MicroBatch,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's loss_func for an update: the objective's sum over this micro-batch's
    tokens over the batch's `tokens`, times `count` (the schedule divides by it)."""
    logprobs = sampled_logprobs(logits, micro_batch["tokens"], temperature)
    loss_sum, clipped = objective(
        logprobs,
        micro_batch["rollout_logprobs"],
        micro_batch["advantages"],
        micro_batch["completion_mask"],
    )
    return loss_sum / tokens * count, {"loss": loss_sum.detach(), "clipped": clipped.detach()}
