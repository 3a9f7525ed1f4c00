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
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from routereplay.engines.base64_field import decode_base64
from routereplay.engines.payload import SequenceId, describe, trace_from_rows
from routereplay.errors import TraceError
from routereplay.id_arrays import storage_numpy_dtype
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
    out = None
    if isinstance(field, list) or prompt_routed_experts is not None:
        rows = _split_rows(prompt_routed_experts, field, prompt_len, where)
    else:
        # Decoded with room for the final token's row: the trace can then keep the
        # decoded buffer itself, the payload's ids in place (no copy of them).
        with_final = decode_npy(field, "routed_experts", where, spare_rows=1)
        rows = with_final[:-1]
        out = _in_place_out(with_final, layout, prompt_start)
    return trace_from_rows(
        rows,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        source=SOURCE,
        start=prompt_start,
        sequence=sequence,
        out=out,
    )


def _in_place_out(
    with_final: np.ndarray[Any, Any], layout: MoELayout, prompt_start: int
) -> np.ndarray[Any, Any] | None:
    """`with_final` (the payload's rows, then room for one more) as the trace's ids, where
    its ids already sit as the trace keeps them: every slot a routed layer (no dense
    ones to drop), rows from token 0, and ids of the compact dtype's width (uint8 for up
    to 128 experts). Else None: the ids are copied."""
    compact = storage_numpy_dtype(layout.num_experts)
    fits = (
        prompt_start == 0
        and with_final.ndim == 3
        and with_final.shape[1] == len(layout.moe_layers)
        and with_final.dtype.kind in "iu"
        and with_final.dtype.itemsize == compact.itemsize
        and with_final.dtype.isnative  # a '>u2' header's bytes are not native int16
        and with_final.flags.c_contiguous
        and with_final.flags.writeable
    )
    return with_final.view(compact) if fits else None


def decode_npy(
    payload: Any, field: str, where: str, *, spare_rows: int = 0
) -> np.ndarray[Any, Any]:
    """base64 of `.npy` bytes to an array; the dtype and shape come from its header, and
    the bytes must be exactly what the header describes.

    `spare_rows`: the array holds that many rows more after the payload's (zeros),
    writable room for the caller; the payload's rows are `array[:-spare_rows]`.
    """
    raw = decode_base64(payload, field, where, "vLLM's server sends base64 of .npy bytes")
    head = _header_bytes(raw)
    parsed = _saved_header(head)
    if parsed is None:
        parsed = _parsed_header(head, field, where)
    shape, fortran, dtype, header = parsed
    if dtype.hasobject or not np.issubdtype(dtype, np.integer):
        raise TraceError(f"{where}: {field} is a .npy array of {dtype}, not of integer expert ids.")
    data = len(raw) - header
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap to 0
    if data != expected:
        raise TraceError(
            f"{where}: {field}'s .npy header describes {list(shape)} {dtype} ids "
            f"({expected} bytes) but {data} bytes follow it: the payload is not one vLLM "
            "array (truncated, or bytes appended)."
        )
    if spare_rows and not shape:
        raise TraceError(
            f"{where}: {field} is a .npy scalar; vLLM sends [rows, layers, top_k] ids."
        )
    if spare_rows and not fortran:
        raw = raw if isinstance(raw, bytearray) else bytearray(raw)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        raw.extend(bytes(spare_rows * row_bytes))  # in place: no view of raw exists yet
        shape = (shape[0] + spare_rows, *shape[1:])
        expected += spare_rows * row_bytes
        spare_rows = 0
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    array = array.reshape(shape, order="F" if fortran else "C")
    if spare_rows:  # Fortran order (vLLM never sends it): the rows are copied
        array = np.concatenate([array, np.zeros((spare_rows, *shape[1:]), dtype)])
    return array


_Header = tuple[tuple[int, ...], bool, np.dtype[Any], int]  # shape, fortran, dtype, size

# The header np.save writes (vLLM's server saves with it): parsed by one match, where
# numpy's own reader evaluates it as Python source (about 90 us a payload).
# Only what numpy reads the same way: integer dtypes numpy has, and shapes that are
# Python tuples of int literals (`(6)` is an int and `(06,)` no literal: numpy refuses).
_DIM = rb"(?:0|[1-9]\d*)"
_SAVED_HEADER = re.compile(
    rb"\{'descr': '([<>|=][iu][1248])', 'fortran_order': (True|False), "
    rb"'shape': \((|" + _DIM + rb",|" + _DIM + rb"(?:, " + _DIM + rb")+,?)\), \} *\n"
)


def _saved_header(head: bytes) -> _Header | None:
    """The header of `head` if it is np.save's, version 1.0, of an integer dtype."""
    found = _SAVED_HEADER.fullmatch(head, 10) if head[:8] == b"\x93NUMPY\x01\x00" else None
    if found is None:
        return None
    descr, fortran, dims = found.groups()
    dtype = np.dtype(descr.decode())
    shape = tuple(int(d) for d in dims.split(b",") if d.strip())
    return shape, fortran == b"True", dtype, len(head)


_NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))  # 3.0 is 2.0 with a UTF-8 header


def _parsed_header(head: bytes, field: str, where: str) -> _Header:
    """The header of `head` as numpy's reader parses it."""
    buffer = io.BytesIO(head)
    try:
        # The header first: numpy would allocate whatever shape it claims before reading.
        version = np.lib.format.read_magic(buffer)
        if version not in _NPY_VERSIONS:
            raise ValueError(
                f"it says .npy version {version[0]}.{version[1]}, numpy writes 1.0-3.0"
            )
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as error:
        raise TraceError(
            f"{where}: {field} decodes from base64 but is not a .npy array ({error}); "
            "the server and this decoder disagree on the payload format."
        ) from None
    return shape, fortran, dtype, buffer.tell()


def _header_bytes(raw: bytes | bytearray) -> bytes:
    """The `.npy` magic and header of `raw` (all of it when they cannot be told apart):
    parsing reads a copy of these alone, never of the ids."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12:
        return bytes(raw)
    if raw[6] == 1:
        end = 10 + int.from_bytes(raw[8:10], "little")
    else:
        end = 12 + int.from_bytes(raw[8:12], "little")
    return bytes(raw[:end])


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
