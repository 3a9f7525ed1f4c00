"""vLLM's server responses, every endpoint, to one `Rollout` per choice.

Where each field is (vLLM 0.32; `routed_experts` is always per choice):

/v1/completions          `object: "text_completion"`; `prompt_token_ids`, `token_ids`
                         and `routed_experts` per choice (a batched request's choices
                         carry their own prompt, `index = prompt * n + sample`)
/v1/chat/completions     `object: "chat.completion"`; `prompt_token_ids` at the
                         response level (the rendered chat prompt)
/inference/v1/generate   `output_mode` and `request_id`; the prompt is the request's
                         `token_ids` (the response's `prompt_token_ids` is null unless
                         asked for); streamed, one token per chunk and `routed_experts`
                         only in the chunk with `finish_reason`

Token ids need `return_token_ids: true` on completions and chat. A request is needed
where the response lacks what it asked for: the prompt of a generate call, and
`routed_experts_prompt_start`, which no response echoes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from routereplay.engines.payload import (
    choice_id,
    require_object,
    rollout,
    start_position,
    token_ids,
)
from routereplay.engines.payload import logprobs as payload_logprobs
from routereplay.engines.vllm.arrays import from_openai_choice
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

Endpoint = str  # "completions", "chat" or "generate"

_TOKEN_IDS = "send return_token_ids: true with the request (vLLM >= 0.10)"


def from_response(
    response: Mapping[str, Any],
    layout: MoELayout,
    *,
    request: Mapping[str, Any] | None = None,
    where: str = "vllm response",
) -> list[Rollout]:
    """One `Rollout` per choice of a vLLM server response, in choice order.

    The endpoint is told from the body. `request` is the request body as sent: it
    gives the prompt of a generate call and `routed_experts_prompt_start`.
    """
    require_object(response, where)
    if request is not None:
        require_object(request, f"{where}: request")
    endpoint = endpoint_of(response, where)
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        raise TraceError(f"{where}: a {endpoint} response has a list of choices, found none.")
    start = prompt_start(request, where)
    prompt = _response_prompt(response, endpoint, request, where)
    request_id = response.get("id", response.get("request_id"))
    rollouts: list[Rollout] = []
    for position, choice in enumerate(choices):
        require_object(choice, f"{where}, choice {position}")
        index = choice.get("index", position)
        here = f"{where}, choice {index}"
        if choice.get("finish_reason") is None and choice.get("routed_experts") is None:
            raise TraceError(
                f"{here} has no finish_reason: it is a streamed chunk, not a whole response. "
                "vLLM sends routed_experts only with the final chunk (the one with "
                "finish_reason) of an /inference/v1/generate stream: pass all the stream's "
                "lines to vllm.from_stream. Chat and completions streams carry no routes: "
                "request those without stream: true."
            )
        if prompt is None:  # completions: each choice carries its own prompt
            choice_prompt = token_ids(
                choice.get("prompt_token_ids"), "choice prompt_token_ids", here, _TOKEN_IDS
            )
        else:
            choice_prompt = prompt
        _check_split_prompt(response, rollouts, choice_prompt, here)
        rollouts.append(
            _rollout(
                choice,
                choice_prompt,
                endpoint,
                layout,
                start,
                response,
                choice_id(request_id, index),
                here,
            )
        )
    return rollouts


def from_stream(
    lines: Iterable[str] | str,
    layout: MoELayout,
    *,
    request: Mapping[str, Any],
    where: str = "vllm stream",
) -> list[Rollout]:
    """One `Rollout` per choice of a streamed `/inference/v1/generate` call.

    `lines` are the server-sent-event lines as received (`data: {...}`, `data: [DONE]`),
    or their text; `request` is the request body (it holds the prompt).
    """
    require_object(request, f"{where}: request")
    if isinstance(lines, str):
        lines = lines.splitlines()
    if not isinstance(lines, Iterable) or isinstance(lines, Mapping | bytes):
        raise TraceError(
            f"{where}: a stream is its list of server-sent-event lines (data: ...), found "
            f"{type(lines).__name__}."
        )
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    finals: dict[int, Mapping[str, Any]] = {}
    last: dict[str, Any] | None = None
    for number, line in enumerate(lines):
        chunk = _event(line, f"{where}, line {number}")
        if chunk is None:
            continue
        endpoint = endpoint_of(chunk, f"{where}, line {number}")
        if endpoint != "generate":
            raise TraceError(
                f"{where}, line {number}: a streamed {endpoint} response carries no routes "
                "(vLLM returns routed_experts only on /inference/v1/generate streams and on "
                "whole responses): request it without stream: true."
            )
        last = chunk
        streamed_choices = chunk.get("choices") or []
        if not isinstance(streamed_choices, list):
            raise TraceError(f"{where}, line {number}: choices is not a list.")
        for choice in streamed_choices:
            choice = require_object(choice, f"{where}, line {number}: a choice")
            index = choice.get("index", 0)
            if not isinstance(index, int):
                raise TraceError(f"{where}, line {number}: a choice index is {index!r}.")
            here = f"{where}, line {number}, choice {index}"
            tokens.setdefault(index, []).extend(
                token_ids(choice.get("token_ids") or [], "token_ids", here, _TOKEN_IDS).tolist()
            )
            streamed = _logprobs(choice.get("logprobs"), endpoint, None, here)
            logprobs.setdefault(index, []).extend([] if streamed is None else streamed.tolist())
            if choice.get("finish_reason") is not None:
                finals[index] = choice
    if last is None:
        raise TraceError(f"{where}: the stream holds no data lines.")
    unfinished = sorted(set(tokens) - set(finals))
    if unfinished:
        raise TraceError(
            f"{where}: choice {unfinished[0]}'s stream ends without its final chunk: vLLM "
            "sends routed_experts only with the chunk that carries finish_reason. Save "
            "the whole stream, up to data: [DONE]."
        )
    whole = {
        **{key: value for key, value in last.items() if key != "choices"},
        "choices": [
            {
                **finals[index],
                "token_ids": tokens[index],
                "logprobs": {"content": [{"logprob": v} for v in logprobs[index]]}
                if logprobs[index]
                else None,
            }
            for index in sorted(finals)
        ],
    }
    return from_response(whole, layout, request=request, where=where)


def endpoint_of(body: Mapping[str, Any], where: str) -> Endpoint:
    """Which endpoint sent `body`: "completions", "chat" or "generate"."""
    kind = body.get("object")
    if kind in ("text_completion",):
        return "completions"
    if kind in ("chat.completion", "chat.completion.chunk"):
        return "chat"
    if "output_mode" in body or ("request_id" in body and "choices" in body):
        return "generate"
    raise TraceError(
        f"{where} is not a vLLM server response: it has no object field "
        "('text_completion', 'chat.completion') and is not an /inference/v1/generate "
        f"response (output_mode, request_id); found keys {sorted(body)[:8]}."
    )


def prompt_start(request: Mapping[str, Any] | None, where: str) -> int:
    """The request's `routed_experts_prompt_start` (top level or in sampling_params)."""
    if request is None:
        return 0
    value = request.get("routed_experts_prompt_start")
    params = request.get("sampling_params")
    if value is None and isinstance(params, Mapping):
        value = params.get("routed_experts_prompt_start")
    return start_position(value, "the request's routed_experts_prompt_start", where)


# -- internals ------------------------------------------------------------------------


def _response_prompt(
    response: Mapping[str, Any],
    endpoint: Endpoint,
    request: Mapping[str, Any] | None,
    where: str,
) -> torch.Tensor | None:
    """The prompt shared by every choice, or None where each choice has its own."""
    if endpoint == "completions":
        return None
    given = response.get("prompt_token_ids")
    if endpoint == "chat" or given is not None:
        return token_ids(given, "prompt_token_ids", where, _TOKEN_IDS)
    if request is None or request.get("token_ids") is None:
        raise TraceError(
            f"{where}: this /inference/v1/generate response carries no prompt_token_ids, and "
            "the prompt is the request's token_ids: pass the request too (request=..., or "
            'save the line as {"request": ..., "response": ...}).'
        )
    return token_ids(request.get("token_ids"), "request token_ids", where, "send the prompt ids")


def _check_split_prompt(
    response: Mapping[str, Any], earlier: list[Rollout], prompt: torch.Tensor, where: str
) -> None:
    """vLLM 0.21.0 returns one `prompt_routed_experts` per response, its first prompt's:
    the choices of a batch's other prompts have no prompt routes."""
    if response.get("prompt_routed_experts") is None or not earlier:
        return
    first = earlier[0].prompt_ids
    if not torch.equal(first, prompt):
        raise TraceError(
            f"{where} belongs to another prompt than choice 0, but vLLM 0.21.0's "
            "response-level prompt_routed_experts hold the routes of the batch's first "
            "prompt only: this choice's prompt has no routes. Send one prompt per request "
            "to vLLM 0.21, or use vLLM >= 0.22, which returns each choice's whole array."
        )


def _rollout(
    choice: Mapping[str, Any],
    prompt: torch.Tensor,
    endpoint: Endpoint,
    layout: MoELayout,
    start: int,
    response: Mapping[str, Any],
    sequence_id: str | None,
    where: str,
) -> Rollout:
    completion = token_ids(choice.get("token_ids"), "token_ids", where, _TOKEN_IDS)
    routes = from_openai_choice(
        choice,
        layout,
        prompt_len=len(prompt),
        completion_len=len(completion),
        prompt_start=start,
        prompt_routed_experts=response.get("prompt_routed_experts"),
        sequence=where if sequence_id is None else f"{where} ({sequence_id})",
    )
    return rollout(
        where,
        prompt_ids=prompt,
        completion_ids=completion,
        routes=routes,
        logprobs=_logprobs(choice.get("logprobs"), endpoint, len(completion), where),
        finish_reason=choice.get("finish_reason"),
        sequence_id=sequence_id,
    )


def _logprobs(
    logprobs: Any, endpoint: Endpoint, completion_len: int | None, where: str
) -> torch.Tensor | None:
    """The sampled tokens' log-probs: completions `token_logprobs`, chat and generate
    `content[i].logprob`; None when the request did not ask for them. `completion_len`
    None: any count (one streamed chunk's)."""
    if not logprobs:
        return None
    if not isinstance(logprobs, Mapping):
        raise TraceError(f"{where}: logprobs is a {type(logprobs).__name__}, not an object.")
    if endpoint == "completions":
        return payload_logprobs(logprobs.get("token_logprobs"), completion_len, where)
    content = logprobs.get("content")
    if not isinstance(content, list) or not all(isinstance(e, Mapping) for e in content):
        raise TraceError(f"{where}: logprobs.content must be a list of {{logprob, ...}} objects.")
    return payload_logprobs([e.get("logprob") for e in content], completion_len, where)


def _event(line: Any, where: str) -> dict[str, Any] | None:
    """One server-sent-event line's JSON object; None for `[DONE]`, comments, blanks."""
    if not isinstance(line, str):
        raise TraceError(f"{where}: a stream line is text, found {type(line).__name__}.")
    text = line.strip()
    if not text or text.startswith(":"):
        return None
    if not text.startswith("data:"):
        raise TraceError(f"{where}: a server-sent-event line starts with 'data:', found {text!r}.")
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as error:
        raise TraceError(f"{where}: the event's data is not JSON ({error}).") from None
    require_object(chunk, where)
    return dict(chunk)
