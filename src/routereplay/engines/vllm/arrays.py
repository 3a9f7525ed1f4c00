"""vLLM's routed-experts arrays: the offline numpy array, the server's base64 `.npy`
string, and vLLM 0.21's split JSON lists, each to a `RoutingTrace`.

vLLM >= 0.22 returns one array per sequence, `[prompt_len + completion_len - 1 -
prompt_start, num_hidden_layers, top_k]`, uint8 up to 256 experts and uint16 above,
dense layers as zeros, one row per forwarded token (see `engines.payload`);
`routed_experts_prompt_start=N` drops the first N rows. The server sends it as base64
of the `.npy` bytes, per choice. vLLM 0.21.0 alone split it: response-level
`prompt_routed_experts` (the prompt's rows) and per-choice `routed_experts` (the
completion's), both JSON nested integer lists.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from routereplay.engines.payload import SequenceId, decode_base64, describe, trace_from_rows
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.trace import RoutingTrace

SOURCE = "vllm"

SERVER_CAPTURE = (
    "start the server with routed-experts capture enabled (`vllm serve ... "
    "--enable-return-routed-experts`)"
)
OFFLINE_CAPTURE = (
    "create the engine with routed-experts capture enabled, "
    "LLM(..., enable_return_routed_experts=True)"
)


def from_completion(
    routed_experts: np.ndarray[Any, Any] | None,
    layout: MoELayout,
    *,
    prompt_len: int,
    completion_len: int,
    prompt_start: int = 0,
    sequence: SequenceId | None = None,
) -> RoutingTrace:
    """`RoutingTrace [prompt_len + completion_len, routed layers, top_k]` of one offline
    completion: `CompletionOutput.routed_experts`, as vLLM returns it.

    `prompt_start` is the request's `routed_experts_prompt_start`.
    """
    where = describe(SOURCE, sequence)
    if routed_experts is None:
        raise TraceError(f"{where}: CompletionOutput.routed_experts is None: {OFFLINE_CAPTURE}.")
    return trace_from_rows(
        routed_experts,
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
    prompt_start: int = 0,
    prompt_routed_experts: Any = None,
    sequence: SequenceId | None = None,
) -> RoutingTrace:
    """`RoutingTrace [prompt_len + completion_len, routed layers, top_k]` of one choice of
    a vLLM server response.

    `choice["routed_experts"]` is base64 of `.npy` bytes (vLLM >= 0.22). From vLLM 0.21,
    it is a JSON list of the completion's rows: pass the response-level
    `prompt_routed_experts` too. `prompt_start` is the request's
    `routed_experts_prompt_start`.
    """
    where = describe(SOURCE, sequence)
    field = choice.get("routed_experts")
    if field is None and prompt_routed_experts is None:
        hint = " (this is a whole response: pass one of response['choices'])"
        raise TraceError(
            f"{where}: the choice has no routed_experts"
            f"{hint if 'choices' in choice else ''}: {SERVER_CAPTURE}. vLLM has no "
            "per-request switch: the server captures routes for every request or none."
        )
    if isinstance(field, list) or prompt_routed_experts is not None:
        rows = _split_rows(prompt_routed_experts, field, prompt_len, where)
    else:
        rows = decode_npy(field, "routed_experts", where)
    return from_completion(
        rows,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        prompt_start=prompt_start,
        sequence=sequence,
    )


def decode_npy(payload: Any, field: str, where: str) -> np.ndarray[Any, Any]:
    """base64 of `.npy` bytes to an array; the dtype and shape come from its header, and
    the bytes must be exactly what the header describes."""
    raw = decode_base64(payload, field, where, "vLLM's server sends base64 of .npy bytes")
    buffer = io.BytesIO(raw)
    try:
        # The header first: numpy would allocate whatever shape it claims before reading.
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as error:
        raise TraceError(
            f"{where}: {field} decodes from base64 but is not a .npy array ({error}); "
            "the server and this decoder disagree on the payload format."
        ) from None
    if dtype.hasobject or not np.issubdtype(dtype, np.integer):
        raise TraceError(f"{where}: {field} is a .npy array of {dtype}, not of integer expert ids.")
    data = len(raw) - buffer.tell()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data != expected:
        raise TraceError(
            f"{where}: {field}'s .npy header describes {list(shape)} {dtype} ids "
            f"({expected} bytes) but {data} bytes follow it: the payload is not one vLLM "
            "array (truncated, or bytes appended)."
        )
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def _split_rows(prompt: Any, completion: Any, prompt_len: int, where: str) -> np.ndarray[Any, Any]:
    """vLLM 0.21.0's split schema: the response's `prompt_routed_experts [prompt_len, L,
    k]` and the choice's `routed_experts [completion rows, L, k]`, JSON integer lists."""
    version = "vLLM 0.21.0's split schema (prompt_routed_experts + routed_experts)"
    parts = []
    if completion is None:  # one sampled token: vLLM leaves the empty part out
        completion = []
    for name, value in (("prompt_routed_experts", prompt), ("routed_experts", completion)):
        if not isinstance(value, list):
            raise TraceError(
                f"{where}: {version} sends {name} as a JSON nested list of ids, found "
                f"{type(value).__name__}. Pass the response-level prompt_routed_experts with "
                "its choices."
            )
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            array = None
        if array is not None and not array.size:
            array = array.astype(np.int64)
        if (
            array is None
            or array.dtype.kind not in "iu"  # floats and strings are no expert ids
            or (array.ndim != 3 and array.size)
        ):
            raise TraceError(
                f"{where}: {version}: {name} is not a [rows, layers, top_k] list of integers."
            )
        parts.append(array)
    prompt_rows, completion_rows = parts
    if len(prompt_rows) != prompt_len:
        raise TraceError(
            f"{where}: {version}: prompt_routed_experts holds {len(prompt_rows)} rows, the "
            f"prompt {prompt_len} tokens; one row per prompt token."
        )
    if not completion_rows.size:  # one sampled token: the completion part is empty
        return prompt_rows
    if prompt_rows.shape[1:] != completion_rows.shape[1:]:
        raise TraceError(
            f"{where}: {version}: prompt rows of shape {list(prompt_rows.shape)} and "
            f"completion rows of shape {list(completion_rows.shape)} do not stack: both are "
            "[rows, layers, top_k] with the same layers and top_k."
        )
    return np.concatenate([prompt_rows, completion_rows])
