"""An embedded rollout engine: batched sampling from a transformers MoE model with a KV
cache, recording the routes of every forwarded token as vLLM and SGLang report them.

It runs its own copy of the model in a chosen dtype (bf16 by default), so that, like a
real engine next to an fp32 trainer, it differs numerically from the trainer. Each
rollout's trace has one row per token of prompt + completion, routed layers only, and
a -1 final row: the last sampled token is never forwarded, so it has no route.

Log-probs are those of each sampled token under the temperature-scaled distribution
(`log_softmax(logits / temperature)`), before top-p truncation: what a trainer
computes for the same token at the same temperature.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routereplay.controller import ReplayController
from routereplay.errors import ReplayError
from routereplay.families.routers import attach, instance_patches
from routereplay.recording import Recording, generated_sequence
from routereplay.rollout import Rollout


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy; `stop_token_ids` end a sequence (the
    stop token is kept in the completion, as vLLM keeps EOS)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, found {self.max_new_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1], found {self.temperature}, "
                f"{self.top_p}."
            )


class RecordingEngine:
    """Samples from its own copy of `model` in `dtype` and records every route."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        patches = instance_patches(model)
        if patches:
            # A copy would keep the trainer controller's patched routers and hooks.
            raise ReplayError(
                f"The model already has routereplay (or other per-instance) patches "
                f"({', '.join(patches[:3])}): build the engine from the model before "
                "routereplay.attach(), or after controller.detach()."
            )
        self.model = _in_dtype(copy.deepcopy(model), dtype).eval()
        self.dtype = dtype
        self.controller: ReplayController = attach(self.model, source="hf-engine")
        config: Any = self.model.config
        self.pad_token_id = int(getattr(config, "pad_token_id", None) or 0)

    def load_weights(self, trainer_model: nn.Module) -> None:
        """Take the trainer's current weights (cast to this engine's dtype), as RL
        frameworks sync weights into vLLM or SGLang between steps."""
        with torch.no_grad():
            for target, source in zip(
                self.model.state_dict().values(),
                trainer_model.state_dict().values(),
                strict=True,
            ):
                target.copy_(source)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        params: SamplingParams,
        record_routes: bool = True,
    ) -> list[Rollout]:
        """Sample a completion for every prompt, batched, with routes recorded (unless
        `record_routes=False`: then the routers route natively and nothing is kept)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt, and no empty prompt.")
        batch = _LeftPadded(
            [torch.as_tensor(p, dtype=torch.long) for p in prompts], self.pad_token_id
        )
        generator = torch.Generator().manual_seed(params.seed)
        sampled: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        done = torch.zeros(batch.size, dtype=torch.bool)
        lengths = torch.zeros(batch.size, dtype=torch.long)
        context = self.controller.record() if record_routes else nullcontext()
        with context as recording:
            cache: Any = None
            inputs, mask, positions = batch.ids, batch.mask, batch.positions
            for step in range(params.max_new_tokens):
                # One micro-batch key per forward: prefill is 0, decode step t is t.
                with self.controller.micro_batch(step):
                    out = self.model(
                        inputs,
                        attention_mask=mask,
                        position_ids=positions,
                        cache=cache,
                        use_cache=True,
                    )
                cache = out.cache
                token, logprob = _sample(out.logits[:, -1].float(), params, generator)
                token = torch.where(done, self.pad_token_id, token)
                sampled.append(token)
                logprobs.append(logprob)
                lengths += (~done).long()
                done |= torch.isin(token, torch.tensor(params.stop_token_ids, dtype=torch.long))
                if bool(done.all()) or step + 1 == params.max_new_tokens:
                    break
                # Finished rows keep stepping with a masked pad token: recorded as -1.
                inputs = token[:, None]
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                positions = positions[:, -1:] + 1
        return _rollouts(batch, recording, sampled, logprobs, lengths, params)


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype`, except what its family keeps in float32 (DeepSeek-V3's router
    weight and `e_score_correction_bias`), as transformers loads it."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules", None) or ()
    )
    model = model.to(dtype)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if keep and tensor.is_floating_point() and any(k in name for k in keep):
                tensor.data = tensor.data.float()
    return model


class _LeftPadded:
    """Prompts left-padded into `ids [batch, prompt]`, `mask`, `positions`."""

    def __init__(self, prompts: list[torch.Tensor], pad_token_id: int) -> None:
        self.prompts = prompts
        self.size = len(prompts)
        self.width = max(len(p) for p in prompts)
        self.ids = torch.full((self.size, self.width), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros((self.size, self.width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.ids[row, self.width - len(prompt) :] = prompt
            self.mask[row, self.width - len(prompt) :] = 1
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)


def _sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens `[batch]` from `logits [batch, vocab]` and their log-probs `[batch]`."""
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logp.exp()
    if params.top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        outside = ordered.cumsum(-1) - ordered >= params.top_p
        probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


def _rollouts(
    batch: _LeftPadded,
    recording: Recording | None,
    sampled: list[torch.Tensor],
    logprobs: list[torch.Tensor],
    lengths: torch.Tensor,
    params: SamplingParams,
) -> list[Rollout]:
    """Assemble each sequence, cutting its rows out of the per-forward recordings."""
    tokens = torch.stack(sampled, dim=1)  # [batch, steps]
    token_logprobs = torch.stack(logprobs, dim=1)
    traces = recording.traces if recording is not None else {}
    rollouts = []
    for row, prompt in enumerate(batch.prompts):
        n = int(lengths[row])
        completion = tokens[row, :n]
        stopped = bool(torch.isin(completion[-1:], torch.tensor(params.stop_token_ids)).any())
        rollouts.append(
            Rollout(
                prompt_ids=prompt,
                completion_ids=completion,
                logprobs=token_logprobs[row, :n],
                routes=generated_sequence(traces, row, batch.width - len(prompt), n)
                if traces
                else None,
                finish_reason="stop" if stopped else "length",
            )
        )
    return rollouts
