"""SGLang's routed-experts array: `meta_info["routed_experts"]`.

With `--enable-return-routed-experts` on the server and `return_routed_experts: true`
on the request, SGLang returns base64 of flattened little-endian int32 ids, logical
shape `[seqlen - 1 - start, num_hidden_layers, top_k]` with dense layers as zeros,
where start is the request's `routed_experts_start_len` (multi-turn: only rows from
start are returned). The flat array carries no shape, so the layout gives it one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from routereplay.engines.base64_field import decode_base64
from routereplay.engines.payload import SequenceId, describe, trace_from_rows
from routereplay.errors import TraceError
from routereplay.layout import MoELayout
from routereplay.trace import RoutingTrace

SOURCE = "sglang"


def from_meta_info(
    meta_info: Mapping[str, Any],
    layout: MoELayout,
    *,
    prompt_len: int,
    completion_len: int,
    start_len: int = 0,
    sequence: SequenceId | None = None,
) -> RoutingTrace:
    """Trace of one SGLang generation from its `meta_info`.

    `start_len` is the request's `routed_experts_start_len`. Rows are every decoder
    layer, SGLang's format; no other width is guessed from the length.
    """
    where = describe(SOURCE, sequence)
    payload = meta_info.get("routed_experts")
    if payload is None:
        hint = (
            " (this is a whole response: pass response['meta_info'])"
            if "meta_info" in meta_info
            else ""
        )
        raise TraceError(
            f"{where}: meta_info has no routed_experts{hint}: launch the server with "
            "--enable-return-routed-experts and send return_routed_experts: true with the "
            "request."
        )
    ids = _decode_int32(payload, where)
    rows = _rows(ids, layout, prompt_len + completion_len - 1 - start_len, where)
    return trace_from_rows(
        rows,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        source=SOURCE,
        start=start_len,
        sequence=sequence,
    )


def _decode_int32(payload: Any, where: str) -> np.ndarray[Any, np.dtype[np.int32]]:
    """base64 to a flat, read-only int32 array (a view of the decoded bytes)."""
    raw = decode_base64(
        payload,
        "meta_info['routed_experts']",
        where,
        "SGLang sends base64 of flattened int32 ids",
    )
    if len(raw) % 4:
        raise TraceError(
            f"{where}: meta_info['routed_experts'] decodes to {len(raw)} bytes, not a "
            "whole number of 4-byte int32 ids: the payload is truncated or not SGLang's."
        )
    return np.frombuffer(raw, dtype="<i4")


def _rows(
    ids: np.ndarray[Any, np.dtype[np.int32]], layout: MoELayout, expected: int, where: str
) -> np.ndarray[Any, np.dtype[np.int32]]:
    """`ids [n * num_layers * top_k]` to `[n, num_layers, top_k]`, a view: still read-only.

    SGLang always sends every decoder layer. The flat array has no shape, so reading it
    as routed layers only because that length happens to fit would be a guess, and
    would read dense layers' zeros as expert 0.
    """
    top_k, width = layout.top_k, layout.num_layers
    if ids.size % (width * top_k) == 0:
        # A wrong row count is the row contract's to report, by how many rows.
        return ids.reshape(-1, width, top_k)
    raise TraceError(
        f"{where}: {ids.size} ids are not whole rows of {width} decoder layers x top_k "
        f"{top_k} = {width * top_k} (SGLang sends every decoder layer, dense ones as "
        f"zeros; {expected} rows were expected): the layout does not match the served "
        "model (num_hidden_layers, num_experts_per_tok), or the payload is truncated."
    )
