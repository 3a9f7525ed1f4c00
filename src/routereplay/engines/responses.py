"""Saved engine responses (one JSON object per line) to per-sequence traces.

What one line holds, per engine:

vllm    an OpenAI-compatible response with token ids
        (`{"prompt_token_ids": [...], "choices": [{"token_ids": [...],
        "routed_experts": "<base64 .npy>", ...}, ...]}`; `prompt_routed_experts` at the
        response level when the server splits prompt rows out), one sequence per choice;
        or one flat completion (`{"prompt_token_ids", "token_ids", "routed_experts", ...}`).
sglang  a `/generate` response with the request's prompt ids merged in
        (`{"input_ids": [...], "output_ids": [...], "meta_info": {"routed_experts": ...}}`,
        optionally `"routed_experts_start_len"`), or a JSON list of them (a batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from routereplay.engines import sglang, vllm
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.trace import RoutingTrace

Engine = Literal["vllm", "sglang"]
ENGINES: tuple[Engine, ...] = ("vllm", "sglang")


@dataclass(frozen=True)
class DecodedSequence:
    """One decoded sequence: `tokens [prompt + completion]` and their `routes`."""

    tokens: np.ndarray[Any, np.dtype[np.int64]]
    routes: RoutingTrace


def sequences_from_response(
    engine: Engine, response: Any, layout: MoELayout, line: int
) -> Iterator[DecodedSequence]:
    """Every sequence in one saved response; errors name the line (and choice)."""
    if engine == "vllm":
        yield from _vllm(response, layout, line)
    elif engine == "sglang":
        for index, item in enumerate(response if isinstance(response, list) else [response]):
            yield _sglang(
                item, layout, f"line {line}" + (f"[{index}]" if isinstance(response, list) else "")
            )
    else:
        raise TraceError(f"Unknown engine {engine!r}; expected one of {', '.join(ENGINES)}.")


def _vllm(response: Any, layout: MoELayout, line: int) -> Iterator[DecodedSequence]:
    _require_object(response, f"line {line}")
    prompt = _token_ids(response, "prompt_token_ids", f"line {line}")
    choices = response.get("choices")
    if choices is None:  # one flat completion
        choices, shared = [response], None
    else:
        shared = response.get("prompt_routed_experts")
    for index, choice in enumerate(choices):
        where = f"line {line}" if choice is response else f"line {line}, choice {index}"
        _require_object(choice, where)
        completion = _token_ids(choice, "token_ids", where)
        routes = vllm.from_openai_choice(
            choice,
            layout,
            prompt_len=len(prompt),
            completion_len=len(completion),
            prompt_routed_experts=shared,
            sequence=where,
        )
        yield DecodedSequence(np.concatenate([prompt, completion]), routes)


def _sglang(item: Any, layout: MoELayout, where: str) -> DecodedSequence:
    _require_object(item, where)
    prompt = _token_ids(item, "input_ids", where)
    completion = _token_ids(item, "output_ids", where)
    meta_info = item.get("meta_info")
    if not isinstance(meta_info, Mapping):
        raise TraceError(f"{where}: no meta_info object; save SGLang's /generate response whole.")
    routes = sglang.from_meta_info(
        meta_info,
        layout,
        prompt_len=len(prompt),
        completion_len=len(completion),
        start_len=int(item.get("routed_experts_start_len") or 0),
        sequence=where,
    )
    return DecodedSequence(np.concatenate([prompt, completion]), routes)


def _require_object(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise TraceError(f"{where}: expected a JSON object, found {type(value).__name__}.")


def _token_ids(obj: Mapping[str, Any], key: str, where: str) -> np.ndarray[Any, np.dtype[np.int64]]:
    ids = obj.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise TraceError(
            f"{where}: {key} must be a list of token ids, found {type(ids).__name__}. Save "
            "the token ids with each response (vLLM: return_token_ids; SGLang: merge the "
            "request's input_ids into the saved line)."
        )
    return np.asarray(ids, dtype=np.int64)
