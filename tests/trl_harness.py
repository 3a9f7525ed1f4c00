"""What the TRL tests share: a tiny MoE policy that stops early at random, a word-level
tokenizer built in-process, prompts of several lengths, TRL's own config with every
pass the issue names (two iterations, two steps per generation, gradient
checkpointing), and a trainer that logs, by mlp.experts forward hooks and nothing of
routereplay, which experts every pass sent each token to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from hf_models import COMMON, ExpertIds, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig

from routereplay.integrations.trl import GRPOTrainer

VOCAB = COMMON["vocab_size"]
PAD, BOS, EOS = COMMON["pad_token_id"], COMMON["bos_token_id"], COMMON["eos_token_id"]
# Ending at any of these tokens gives completions of many lengths: right padding.
STOP_TOKENS = [EOS, *range(10, 18)]


def tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word `t{i}`; prompts are left-padded, as TRL requires."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({f"t{i}": i for i in range(VOCAB) if i not in vocab.values()})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def policy(seed: int = 0) -> Any:
    """A tiny Qwen3-MoE (layers 1-3 route, 8 experts, top-2) whose generations stop early."""
    model = tiny_model("qwen3_moe", seed=seed, mlp_only_layers=[0])
    model.generation_config.eos_token_id = STOP_TOKENS
    model.generation_config.pad_token_id = PAD
    return model.train()


def prompts(count: int = 8) -> Dataset:
    """Prompts of 2 to 6 words: left padding of several widths."""
    texts = [
        " ".join(f"t{20 + (7 * i + 3 * j) % 70}" for j in range(2 + i % 5)) for i in range(count)
    ]
    return Dataset.from_dict({"prompt": texts})


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(completion.split())) for completion in completions]


def config(tmp_path: Any, **overrides: Any) -> GRPOConfig:
    """TRL's config for one generation batch used by 4 loss steps (2 iterations x 2
    steps per generation), gradient checkpointing on (TRL's default), on CPU. The
    learning rate is large so that routing moves between the passes."""
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 6,
        "num_iterations": 2,
        "steps_per_generation": 2,
        "max_steps": 4,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "gradient_checkpointing": True,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


@dataclass
class Pass:
    """One call of TRL's log-prob method: its batch and what mlp.experts received.

    experts: decoder layer -> `[rows * seq, top_k]` ids per forward (chunks in order);
    recomputed: the same, for the routers run again in backward (loss passes)."""

    grad: bool
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    experts: dict[int, list[torch.Tensor]]
    recomputed: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class Generation:
    """One sampling call: its prompts, completions and the experts of its forwards."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    experts: dict[int, list[torch.Tensor]]

    def by_sequence(self) -> dict[tuple[int, ...], dict[int, torch.Tensor]]:
        """Sequence tokens -> layer -> ids of each forwarded token of `model.generate()`:
        the prompt in the prefill (left-padded to the longest), completion token t at
        decode step t + 1; the final token was never forwarded, so it has no row."""
        batch, width = len(self.prompt_ids), max(len(p) for p in self.prompt_ids)
        found: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
        for layer, forwards in self.experts.items():
            prefill = forwards[0].reshape(batch, width, -1)
            pairs = zip(self.prompt_ids, self.completion_ids, strict=True)
            for row, (prompt, completion) in enumerate(pairs):
                rows = [prefill[row, width - len(prompt) :]]
                rows += [
                    forwards[t + 1].reshape(batch, -1)[row : row + 1]
                    for t in range(len(completion) - 1)
                ]
                found.setdefault((*prompt, *completion), {})[layer] = torch.cat(rows)
        return found


class ObservedTrainer(GRPOTrainer):
    """GRPOTrainer (routereplay's) logging every pass's experts by forward hooks on
    `mlp.experts`, and the experts of each `model.generate()` forward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.observer = ExpertIds(self.accelerator.unwrap_model(self.model))
        self.passes: list[Pass] = []
        self.generations: list[Generation] = []
        self.logged: list[dict[str, float]] = []

    def _generate_single_turn(self, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        self.observer.clear()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self.generations.append(Generation(prompt_ids, completion_ids, dict(self.observer.calls)))
        return completion_ids, logprobs

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        self.observer.clear()
        result = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, *args, **kwargs
        )
        if model is self.model or model is self.model_wrapped:
            grad = torch.is_grad_enabled()
            self.passes.append(
                Pass(grad, input_ids.cpu(), attention_mask.cpu(), dict(self.observer.calls))
            )
        self.observer.clear()
        return result

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        self.passes[-1].recomputed = dict(self.observer.calls)
        self.observer.clear()
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        self.logged.append(dict(logs))  # TRL adds its metrics to `logs` in log()


def sequences(batch: Pass) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Each row's real tokens (prompt, then completion, as the mask says) and the
    positions holding them."""
    rows = []
    for row in range(batch.input_ids.shape[0]):
        positions = batch.attention_mask[row].nonzero()[:, 0]
        rows.append((tuple(batch.input_ids[row, positions].tolist()), positions))
    return rows


def experts_by_sequence(
    batch: Pass, calls: dict[int, list[torch.Tensor]]
) -> dict[tuple[int, ...], dict[int, torch.Tensor]]:
    """Sequence tokens -> layer -> `[sequence tokens, top_k]` ids its real tokens were
    sent to in `calls` (the pass's forwards, chunked by rows in order)."""
    rows, seq = batch.input_ids.shape
    found: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
    for layer, forwards in calls.items():
        ids = torch.cat(forwards).reshape(rows, seq, -1)
        for row, (tokens, positions) in enumerate(sequences(batch)):
            found.setdefault(tokens, {})[layer] = ids[row, positions]
    return found
