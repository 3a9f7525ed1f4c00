"""SGLang's server responses to one `Rollout` per sample.

Where each field is (SGLang 0.5.19 to 0.5.23; request `return_routed_experts: true`,
optional `routed_experts_start_len`):

/generate               one object, or a JSON list for a batch (prompt-major with
                        n > 1: prompt 0's samples, then prompt 1's); per object
                        `output_ids` and `meta_info.routed_experts`; the prompt ids are
                        the object's `prompt_token_ids` with `return_prompt_token_ids:
                        true`, else the request's `input_ids`
/v1/completions         `sglext.routed_experts` at the response level, taken from the
                        first sample only; per choice `prompt_token_ids` and `token_ids`
                        with `return_token_ids: true`
/v1/chat/completions    the same `sglext`; with `return_meta_info: true` each choice's
                        `meta_info.routed_experts` instead; per choice
                        `prompt_token_ids` and `response_token_ids` with
                        `return_token_ids: true` (or `sglext.input_ids` / `output_ids`)
"""

from __future__ import annotations

from collections.abc import Mapping
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
from routereplay.engines.sglang.arrays import from_meta_info
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

_PROMPT_IDS = (
    "send return_prompt_token_ids: true (or the prompt as input_ids, and save the request "
    'with the response: {"request": ..., "response": ...})'
)
_OPENAI_IDS = "send return_token_ids: true with the request"


def from_generate(
    response: Mapping[str, Any] | list[Any],
    layout: MoELayout,
    *,
    request: Mapping[str, Any] | None = None,
    where: str = "sglang response",
) -> list[Rollout]:
    """One `Rollout` per object of a `/generate` response (one object, or a batch)."""
    if request is not None:
        require_object(request, f"{where}: request")
    items = response if isinstance(response, list) else [response]
    prompts = _request_prompts(request, len(items), where)
    samples = len(items) // len(prompts) if prompts else 1
    rollouts = []
    for index, item in enumerate(items):
        here = f"{where}[{index}]" if isinstance(response, list) else where
        require_object(item, here)
        meta_info = item.get("meta_info")
        if not isinstance(meta_info, Mapping):
            raise TraceError(
                f"{here}: no meta_info object; save SGLang's /generate response whole."
            )
        prompt_field = item.get("prompt_token_ids", item.get("input_ids"))
        if prompt_field is None and prompts is not None:
            prompt_field = prompts[index // samples]
        prompt = token_ids(prompt_field, "prompt_token_ids", here, _PROMPT_IDS)
        completion = token_ids(item.get("output_ids"), "output_ids", here, "save output_ids")
        sequence_id = meta_info.get("id")  # Rollout checks it is a string
        routes = from_meta_info(
            meta_info,
            layout,
            prompt_len=len(prompt),
            completion_len=len(completion),
            start_len=_start_len(request, item, index // samples, here),
            sequence=here if sequence_id is None else f"{here} ({sequence_id})",
        )
        finish = meta_info.get("finish_reason")
        rollouts.append(
            rollout(
                here,
                prompt_ids=prompt,
                completion_ids=completion,
                routes=routes,
                logprobs=_generate_logprobs(meta_info, len(completion), here),
                finish_reason=finish.get("type") if isinstance(finish, Mapping) else finish,
                sequence_id=sequence_id,
            )
        )
    return rollouts


def from_openai_response(
    response: Mapping[str, Any],
    layout: MoELayout,
    *,
    request: Mapping[str, Any] | None = None,
    where: str = "sglang response",
) -> list[Rollout]:
    """One `Rollout` per choice of a `/v1/completions` or `/v1/chat/completions` response.

    SGLang returns the first sample's routes only (`sglext.routed_experts`), unless chat
    was asked for `return_meta_info`: a response with more choices than routes is
    refused, naming the samples without routes.
    """
    require_object(response, where)
    if request is not None:
        require_object(request, f"{where}: request")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        raise TraceError(f"{where}: an OpenAI-style response has a list of choices, found none.")
    sglext = require_object(response.get("sglext") or {}, f"{where}: sglext")
    per_choice = all(isinstance(c, Mapping) and "meta_info" in c for c in choices)
    if not per_choice and len(choices) > 1:
        raise TraceError(
            f"{where} has {len(choices)} choices but SGLang's OpenAI endpoints return the "
            "routes of the first sample only (sglext.routed_experts): samples "
            f"{list(range(1, len(choices)))} have none. Send one request per sample (n: 1), "
            "or on /v1/chat/completions send return_meta_info: true for routes per choice."
        )
    start = _start_len(request, {}, 0, where)
    rollouts = []
    for index, choice in enumerate(choices):
        here = f"{where}, choice {index}"
        require_object(choice, here)
        meta_info = choice["meta_info"] if per_choice else sglext
        require_object(meta_info, f"{here}: {'meta_info' if per_choice else 'sglext'}")
        prompt = token_ids(
            choice.get("prompt_token_ids", sglext.get("input_ids")),
            "prompt_token_ids",
            here,
            _OPENAI_IDS,
        )
        output_ids = sglext.get("output_ids")
        completion_field = choice.get("response_token_ids", choice.get("token_ids"))
        if completion_field is None and isinstance(output_ids, list) and index < len(output_ids):
            completion_field = output_ids[index]
        completion = token_ids(completion_field, "token_ids", here, _OPENAI_IDS)
        sequence_id = choice_id(response.get("id"), choice.get("index", index))
        routes = from_meta_info(
            meta_info,
            layout,
            prompt_len=len(prompt),
            completion_len=len(completion),
            start_len=start,
            sequence=here if sequence_id is None else f"{here} ({sequence_id})",
        )
        rollouts.append(
            rollout(
                here,
                prompt_ids=prompt,
                completion_ids=completion,
                routes=routes,
                finish_reason=choice.get("finish_reason"),
                sequence_id=sequence_id,
            )
        )
    return rollouts


def from_response(
    response: Mapping[str, Any] | list[Any],
    layout: MoELayout,
    *,
    request: Mapping[str, Any] | None = None,
    where: str = "sglang response",
) -> list[Rollout]:
    """Any SGLang response: `/generate` (an object with `meta_info`, or a list) or an
    OpenAI-style one (`choices`), told apart by its body."""
    if isinstance(response, list) or (isinstance(response, Mapping) and "choices" not in response):
        return from_generate(response, layout, request=request, where=where)
    return from_openai_response(response, layout, request=request, where=where)


# -- internals ------------------------------------------------------------------------


def _request_prompts(request: Mapping[str, Any] | None, items: int, where: str) -> list[Any] | None:
    """The prompt of each output object from a `/generate` request's `input_ids`: one
    prompt, or a batch whose n samples each come out prompt-major."""
    if request is None or request.get("input_ids") is None:
        return None
    prompts = request["input_ids"]
    if not isinstance(prompts, list) or not prompts:
        raise TraceError(
            f"{where}: the request's input_ids must be a list of token ids or a list of "
            f"such lists, found {prompts!r}."
        )
    if not isinstance(prompts[0], list):
        prompts = [prompts]
    if items % len(prompts):
        raise TraceError(
            f"{where}: the request sends {len(prompts)} prompts but the response holds "
            f"{items} outputs, not a whole number of samples per prompt."
        )
    return list(prompts)


def _start_len(
    request: Mapping[str, Any] | None, item: Mapping[str, Any], prompt: int, where: str
) -> int:
    """`routed_experts_start_len`: saved on the item, or the request's (one value, or one
    per prompt of a batch; `prompt` is the item's prompt index)."""
    field = "routed_experts_start_len"
    value = item.get(field)
    if value is None and request is not None:
        value = request.get(field)
        if isinstance(value, list):
            if prompt >= len(value):
                raise TraceError(
                    f"{where}: the request's {field} holds {len(value)} values, none for "
                    f"prompt {prompt}: give one per prompt."
                )
            value = value[prompt]
    return start_position(value, field, where)


def _generate_logprobs(
    meta_info: Mapping[str, Any], completion_len: int, where: str
) -> torch.Tensor | None:
    """`meta_info.output_token_logprobs` ([logprob, token id, text] per sampled token,
    with `return_logprob: true`) as float32 `[completion_len]`."""
    entries = meta_info.get("output_token_logprobs")
    if not entries:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, list) and e for e in entries):
        raise TraceError(
            f"{where}: meta_info.output_token_logprobs are not [logprob, token id, ...] entries."
        )
    return payload_logprobs([entry[0] for entry in entries], completion_len, where)
