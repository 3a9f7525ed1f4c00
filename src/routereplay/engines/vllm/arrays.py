"""vLLM payloads: the offline `CompletionOutput.routed_experts` array and the
OpenAI-compatible server's base64 `.npy` fields.

vLLM returns `[rows, num_hidden_layers, top_k]`, uint8 when the model has at most 256
experts and uint16 above (int16 in older versions), dense layers as zeros, one row per
forwarded token (see `payload`). `routed_experts_prompt_start=N` drops the first N
rows. Newer versions split the prompt rows out into `prompt_routed_experts`, shared
by all completions of a request; the completion's own rows then start at the first
completion token.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from routereplay.engines.payload import SequenceId, _describe, decode_base64, trace_from_rows
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.trace import RoutingTrace

SOURCE = "vllm"

_SERVER_CAPTURE = (
    "start the server with routed-experts capture enabled (`vllm serve ... "
    "--enable-return-routed-experts`, engine argument enable_return_routed_experts=True) "
    "and make sure the request asks for the routed experts"
)


def from_completion(
    routed_experts: np.ndarray[Any, Any] | None,
    layout: MoELayout,
    *,
    prompt_len: int,
    completion_len: int,
    prompt_start: int = 0,
    prompt_routed_experts: np.ndarray[Any, Any] | None = None,
    sequence: SequenceId | None = None,
) -> RoutingTrace:
    """Trace of one offline completion: `CompletionOutput.routed_experts`.

    `routed_experts [rows, num_hidden_layers, top_k]` as vLLM returns it; with a vLLM
    that splits prompt rows out, pass `RequestOutput.prompt_routed_experts` too.
    `prompt_start` is the request's `routed_experts_prompt_start`.
    """
    where = _describe(SOURCE, sequence)
    missing = (
        f"{where}: CompletionOutput.routed_experts is None: create the engine with "
        "routed-experts capture enabled, LLM(..., enable_return_routed_experts=True)."
    )
    prompt_rows = prompt_len - prompt_start
    rows = _join(prompt_routed_experts, routed_experts, prompt_rows, completion_len, missing, where)
    return trace_from_rows(
        rows,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        source=SOURCE,
        start=prompt_start,
        sequence=sequence,
    )


def from_openai_choice(
    choice: Mapping[str, Any],
    layout: MoELayout,
    *,
    prompt_len: int,
    completion_len: int,
    prompt_start: int | None = None,
    prompt_routed_experts: str | bytes | None = None,
    sequence: SequenceId | None = None,
) -> RoutingTrace:
    """Trace of one choice of an OpenAI-compatible completion or chat response.

    `choice["routed_experts"]` is base64 of `.npy` bytes. vLLM puts the split-out prompt
    rows at the response level (`response["prompt_routed_experts"]`, shared by every
    choice): pass them as `prompt_routed_experts`; a `prompt_routed_experts` inside the
    choice is used too. `prompt_start` is the request's `routed_experts_prompt_start`
    when the choice does not carry it.
    """
    where = _describe(SOURCE, sequence)
    start = _prompt_start(choice.get("routed_experts_prompt_start"), prompt_start, where)
    prompt_field = choice.get("prompt_routed_experts")
    if prompt_field is None:
        prompt_field = prompt_routed_experts
    whole_response = "choices" in choice
    hint = " (this is a whole response: pass one of response['choices'])" if whole_response else ""
    rows = _join(
        _decode_npy(prompt_field, "prompt_routed_experts", where),
        _decode_npy(choice.get("routed_experts"), "routed_experts", where),
        prompt_len - start,
        completion_len,
        f"{where}: the choice has no routed_experts{hint}: {_SERVER_CAPTURE}.",
        where,
    )
    return trace_from_rows(
        rows,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        source=SOURCE,
        start=start,
        sequence=sequence,
    )


def _prompt_start(in_choice: Any, keyword: int | None, where: str) -> int:
    if in_choice is not None and keyword is not None and int(in_choice) != keyword:
        raise TraceError(
            f"{where}: the choice says routed_experts_prompt_start={in_choice} but "
            f"prompt_start={keyword} was passed; give one, or the same value."
        )
    value = in_choice if in_choice is not None else keyword
    return 0 if value is None else int(value)


def _decode_npy(payload: Any, field: str, where: str) -> np.ndarray[Any, Any] | None:
    """base64 of `.npy` bytes to an array; the dtype comes from the `.npy` header."""
    if payload is None:
        return None
    raw = decode_base64(payload, field, where, "the OpenAI server sends base64 of .npy bytes")
    try:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except ValueError as error:
        raise TraceError(
            f"{where}: {field} decodes from base64 but is not a .npy array ({error}); "
            "the server and this decoder disagree on the payload format."
        ) from error


def _join(
    prompt: np.ndarray[Any, Any] | None,
    completion: np.ndarray[Any, Any] | None,
    prompt_rows: int,
    completion_len: int,
    missing: str,
    where: str,
) -> np.ndarray[Any, Any]:
    """Prompt rows, then completion rows.

    vLLM leaves an empty part out: the prompt part when `routed_experts_prompt_start`
    covers the whole prompt, the completion part when one token was sampled (its only
    token is the final one, which has no row).
    """
    if completion is None:
        if prompt is None or completion_len > 1:
            raise TraceError(missing)
        return prompt
    if prompt is None:
        if prompt_rows > 0 and completion.ndim == 3 and len(completion) == completion_len - 1:
            raise TraceError(
                f"{where}: routed_experts holds {len(completion)} rows, exactly the "
                "completion's own (completion_len - 1), and no prompt rows were given: this "
                "vLLM returns the prompt's rows separately. Pass them as "
                "prompt_routed_experts (server: response['prompt_routed_experts']; offline: "
                "RequestOutput.prompt_routed_experts)."
            )
        return completion
    if prompt.ndim != 3 or completion.ndim != 3 or prompt.shape[1:] != completion.shape[1:]:
        raise TraceError(
            f"{where}: prompt rows of shape {prompt.shape} and completion rows of shape "
            f"{completion.shape} do not stack: both are [rows, layers, top_k] with the same "
            "layers and top_k."
        )
    return np.concatenate([prompt, completion])
