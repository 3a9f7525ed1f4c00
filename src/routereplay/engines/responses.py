"""Saved engine responses (one JSON value per line) to `Rollout`s.

A line is the response as received, or `{"request": ..., "response": ...}` (other keys,
such as a case name, are kept for error messages): the request fills in what the
response lacks (a generate call's prompt, `routed_experts_prompt_start`,
`routed_experts_start_len`). The endpoint is told from the body:

vllm    a `/v1/completions`, `/v1/chat/completions` or `/inference/v1/generate`
        response; a streamed generate call as its list of `data: ...` lines; or one
        flat offline completion (`{"prompt_token_ids", "token_ids", "routed_experts"}`,
        as `CompletionOutput` saved with its prompt)
sglang  a `/generate` response (one object, or a list for a batch) or an OpenAI-style
        one (`choices`)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from routereplay.engines import sglang, vllm
from routereplay.engines.payload import require_object
from routereplay.engines.vllm.server import prompt_start
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

Engine = Literal["vllm", "sglang"]
ENGINES: tuple[Engine, ...] = ("vllm", "sglang")


def rollouts_from_saved(
    engine: Engine, saved: Any, layout: MoELayout, where: str = "saved response"
) -> list[Rollout]:
    """Every sample in one saved line; errors name `where` (and the line's case)."""
    request: Mapping[str, Any] | None = None
    response = saved
    if isinstance(saved, Mapping) and "response" in saved:
        response, request = saved["response"], saved.get("request")
        if request is not None:
            request = require_object(request, f"{where}: request")
        if isinstance(saved.get("case"), str):
            where = f"{where} (case {saved['case']!r})"
    if engine == "vllm":
        return _vllm(response, layout, request, where)
    if engine == "sglang":
        return sglang.from_response(response, layout, request=request, where=where)
    raise TraceError(f"Unknown engine {engine!r}; expected one of {', '.join(ENGINES)}.")


def _vllm(
    response: Any, layout: MoELayout, request: Mapping[str, Any] | None, where: str
) -> list[Rollout]:
    if isinstance(response, list | str):  # a streamed call's server-sent-event lines
        if not all(isinstance(line, str) for line in response):
            raise TraceError(
                f"{where}: a saved vLLM line is a response object, a {{request, response}} "
                "object, or a stream's list of 'data: ...' lines; found a list of "
                f"{sorted({type(x).__name__ for x in response})}."
            )
        if request is None:
            raise TraceError(
                f"{where}: a saved stream needs its request (it holds the prompt): save "
                'the line as {"request": ..., "response": [lines]}.'
            )
        return vllm.from_stream(response, layout, request=request, where=where)
    response = require_object(response, where)
    if "choices" in response or "object" in response:
        return vllm.from_response(response, layout, request=request, where=where)
    start = prompt_start(request, where)
    return [vllm.from_saved_completion(response, layout, prompt_start=start, where=where)]
