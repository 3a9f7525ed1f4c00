"""Whole-tensor questions about expert ids `[..., layers, top_k]`, a few passes each.

A step of 1M tokens x 48 layers x top-8 holds 384M ids, checked whenever a trace is
built from outside data (an engine payload, a trace file). These functions only answer
yes or no, fast: a min/max reduction for the range, and for -1 rows and repeated
experts a scan over blocks of rows small enough to stay in cache, with the top_k
columns of each block side by side so that every comparison is a contiguous vector
operation. Locating the first bad row for an error message is the caller's (slower)
job, done only when an answer is yes.

CPU tensors and numpy arrays are scanned through numpy, whose integer comparisons are
vectorised for every width; tensors on other devices use torch's own kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# The one value meaning "no route" (re-exported by routereplay.trace).
NO_ROUTE = -1
# Rows (token, layer pairs) per block: 64K rows of top-8 int8 ids are 512 KB, and the
# block's comparison results stay in L2 next to them.
BLOCK_ROWS = 1 << 16

Ids = torch.Tensor | np.ndarray[Any, Any]


def id_range(experts: Ids) -> tuple[int, int]:
    """The smallest and largest id (`(0, -1)` when there is none)."""
    if experts.size == 0 if isinstance(experts, np.ndarray) else experts.numel() == 0:
        return 0, -1
    if isinstance(experts, np.ndarray):
        return int(experts.min()), int(experts.max())
    if not experts.dtype.is_signed and experts.dtype != torch.uint8:
        experts = experts.to(torch.int64)  # torch has no aminmax for uint16 and wider
    low, high = torch.aminmax(experts)
    return int(low), int(high)


def _may_hold_no_route(experts: Ids) -> bool:
    """Unsigned ids cannot be -1 (torch would read 255 as -1 in a comparison)."""
    if isinstance(experts, np.ndarray):
        return bool(experts.dtype.kind == "i")
    return bool(experts.dtype.is_signed)


def has_partial_rows(experts: Ids) -> bool:
    """Whether some row mixes -1 with expert ids (a row is all -1 or fully routed)."""
    return row_faults(experts, repeats=False)[0]


def has_repeated_rows(experts: Ids) -> bool:
    """Whether some routed row names one expert twice (-1 rows are not routed)."""
    return row_faults(experts, partial=False)[1]


def row_faults(experts: Ids, *, partial: bool = True, repeats: bool = True) -> tuple[bool, bool]:
    """(some row mixes -1 with ids, some routed row repeats an expert), asked in one
    scan: each block is laid out column-wise once for both questions. A mixed row is
    the first fault a trace names, so its answer ends the scan."""
    partial = partial and _may_hold_no_route(experts) and experts.shape[-1] > 0
    repeats = repeats and experts.shape[-1] >= 2
    rows = _host_rows(experts) if partial or repeats else None
    if rows is None:
        if not (partial or repeats):
            return False, False
        assert isinstance(experts, torch.Tensor)
        return partial and _partial_torch(experts), repeats and _repeats_torch(experts)
    repeated = False
    for columns in _blocks(rows):
        if partial and _partial_block(columns):
            return True, repeated
        if repeats and not repeated:
            repeated = _repeated_block(columns)
        elif not partial and repeated:
            break
    return False, repeated


def _partial_block(columns: np.ndarray[Any, Any]) -> bool:
    """`columns [top_k, rows]`: whether some row mixes -1 with ids."""
    missing = columns[0] == NO_ROUTE
    other = np.empty_like(missing)
    for column in columns[1:]:
        np.equal(column, NO_ROUTE, out=other)
        if not np.array_equal(other, missing):
            return True
    return False


def _repeated_block(columns: np.ndarray[Any, Any]) -> bool:
    """`columns [top_k, rows]`: whether some routed row names an expert twice."""
    top_k = columns.shape[0]
    repeated = np.zeros(columns.shape[1], dtype=bool)
    equal = np.empty_like(repeated)
    for i in range(top_k):
        for j in range(i + 1, top_k):
            np.equal(columns[i], columns[j], out=equal)
            repeated |= equal
    if columns.dtype.kind == "i":
        repeated &= columns[0] != NO_ROUTE
    return bool(repeated.any())


def _partial_torch(experts: torch.Tensor) -> bool:
    missing = experts == NO_ROUTE
    return bool((missing != missing[..., :1]).any())


def _repeats_torch(experts: torch.Tensor) -> bool:
    found = _repeated_torch(experts)
    if _may_hold_no_route(experts):
        found &= experts[..., 0] != NO_ROUTE
    return bool(found.any())


def repeated_mask(experts: torch.Tensor) -> torch.Tensor:
    """`[..., layers]` bool: rows of `experts [..., layers, top_k]` with an id twice
    (-1 rows included: for locating, after `has_repeated_rows` said yes)."""
    return _repeated_torch(experts)


def _host_rows(experts: Ids) -> np.ndarray[Any, Any] | None:
    """`[rows, top_k]` numpy view of host ids, or None for device tensors."""
    if isinstance(experts, torch.Tensor):
        if experts.device.type != "cpu" or experts.dtype not in _NUMPY_VIEWABLE:
            return None
        experts = experts.numpy()
    return experts.reshape(-1, experts.shape[-1])


def _blocks(rows: np.ndarray[Any, Any]) -> Any:
    """`[top_k, block rows]` contiguous column blocks of `rows [rows, top_k]`."""
    for start in range(0, rows.shape[0], BLOCK_ROWS):
        yield np.ascontiguousarray(rows[start : start + BLOCK_ROWS].T)


def _repeated_torch(experts: torch.Tensor) -> torch.Tensor:
    top_k = experts.shape[-1]
    if top_k > 16:
        ordered = experts.sort(dim=-1).values
        return (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    columns = experts.unbind(-1)
    repeated = torch.zeros(experts.shape[:-1], dtype=torch.bool, device=experts.device)
    for i in range(top_k):
        for j in range(i + 1, top_k):
            repeated |= columns[i] == columns[j]
    return repeated


_NUMPY_VIEWABLE = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
