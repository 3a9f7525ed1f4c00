"""`Rollout`s as vLLM 0.32's server sends them from `/v1/completions`: the inverse of
`server.from_response` for that endpoint, for stand-in servers (`routereplay serve`).

Per choice (`index = prompt * n + sample`): `prompt_token_ids`, `token_ids` (with
`return_token_ids`), `routed_experts` = base64 of `.npy` bytes of the rows
`prompt_start .. prompt_len + completion_len - 2`, every decoder layer (dense ones as
zeros), uint8 up to 256 experts, uint16 above; `logprobs` in the completions shape
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), tokens as `token_id:N`
strings with `return_tokens_as_token_ids`.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout
from routereplay.trace import NO_ROUTE

VERSION = "0.32.0"


def routed_experts_field(rollout: Rollout, layout: MoELayout, prompt_start: int = 0) -> str:
    """The choice's `routed_experts`: rows `[prompt_start, tokens - 1)` of every layer."""
    if rollout.routes is None:
        raise TraceError(f"Rollout {rollout.sequence_id!r} has no routes to send.")
    total = rollout.prompt_len + rollout.completion_len
    if not 0 <= prompt_start <= rollout.prompt_len:
        raise TraceError(
            f"routed_experts_prompt_start must be in [0, {rollout.prompt_len}] for a "
            f"{rollout.prompt_len}-token prompt, found {prompt_start}."
        )
    rows = rollout.routes.to_all_layers(layout)[prompt_start : total - 1]
    if bool((rows[..., list(layout.moe_layers), 0] == NO_ROUTE).any()):
        raise TraceError(
            f"Rollout {rollout.sequence_id!r} lacks routes for forwarded tokens: an engine "
            "sends every row but the final sampled token's."
        )
    dtype = np.uint8 if layout.num_experts <= 256 else np.uint16
    buffer = io.BytesIO()
    np.save(buffer, rows.numpy().astype(dtype))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_choice(
    rollout: Rollout,
    layout: MoELayout,
    *,
    index: int,
    text: str = "",
    stop_reason: int | None = None,
    prompt_start: int = 0,
    return_token_ids: bool = True,
    logprobs: bool = False,
    tokens_as_ids: bool = False,
    token_texts: Sequence[str] | None = None,
    routed_experts: bool = True,
) -> dict[str, Any]:
    """One element of a `/v1/completions` response's `choices`."""
    completion = rollout.completion_ids.tolist()
    return {
        "index": index,
        "text": text,
        "logprobs": _logprobs(rollout, completion, tokens_as_ids, token_texts)
        if logprobs
        else None,
        "finish_reason": rollout.finish_reason,
        "stop_reason": stop_reason,
        "token_ids": completion if return_token_ids else None,
        "prompt_logprobs": None,
        "prompt_token_ids": rollout.prompt_ids.tolist() if return_token_ids else None,
        "routed_experts": (
            routed_experts_field(rollout, layout, prompt_start) if routed_experts else None
        ),
    }


def completions_body(
    choices: Sequence[dict[str, Any]], model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The whole `/v1/completions` response around `choices`; vLLM counts each prompt of
    the request once in `prompt_tokens`, whatever `n`."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": list(choices),
        "service_tier": None,
        "system_fingerprint": f"vllm-{VERSION}-routereplay",
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def _logprobs(
    rollout: Rollout,
    completion: list[int],
    tokens_as_ids: bool,
    token_texts: Sequence[str] | None,
) -> dict[str, Any]:
    if rollout.logprobs is None:
        raise TraceError(f"Rollout {rollout.sequence_id!r} has no log-probs to send.")
    if tokens_as_ids or token_texts is None:
        tokens = [f"token_id:{token}" for token in completion]
    else:
        tokens = list(token_texts)
    values = rollout.logprobs.tolist()
    offsets = np.cumsum([0, *(len(t) for t in tokens[:-1])]).tolist() if tokens else []
    return {
        "text_offset": offsets,
        "token_logprobs": values,
        "tokens": tokens,
        "top_logprobs": [{token: value} for token, value in zip(tokens, values, strict=True)],
    }
