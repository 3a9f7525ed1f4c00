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

from routereplay.engines.payload import SequenceId, decode_base64, describe, trace_from_rows
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

    `start_len` is the request's `routed_experts_start_len`. Rows are read as every
    decoder layer (SGLang's format) or, when only that length fits, the routed layers.
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
    """`ids [n * width * top_k]` to `[n, width, top_k]`, a view: still read-only."""
    top_k, routed = layout.top_k, len(layout.moe_layers)
    for width in (layout.num_layers, routed):
        if ids.size == expected * width * top_k:
            return ids.reshape(expected, width, top_k)
    # The count is off; reshape as SGLang's all-layer format so the row contract can
    # say by how many rows.
    if ids.size % (layout.num_layers * top_k) == 0:
        return ids.reshape(-1, layout.num_layers, top_k)
    if ids.size % (routed * top_k) == 0:
        found = ids.size // (routed * top_k)
        raise TraceError(
            f"{where}: {ids.size} ids are not whole rows of {layout.num_layers} decoder "
            f"layers x top_k {top_k}, but they are {found} rows of the {routed} routed "
            f"layers: the payload looks routed-only, with {found} rows where "
            f"prompt_len + completion_len - 1 - start_len = {expected} were expected. "
            "Check the token counts and routed_experts_start_len."
        )
    widths = f"{layout.num_layers * top_k} ({layout.num_layers} decoder layers x top_k {top_k})"
    if routed != layout.num_layers:
        widths += f" nor of {routed * top_k} ({routed} routed layers x top_k {top_k})"
    raise TraceError(
        f"{where}: {ids.size} ids are not a multiple of {widths}: the layout does not match "
        "the served model (num_hidden_layers, num_experts_per_tok), or the payload is "
        "truncated."
    )
