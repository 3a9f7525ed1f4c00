"""Expert-id arrays from outside a trace: conversion to the compact dtype, and the
checks that name the first bad row (range, dense layers, broken captures).

`RoutingTrace` builds on these; the fast yes/no scans they fall back from are in
`id_checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from routereplay.errors import TraceError
from routereplay.id_checks import NO_ROUTE, id_range
from routereplay.layout import MoELayout

ExpertArray = torch.Tensor | np.ndarray[Any, Any]


def storage_dtype(num_experts: int) -> torch.dtype:
    """Smallest signed dtype holding ids `0..num_experts-1` and the -1 sentinel."""
    if num_experts <= 1 + torch.iinfo(torch.int8).max:
        return torch.int8
    if num_experts <= 1 + torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32


def storage_numpy_dtype(num_experts: int) -> np.dtype[Any]:
    """`storage_dtype(num_experts)` as numpy's dtype."""
    return torch.empty(0, dtype=storage_dtype(num_experts)).numpy().dtype


def as_int_tensor(experts: ExpertArray, name: str, num_experts: int | None = None) -> torch.Tensor:
    """`experts` as a signed integer tensor. Given `num_experts`, ids all in [-1,
    num_experts) come back narrowed to `storage_dtype(num_experts)` in one copy (an
    engine's uint8 array, say); anything else is widened, so that an id too large for
    the compact dtype is reported as itself instead of wrapping around (a seed bug:
    ids above 255 in uint8)."""
    if isinstance(experts, np.ndarray):
        if not np.issubdtype(experts.dtype, np.integer):
            raise TraceError(f"{name} must hold integers, found numpy dtype {experts.dtype}.")
        # A copy either way: uint16 has no torch twin and engines hand out read-only
        # buffers.
        if num_experts is not None and in_range(experts, num_experts):
            return torch.from_numpy(experts.astype(storage_numpy_dtype(num_experts)))
        wide = np.int32 if np.can_cast(experts.dtype, np.int32) else np.int64
        return torch.from_numpy(experts.astype(wide, copy=True))
    if not isinstance(experts, torch.Tensor):
        raise TraceError(f"{name} must be a torch tensor or numpy array, found {type(experts)}.")
    if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
        raise TraceError(f"{name} must hold integers, found dtype {experts.dtype}.")
    if not experts.dtype.is_signed:
        if (
            num_experts is not None
            and experts.dtype == torch.uint8
            and in_range(experts, num_experts)
        ):
            return experts.to(storage_dtype(num_experts))
        # torch.from_numpy of an engine's uint8 / uint16 array: widen, so that ids are
        # range-checked as themselves and -1 can be written.
        wide_dtype = torch.int32 if experts.dtype in (torch.uint8, torch.uint16) else torch.int64
        if experts.dtype == torch.uint64 and experts.numel() and (experts > 2**62).any():
            raise TraceError(f"{name} holds uint64 ids beyond int64; no expert id is that big.")
        return experts.to(wide_dtype)
    return experts


def in_range(experts: ExpertArray, num_experts: int) -> bool:
    low, high = id_range(experts)
    return low >= NO_ROUTE and high < num_experts


def as_token_ids(
    tokens: torch.Tensor | np.ndarray[Any, Any] | None, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """`tokens` as int32 `[*shape]`, ids >= 0 or -1 (unknown), or None."""
    if tokens is None:
        return None
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(np.asarray(tokens))
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.is_floating_point()
        or tokens.dtype == torch.bool
    ):
        found = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TraceError(f"tokens must be an integer tensor of token ids, found {found}.")
    if tuple(tokens.shape) != shape:
        raise TraceError(
            f"tokens have shape {list(tokens.shape)}; one per row of the token axes {list(shape)}."
        )
    wide = tokens.long()
    if wide.numel() and (int(wide.min()) < -1 or int(wide.max()) > torch.iinfo(torch.int32).max):
        raise TraceError(
            f"token ids must lie in [0, 2**31) or be -1 (unknown), found "
            f"{int(wide.min())}..{int(wide.max())}."
        )
    return wide.to(torch.int32)


def check_range(experts: torch.Tensor, layers: Sequence[int], num_experts: int) -> None:
    # torch casts a Python int to the tensor's dtype before comparing: 128 would become
    # -128 in int8. Where num_experts exceeds the dtype, no stored id can reach it.
    low, high = id_range(experts)
    if low >= NO_ROUTE and high < num_experts:
        return
    bad = experts < NO_ROUTE
    if num_experts <= torch.iinfo(experts.dtype).max:
        bad |= experts >= num_experts
    if bad.any():
        index = first_true(bad)
        raise TraceError(
            f"{where_row(bad.any(-1), layers)} holds expert id {int(experts[index])}; ids must lie "
            f"in [0, {num_experts}) or be -1 for no route."
        )


def check_dense(full: ExpertArray, layout: MoELayout, start: int = 0) -> None:
    """Ids on a layer the layout calls dense: the layout is not the engine's model.
    Row numbers in the error count from `start`."""
    dense = list(layout.dense_layers)
    if not dense:
        return
    values = full[..., dense, :]
    low, high = id_range(values)
    if low >= NO_ROUTE and high <= 0:  # zeros, or -1 rows
        return
    values = as_int_tensor(values, "experts")
    stray = ((values != 0) & (values != NO_ROUTE)).any(-1)  # [..., dense layers]
    found = values[first_true(stray)].tolist()
    raise TraceError(
        f"{where_row(stray, dense, start)} holds expert ids {found} but is dense in the "
        f"{layout.family} layout: the layout does not match the engine's model (check "
        "first_k_dense_replace / mlp_only_layers / moe_layer_freq)."
    )


def routed_columns(full: ExpertArray, moe_layers: tuple[int, ...]) -> ExpertArray:
    """`full[..., moe_layers, :]`: a view when the routed layers are one run (a dense
    prefix, say), else a copy in the engine's own dtype."""
    first, last = moe_layers[0], moe_layers[-1]
    if last - first + 1 == len(moe_layers):
        return full[..., first : last + 1, :]
    return full[..., list(moe_layers), :]


def placed_rows(
    routed: ExpertArray,
    num_experts: int,
    start: int,
    num_tokens: int,
    out: np.ndarray[Any, Any] | None = None,
) -> torch.Tensor:
    """`routed [n, layers, top_k]` as rows `start .. start + n - 1` of `num_tokens`, -1
    elsewhere, in the compact dtype (range-checked first: nothing wraps).

    `out`, a writable C-contiguous numpy array `[num_tokens, layers, top_k]` in the
    compact dtype, receives the rows instead of a new tensor, and the result shares it.
    Its rows `start ..` may already be `routed` itself (an engine payload decoded into
    a buffer with room for the rows after it): ids in place are not copied, since ids
    in range read the same in either dtype of one width.
    """
    rows = routed.shape[0]
    if out is None and (start, num_tokens) == (0, rows):
        narrow = as_int_tensor(routed, "experts", num_experts)
        shared = isinstance(routed, torch.Tensor) and (
            narrow.untyped_storage().data_ptr() == routed.untyped_storage().data_ptr()
        )
        return narrow.clone() if shared else narrow  # never the caller's buffer
    if not in_range(routed, num_experts):  # widened, so that the trace reports the id
        wide = torch.full((num_tokens, *routed.shape[1:]), NO_ROUTE, dtype=torch.int64)
        wide[start : start + rows] = as_int_tensor(routed, "experts")
        return wide
    dtype = storage_dtype(num_experts)
    if out is None:
        placed = torch.empty((num_tokens, *routed.shape[1:]), dtype=dtype)
    else:
        placed = _out_tensor(out, (num_tokens, *routed.shape[1:]), num_experts)
    placed[:start] = NO_ROUTE
    placed[start + rows :] = NO_ROUTE
    target = placed.numpy()[start : start + rows]
    if isinstance(routed, torch.Tensor):
        placed[start : start + rows] = routed
    elif not _in_place(routed, target):
        if np.shares_memory(routed, target):
            raise TraceError("out overlaps the engine rows without holding them in place.")
        np.copyto(target, routed, casting="unsafe")
    return placed


def _out_tensor(
    out: np.ndarray[Any, Any], shape: tuple[int, ...], num_experts: int
) -> torch.Tensor:
    # Compared as numpy dtypes before torch sees it: torch refuses a foreign byte order.
    native = storage_numpy_dtype(num_experts)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != native
        or out.shape != shape
        or not (out.flags.writeable and out.flags.c_contiguous)
    ):
        found = f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out)
        raise TraceError(
            f"out must be a writable C-contiguous numpy array of {storage_dtype(num_experts)} "
            f"{list(shape)}, found {found}."
        )
    return torch.from_numpy(out)


def _in_place(routed: np.ndarray[Any, Any], target: np.ndarray[Any, Any]) -> bool:
    """Whether `routed` is `target`'s memory, element for element, in one byte order
    (big-endian ids are other numbers when read as the trace's native dtype)."""
    return (
        routed.dtype.itemsize == target.dtype.itemsize
        and routed.dtype.isnative
        and routed.shape == target.shape
        and routed.strides == target.strides
        and routed.__array_interface__["data"][0] == target.__array_interface__["data"][0]
    )


def check_capture(routed: torch.Tensor, layers: Sequence[int], source: str) -> None:
    """A routed layer that is zero in every routed row of a sequence was never captured.

    With top_k >= 2 a zero row is also a duplicate; with top_k = 1 it is only caught
    here, and a sequence that really sent every token to expert 0 looks the same.
    """
    if routed.numel() == 0:
        return
    per_sequence = routed.reshape(-1, *routed.shape[-3:])  # [sequences, tokens, layers, k]
    has_route = per_sequence[..., 0] != NO_ROUTE
    zero_or_none = (per_sequence == 0).all(-1) | ~has_route
    broken = zero_or_none.all(1) & has_route.any(1)  # [sequences, layers]
    if broken.any():
        sequence, slot = (int(i) for i in broken.nonzero()[0])
        where = f" of sequence {sequence}" if routed.ndim > 3 else ""
        raise TraceError(
            f"Layer {layers[slot]} is all zeros in every routed row{where} of the {source} "
            "array: that is a broken capture (routing not recorded), not routing. Check "
            "that the engine's routed-experts capture is bound to this model's MoE layers."
        )


def first_true(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def where_row(row_mask: torch.Tensor, layers: Sequence[int], offset: int = 0) -> str:
    """'Row (sequence 2, token 7), layer 5' for the first True of `row_mask [..., layers]`
    (`offset` added to a single token axis' position)."""
    *row, slot = first_true(row_mask)
    if len(row) == 1:
        row[0] += offset
    names = ("token",) if len(row) == 1 else ("sequence", "token") if len(row) == 2 else ()
    where = ", ".join(f"{n} {i}" for n, i in zip(names, row, strict=True)) if names else str(row)
    layer = layers[slot] if slot < len(layers) else f"slot {slot}"
    return f"Row ({where}), layer {layer},"
