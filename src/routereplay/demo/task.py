"""The demo's task: sort a few digits. A completion is right or wrong, so the reward is
verifiable, and a tiny model gets some of it right after a short warm-up.

    prompt      BOS 7 2 9 SEP
    completion  2 7 9 EOS          reward 1.0 (anything else: 0.0)

Token ids: PAD 0, BOS 1, EOS 2, SEP 3, digits 0-9 are 4-13; the rest of the
vocabulary is never the right answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_DIGIT = 4
IGNORE = -100  # cross-entropy's ignore_index: prompt and padding positions


@dataclass(frozen=True)
class SortDigits:
    """Prompts of `min_digits..max_digits` random digits; the answer is them sorted."""

    min_digits: int = 4
    max_digits: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"Need 1 <= min_digits <= max_digits, found {self.min_digits}, {self.max_digits}."
            )

    @property
    def max_completion_len(self) -> int:
        """The longest right answer: every digit, then EOS."""
        return self.max_digits + 1

    def prompts(self, count: int, generator: torch.Generator) -> list[list[int]]:
        """`count` prompts `BOS digits... SEP` of random lengths."""
        lengths = torch.randint(self.min_digits, self.max_digits + 1, (count,), generator=generator)
        return [
            [
                BOS,
                *(FIRST_DIGIT + torch.randint(0, 10, (int(n),), generator=generator)).tolist(),
                SEP,
            ]
            for n in lengths
        ]

    def answer(self, prompt: Sequence[int]) -> list[int]:
        return [*sorted(prompt[1:-1]), EOS]

    def reward(self, prompt: Sequence[int], completion: Sequence[int]) -> float:
        return 1.0 if list(completion) == self.answer(prompt) else 0.0

    def supervised_batch(
        self, count: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts with their answers for cross-entropy warm-up, right-padded.

        Returns `input_ids [count, seq]`, `attention_mask [count, seq]` and
        `labels [count, seq]`: the input ids on answer tokens, `IGNORE` elsewhere
        (transformers shifts labels by one inside the loss).
        """
        rows = [(p, self.answer(p)) for p in self.prompts(count, generator)]
        width = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((count, width), PAD, dtype=torch.long)
        labels = torch.full((count, width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((count, width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            sequence = torch.tensor(prompt + answer)
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
            labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        return input_ids, attention_mask, labels
