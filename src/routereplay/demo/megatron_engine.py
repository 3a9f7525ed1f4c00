"""The megatron demo's rollout engine: a bf16 single-process copy of the trainer's
megatron-core `GPTModel` that samples and answers in vLLM's wire format.

It stands in for `vllm serve --enable-return-routed-experts`: every rank samples its
share of the prompts with full-sequence forwards (no KV cache), records the routes of
each token in the forward that first processed it (the prefill for prompt tokens, the
next decode step for sampled ones; the final token is never forwarded, so it has no
row), and encodes its rollouts as a `/v1/completions` response (every decoder layer,
dense ones as zeros, base64 `.npy`). The ranks exchange responses, and every rank reads
all of them through routereplay's vLLM decoder, as a trainer reads a real server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from routereplay.demo.megatron_model import (
    MegatronModel,
    build_chunks,
    causal_mask,
    named_weights,
    position_ids,
    transformer_config,
)
from routereplay.demo.task import PAD
from routereplay.engines import vllm
from routereplay.engines.hf import SamplingParams
from routereplay.engines.vllm.encode import completion_choice, completions_body
from routereplay.integrations import megatron as rr_megatron
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit
from routereplay.rollout import Rollout
from routereplay.trace import NO_ROUTE, RoutingTrace


class MegatronEngine:
    """Samples from a bf16 `GPTModel` holding every layer, whatever the trainer's split."""

    def __init__(self, model: MegatronModel) -> None:
        config = transformer_config(model, PipelineSplit(), dtype=torch.bfloat16)
        (self.model,) = build_chunks(model, config, 0, single_process=True)
        self.model.eval()
        self.layout = model.layout
        # The engine records its routes through the same adapter the trainer replays
        # with: routers keyed by global layer, one controller for this model only.
        self.controller = rr_megatron.attach(self.model, source="vllm", pp_rank=0)
        self._weights = named_weights([self.model])

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy the trainer's weights (global names, every layer) in, cast to bf16."""
        missing = sorted(set(self._weights) - set(weights))
        if missing:
            raise KeyError(f"The trainer sent no weights for {missing[:3]} ...")
        with torch.no_grad():
            for name, tensor in self._weights.items():
                tensor.copy_(weights[name])

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        """One rollout per prompt, in order, each carrying its routes and log-probs as
        the vLLM decoder read them from the response. Collective over the ranks: each
        samples every `world`-th prompt."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = list(range(rank, len(prompts), world))
        generator = torch.Generator().manual_seed(params.seed * 7919 + rank)
        response = self.respond([prompts[i] for i in mine], params, generator)
        responses: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(responses, response)
        else:
            responses = [response]
        rollouts: list[Rollout | None] = [None] * len(prompts)
        for peer, body in enumerate(responses):
            decoded = vllm.from_response(body, self.layout, where=f"engine rank {peer}")
            for index, rollout in zip(range(peer, len(prompts), world), decoded, strict=True):
                rollouts[index] = rollout
        return [r for r in rollouts if r is not None]

    def respond(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, generator: torch.Generator
    ) -> dict[str, Any]:
        """A `/v1/completions` body (vLLM 0.32) with one choice per prompt."""
        rollouts = self.sample(prompts, params, generator)
        choices = [
            completion_choice(
                r, self.layout, index=i, logprobs=True, tokens_as_ids=True, stop_reason=None
            )
            for i, r in enumerate(rollouts)
        ]
        completion_tokens = sum(r.completion_len for r in rollouts)
        prompt_tokens = sum(r.prompt_len for r in rollouts)
        return completions_body(choices, "megatron-demo", prompt_tokens, completion_tokens)

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Rollout]:
        """Sample with full-sequence forwards over the right-padded active rows."""
        count, layout = len(prompts), self.layout
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max()) + params.max_new_tokens
        tokens = torch.full((count, width), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        # [count, width, routed layers, top_k]: -1 until a forward routes the token.
        routes = torch.full(
            (count, width, len(self.layout.moe_layers), self.layout.top_k), NO_ROUTE
        )
        logprobs = torch.zeros(count, params.max_new_tokens)
        sampled = torch.zeros(count, dtype=torch.long)
        active = torch.ones(count, dtype=torch.bool)
        ends = lengths.clone()  # one past the last token of each row
        for step in range(params.max_new_tokens):
            rows = active.nonzero()[:, 0]
            seq = int(ends[rows].max())
            with self.controller.record() as recording:
                logits = self.model(
                    tokens[rows, :seq], position_ids(len(rows), seq), causal_mask(seq)
                )
            # [rows, seq, layers, k]: the routes of this forward, batch-first.
            forward_routes = rr_megatron.batch_first(recording.trace).expert_ids()
            last = ends[rows] - 1
            for i, row in enumerate(rows.tolist()):
                # A token's row comes from the first forward that processed it.
                first = 0 if step == 0 else int(last[i])
                routes[row, first : int(last[i]) + 1] = forward_routes[i, first : int(last[i]) + 1]
            next_logits = logits[torch.arange(len(rows)), last].float()
            token, logprob = _sample(next_logits, params, generator)
            tokens[rows, ends[rows]] = token
            logprobs[rows, step] = logprob
            sampled[rows] += 1
            ends[rows] += 1
            stopped = torch.isin(token, torch.tensor(params.stop_token_ids, dtype=torch.long))
            active[rows[stopped]] = False
            if not bool(active.any()):
                break
        return [
            _rollout(
                tokens[row], routes[row], logprobs[row], int(lengths[row]), int(n), params, layout
            )
            for row, n in enumerate(sampled.tolist())
        ]


def _sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens `[rows]` from `logits [rows, vocab]` and their log-probs under the
    temperature-scaled distribution, as vLLM returns them."""
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    token = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


def _rollout(
    tokens: torch.Tensor,
    routes: torch.Tensor,
    logprobs: torch.Tensor,
    prompt_len: int,
    sampled: int,
    params: SamplingParams,
    layout: MoELayout,
) -> Rollout:
    """`tokens [width]`, `routes [width, routed layers, top_k]`, `logprobs [max_new]`
    of one row -> its rollout (the final token's row stays -1)."""
    total = prompt_len + sampled
    completion = tokens[prompt_len:total]
    stopped = bool(sampled) and int(completion[-1]) in params.stop_token_ids
    return Rollout(
        prompt_ids=tokens[:prompt_len].clone(),
        completion_ids=completion.clone(),
        routes=RoutingTrace(
            routes[:total].clone(), layout.moe_layers, layout.num_experts, "engine"
        ),
        logprobs=logprobs[:sampled].clone(),
        finish_reason="stop" if stopped else "length",
    )
