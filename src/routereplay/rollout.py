"""`Rollout`: one sampled sequence as an engine returned it, its routes beside its tokens.

Every engine decoder (vLLM, SGLang, the embedded transformers engine) and every trace
file read back gives this one value, so that a trainer can build its prompt/response
mask, match rollouts to samples, and check that the routes belong to the tokens it
trains on, from the rollout alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routereplay.errors import TraceError
from routereplay.trace import RoutingTrace


@dataclass(frozen=True)
class Rollout:
    """One sampled sequence.

    prompt_ids `[prompt_len]` and completion_ids `[completion_len]` (int64); routes
    `[prompt_len + completion_len, routed layers, top_k]`, row i the routes of token i
    (the final sampled token, which no engine forwards, is -1; None when routes were
    not recorded); logprobs `[completion_len]` float32, the engine's log-prob of each
    sampled token (None when the engine was not asked for them); sequence_id names the
    sample (a request id and choice index, or a uid the user gave).
    """

    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    routes: RoutingTrace | None
    logprobs: torch.Tensor | None = None
    finish_reason: str | None = None
    sequence_id: str | None = None

    def __post_init__(self) -> None:
        where = "Rollout" if self.sequence_id is None else f"Rollout {self.sequence_id!r}"
        for name in ("prompt_ids", "completion_ids"):
            ids = getattr(self, name)
            if (
                not isinstance(ids, torch.Tensor)
                or ids.ndim != 1
                or ids.is_floating_point()
                or ids.dtype == torch.bool
            ):
                found = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TraceError(f"{where}: {name} must be a 1-D integer tensor, found {found}.")
            object.__setattr__(self, name, ids.long())
        if len(self.prompt_ids) < 1:
            raise TraceError(f"{where}: the prompt is empty; an engine prompt has a token.")
        if self.sequence_id is not None and not isinstance(self.sequence_id, str):
            raise TraceError(f"{where}: sequence_id must be a string, found {self.sequence_id!r}.")
        if self.routes is not None and not isinstance(self.routes, RoutingTrace):
            raise TraceError(
                f"{where}: routes must be a RoutingTrace or None, found "
                f"{type(self.routes).__name__}."
            )
        total = len(self.prompt_ids) + len(self.completion_ids)
        if self.routes is not None:
            if self.routes.token_shape != (total,):
                raise TraceError(
                    f"{where}: routes cover tokens {list(self.routes.token_shape)}, the "
                    f"rollout {len(self.prompt_ids)} prompt + {len(self.completion_ids)} "
                    f"completion = {total} tokens: one row per token."
                )
            # The routes know their tokens, so replay can check them against the batch.
            ids = self.token_ids
            known = self.routes.tokens
            if known is not None and bool(((known >= 0) & (known.long() != ids)).any()):
                raise TraceError(
                    f"{where}: the routes were recorded for other token ids than the "
                    "rollout's prompt and completion."
                )
            if known is None or bool((known < 0).any()):  # the final token's, say
                object.__setattr__(self, "routes", self.routes.with_tokens(ids))
        if self.logprobs is not None:
            if not isinstance(self.logprobs, torch.Tensor):
                raise TraceError(
                    f"{where}: logprobs must be a float tensor [completion_len], found "
                    f"{type(self.logprobs).__name__}."
                )
            if tuple(self.logprobs.shape) != (len(self.completion_ids),):
                raise TraceError(
                    f"{where}: logprobs have shape {list(self.logprobs.shape)}, one per "
                    f"completion token is [{len(self.completion_ids)}]."
                )
            object.__setattr__(self, "logprobs", self.logprobs.float())

    @property
    def prompt_len(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_ids)

    @property
    def completion_len(self) -> int:
        """Sampled tokens."""
        return len(self.completion_ids)

    @property
    def token_ids(self) -> torch.Tensor:
        """`[prompt_len + completion_len]`: the rows of `routes`, in order."""
        return torch.cat([self.prompt_ids, self.completion_ids])

    def completion_mask(self) -> torch.Tensor:
        """`[prompt_len + completion_len]` bool: True on completion tokens."""
        mask = torch.zeros(self.prompt_len + self.completion_len, dtype=torch.bool)
        mask[self.prompt_len :] = True
        return mask
