"""How one sequence's routes become bytes: the compact and bit-packed id encodings,
the routed mask that marks -1 rows, and the per-sequence checksum."""

from __future__ import annotations

import zlib
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from routereplay.errors import TraceFileError
from routereplay.id_arrays import storage_numpy_dtype
from routereplay.trace import NO_ROUTE

Encoding = Literal["compact", "packed"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)

Bytes = npt.NDArray[np.uint8]

# Ids per bit-packing step: bounds the temporary bit matrix; a multiple of 8, so that
# every step but the last ends on a byte boundary and steps concatenate exactly.
_PACK_STEP = 1 << 20


def compact_dtype(num_experts: int) -> np.dtype[np.unsignedinteger[Any]]:
    """Unsigned little-endian dtype of the compact encoding: 1, 2 or 4 bytes per id."""
    if num_experts <= 1 << 8:
        return np.dtype("<u1")
    if num_experts <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<u4")


def packed_bits(num_experts: int) -> int:
    """Bits per id of the packed encoding: ceil(log2(num_experts)), at least 1."""
    return max(1, (num_experts - 1).bit_length())


class Codec:
    """How one sequence's routes become bytes, for one file's shape and encoding."""

    def __init__(self, encoding: str, num_experts: int, num_layers: int, top_k: int) -> None:
        if encoding not in ENCODINGS:
            raise TraceFileError(
                f"Unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}."
            )
        self.encoding = encoding
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.top_k = top_k
        self.id_dtype = compact_dtype(num_experts)
        self.bits = packed_bits(num_experts) if encoding == "packed" else 8 * self.id_dtype.itemsize
        # Decoded ids go to RoutingTrace in the storage dtype of one expert more, which
        # also holds `num_experts` itself: a stored id of 200 for 128 experts then
        # reaches the range check as 200, not wrapped to -56 (or, for 255, to -1: no
        # route).
        self.trace_dtype = storage_numpy_dtype(num_experts + 1)
        self.storage_dtype = storage_numpy_dtype(num_experts)

    def id_bytes(self, tokens: int) -> int:
        return -(-tokens * self.num_layers * self.top_k * self.bits // 8)

    def mask_bytes(self, tokens: int) -> int:
        return -(-tokens * self.num_layers // 8)

    def encode(self, experts: np.ndarray[Any, Any]) -> tuple[Bytes, Bytes]:
        """`experts [tokens, layers, top_k]` with -1 rows -> (id bytes, routed mask bytes)."""
        routed = experts[..., 0] != NO_ROUTE
        ids = experts.astype(self.id_dtype)
        rows = ids.reshape(-1, self.top_k)
        if self.top_k * ids.dtype.itemsize == 8:  # a row is one machine word
            np.copyto(rows.view(np.uint64).reshape(-1), 0, where=~routed.reshape(-1))
        else:
            rows[~routed.reshape(-1)] = 0
        if self.encoding == "packed":
            return _pack_bits(ids.reshape(-1), self.bits), np.packbits(routed.reshape(-1))
        return ids.reshape(-1).view(np.uint8), np.packbits(routed.reshape(-1))

    def decode(self, ids: Bytes, mask: Bytes, tokens: int) -> np.ndarray[Any, Any]:
        """Inverse of `encode`: signed `[tokens, layers, top_k]` with -1 rows, in the
        trace's compact dtype when every stored id is below `num_experts`, else in a
        wider one, so that the trace reports a damaged id as itself. Compact ids of the
        storage width are decoded in place when `ids` is writable (no copy)."""
        count = tokens * self.num_layers * self.top_k
        if self.encoding == "packed":
            values = _unpack_bits(ids, count, self.bits, self.id_dtype)
        else:
            values = ids.view(self.id_dtype)
        in_range = values.size == 0 or int(values.max()) < self.num_experts
        dtype = self.storage_dtype if in_range else self.trace_dtype
        if in_range and values.dtype.itemsize == dtype.itemsize and values.flags.writeable:
            experts = values.view(dtype)  # ids below num_experts read the same signed
        else:
            experts = values.astype(dtype)
        rows = experts.reshape(tokens * self.num_layers, self.top_k)
        routed = np.unpackbits(mask, count=tokens * self.num_layers).view(bool)
        row_bytes = self.top_k * dtype.itemsize
        if row_bytes == 8:  # a row is one machine word: write -1 rows as words
            np.copyto(rows.view(np.int64).reshape(-1), -1, where=~routed)
        else:
            rows[~routed] = NO_ROUTE
        return experts.reshape(tokens, self.num_layers, self.top_k)


def _pack_bits(values: np.ndarray[Any, Any], bits: int) -> Bytes:
    """Unsigned `values [n]` at `bits` bits each, most significant bit first."""
    if bits == 8 * values.dtype.itemsize:
        return values.astype(values.dtype.newbyteorder(">")).view(np.uint8)
    if bits < 8:
        return _pack_small(values, bits)
    parts = []
    for start in range(0, values.size, _PACK_STEP):
        chunk = values[start : start + _PACK_STEP]
        bit_matrix = np.empty((chunk.size, bits), dtype=np.uint8)
        # One vectorised pass per bit position: a loop over bits, never over ids.
        for column in range(bits):
            np.bitwise_and(
                chunk >> (bits - 1 - column), 1, out=bit_matrix[:, column], casting="unsafe"
            )
        parts.append(np.packbits(bit_matrix))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)


def _unpack_bits(
    packed: Bytes, count: int, bits: int, dtype: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    """Inverse of `_pack_bits`: `count` values of `dtype`."""
    if bits == 8 * dtype.itemsize:
        return packed.view(dtype.newbyteorder(">")).astype(dtype)
    if bits < 8:
        return _unpack_small(packed, count, bits).astype(dtype, copy=False)
    values = np.empty(count, dtype=dtype)
    step_bytes = _PACK_STEP * bits // 8
    for step, start in enumerate(range(0, count, _PACK_STEP)):
        size = min(_PACK_STEP, count - start)
        chunk = packed[step * step_bytes : (step + 1) * step_bytes]
        bit_matrix = np.unpackbits(chunk, count=size * bits).reshape(size, bits)
        value = np.zeros(size, dtype=dtype)
        for column in range(bits):
            value <<= 1
            value |= bit_matrix[:, column]
        values[start : start + size] = value
    return values


# Below 8 bits, every 8 values fill exactly `bits` bytes: one group, which fits a 64-bit
# word. Packing and unpacking are then a few shifts per group instead of one pass per
# bit; the stream is the same (most significant bit first).
_GROUPS_PER_STEP = 1 << 16


def _pack_small(values: np.ndarray[Any, Any], bits: int) -> Bytes:
    count = values.size
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = values
    lanes = padded.reshape(groups, 8)
    out = np.empty((groups, bits), dtype=np.uint8)
    for start in range(0, groups, _GROUPS_PER_STEP):
        lane = lanes[start : start + _GROUPS_PER_STEP]
        word = np.zeros(lane.shape[0], dtype=np.uint64)
        for j in range(8):  # value j of a group sits at bits (7 - j) * bits upward
            word |= lane[:, j] << np.uint64((7 - j) * bits)
        as_bytes = word.astype(">u8").view(np.uint8).reshape(-1, 8)
        out[start : start + _GROUPS_PER_STEP] = as_bytes[:, 8 - bits :]
    return out.reshape(-1)[: -(-count * bits // 8)]


def _unpack_small(packed: Bytes, count: int, bits: int) -> np.ndarray[Any, Any]:
    groups = -(-count // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)  # whole groups: the tail zero-filled
    stream[: packed.size] = packed
    window = np.zeros((groups, 8), dtype=np.uint8)
    window[:, 8 - bits :] = stream.reshape(groups, bits)
    out = np.empty((groups, 8), dtype=np.uint8)
    lowest = np.uint64((1 << bits) - 1)
    for start in range(0, groups, _GROUPS_PER_STEP):
        word = window[start : start + _GROUPS_PER_STEP].view(">u8").reshape(-1).astype(np.uint64)
        for j in range(8):
            out[start : start + _GROUPS_PER_STEP, j] = (word >> np.uint64((7 - j) * bits)) & lowest
    return out.reshape(-1)[:count]


def sequence_crc(ids: Bytes, mask: Bytes, tokens: Bytes | None) -> int:
    """zlib.crc32 over a sequence's experts, routed and tokens bytes (C-contiguous)."""
    crc = zlib.crc32(mask.data, zlib.crc32(ids.data))
    return crc if tokens is None else zlib.crc32(tokens.data, crc)


def block_crcs(
    codec: Codec, tokens: int, ids: Bytes, mask: Bytes, token_bytes: Bytes | None, block: int
) -> npt.NDArray[np.uint32]:
    """`sequence_crc` of each block of `block` tokens of a run of `tokens` tokens whose
    bytes are `ids`, `mask` and `token_bytes` (from a block boundary; the last block
    partial, up to the ends of the bytes). `[ceil(tokens / block)]`."""
    id_step, mask_step = codec.id_bytes(block), codec.mask_bytes(block)
    # memoryview slices: a tenth of a numpy slice's cost, on up to 30K blocks a step.
    id_view, mask_view = ids.data.cast("B"), mask.data.cast("B")
    token_view = None if token_bytes is None else token_bytes.data.cast("B")
    crcs = np.empty(-(-tokens // block), dtype=np.uint32)
    for b in range(crcs.size):
        crc = zlib.crc32(
            mask_view[b * mask_step : (b + 1) * mask_step],
            zlib.crc32(id_view[b * id_step : (b + 1) * id_step]),
        )
        if token_view is not None:
            crc = zlib.crc32(token_view[4 * b * block : 4 * (b + 1) * block], crc)
        crcs[b] = crc
    return crcs
