"""Trace files: the routes of many sequences in one safetensors file.

Rollouts stream in one sequence at a time (`TraceWriter.append`); the trainer reads
one sequence at a time (`TraceFile.trace(i)`), touching only that sequence's bytes.

Format, version 1. A safetensors file (8-byte little-endian header length, JSON
header, tensor bytes) whose `__metadata__` carries everything needed to read it:

    format            "routereplay.trace"
    format_version    "1"
    num_layers        decoder layers of the model, e.g. "61"
    moe_layers        JSON list of the routed (global, 0-based) decoder layers: the
                      layer axis of every stored sequence, e.g. "[3, 4, ..., 60]"
    mtp_layers        JSON list of routed MTP layers of the model (not stored)
    num_experts       routed experts per layer
    top_k             experts per token and layer
    source            who recorded the routes ("vllm", "sglang", "recorded", ...)
    encoding          "compact" or "packed"
    bits_per_id       8, 16 or 32 for compact; ceil(log2(num_experts)) for packed
    num_sequences     S
    num_tokens        T, summed over all sequences
    offsets_crc32     zlib.crc32 of the `offsets` tensor's bytes
    checksums_crc32   zlib.crc32 of the `checksums` tensor's bytes

Tensors, in file order (L = len(moe_layers), k = top_k):

    offsets    I64 [S + 1]   token offsets: sequence i is tokens offsets[i]:offsets[i+1]
    checksums  U32 [S]       zlib.crc32 of sequence i's experts, routed and tokens bytes
    tokens     I32 [T]       token ids, only when every appended sequence gave them
    experts    compact: U8 / U16 / U32 [T, L, k] (up to 256 / 65536 / more experts)
               packed:  U8 [bytes], each sequence's T_i*L*k ids at bits_per_id bits,
                        most significant bit first, zero-padded to a whole byte
    routed     U8 [bytes]    each sequence's `[T_i, L]` routed mask, np.packbits,
                             zero-padded to a whole byte; 0 = no route (-1 row)

Ids of -1 rows are stored as 0: with 256 experts every 8-bit value is an expert, so
"no route" lives in the mask. The mask and the packed ids are padded per sequence so
that each sequence's bytes can be read alone; their byte offsets follow from
`offsets`. Reading is strict: a wrong length, a checksum or a key that does not
match is an error naming the file, never a guess.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError, safe_open

from routereplay.errors import LayoutError, RouteReplayError, TraceError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.trace import NO_ROUTE, RoutingTrace

FORMAT = "routereplay.trace"
FORMAT_VERSION = 1

Encoding = Literal["compact", "packed"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)

Bytes = npt.NDArray[np.uint8]
TokenIds = torch.Tensor | np.ndarray[Any, Any] | Sequence[int]

# Per appended sequence, the spill file holds this record header (tokens, crc32),
# then the sequence's experts, routed and tokens bytes exactly as the final file will.
_RECORD = struct.Struct("<QI")
_RECORD_SECTIONS = ("experts", "routed", "tokens")
# Ids per bit-packing step: bounds the temporary bit matrix; a multiple of 8, so that
# every step but the last ends on a byte boundary and steps concatenate exactly.
_PACK_STEP = 1 << 20


class TraceFileError(RouteReplayError):
    """A trace file that cannot be read (damaged, truncated, foreign) or written."""


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


class _Codec:
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
        # Decoded ids go to RoutingTrace in a dtype that can also hold `num_experts`
        # itself: its range check compares against that number in the tensor's dtype
        # (int8 ids of 128 experts are refused as out of range).
        self.trace_dtype = np.dtype(
            next(t for t in (np.int8, np.int16, np.int32) if num_experts <= np.iinfo(t).max)
        )

    def id_bytes(self, tokens: int) -> int:
        return -(-tokens * self.num_layers * self.top_k * self.bits // 8)

    def mask_bytes(self, tokens: int) -> int:
        return -(-tokens * self.num_layers // 8)

    def encode(self, experts: np.ndarray[Any, Any]) -> tuple[Bytes, Bytes]:
        """`experts [tokens, layers, top_k]` with -1 rows -> (id bytes, routed mask bytes)."""
        routed = experts[..., 0] != NO_ROUTE
        ids = experts.astype(self.id_dtype)
        ids[~routed] = 0
        if self.encoding == "packed":
            return _pack_bits(ids.reshape(-1), self.bits), np.packbits(routed.reshape(-1))
        return ids.reshape(-1).view(np.uint8), np.packbits(routed.reshape(-1))

    def decode(self, ids: Bytes, mask: Bytes, tokens: int) -> np.ndarray[Any, Any]:
        """Inverse of `encode`: signed `[tokens, layers, top_k]` with -1 rows."""
        count = tokens * self.num_layers * self.top_k
        if self.encoding == "packed":
            values = _unpack_bits(ids, count, self.bits, self.id_dtype)
        else:
            values = ids.view(self.id_dtype)
        experts = values.astype(self.trace_dtype).reshape(tokens, self.num_layers, self.top_k)
        routed = np.unpackbits(mask, count=tokens * self.num_layers).reshape(
            tokens, self.num_layers
        )
        experts[routed == 0] = NO_ROUTE
        return experts


def _pack_bits(values: np.ndarray[Any, Any], bits: int) -> Bytes:
    """Unsigned `values [n]` at `bits` bits each, most significant bit first."""
    if bits == 8 * values.dtype.itemsize:
        return values.astype(values.dtype.newbyteorder(">")).view(np.uint8)
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


def _sequence_crc(ids: Bytes, mask: Bytes, tokens: Bytes | None) -> int:
    """zlib.crc32 over a sequence's experts, routed and tokens bytes (C-contiguous)."""
    crc = zlib.crc32(mask.data, zlib.crc32(ids.data))
    return crc if tokens is None else zlib.crc32(tokens.data, crc)


# -- the container ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    sequences: int
    tokens: int
    id_bytes: int
    mask_bytes: int
    has_tokens: bool


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    nbytes: int


def _tensor_specs(codec: _Codec, sizes: _Sizes) -> list[_TensorSpec]:
    """The tensors of a trace file, in file order (widest alignment first)."""
    specs = [
        _TensorSpec("offsets", "I64", (sizes.sequences + 1,), 8 * (sizes.sequences + 1)),
        _TensorSpec("checksums", "U32", (sizes.sequences,), 4 * sizes.sequences),
    ]
    if sizes.has_tokens:
        specs.append(_TensorSpec("tokens", "I32", (sizes.tokens,), 4 * sizes.tokens))
    if codec.encoding == "compact":
        width = codec.id_dtype.itemsize
        shape = (sizes.tokens, codec.num_layers, codec.top_k)
        specs.append(_TensorSpec("experts", f"U{8 * width}", shape, sizes.id_bytes))
    else:
        specs.append(_TensorSpec("experts", "U8", (sizes.id_bytes,), sizes.id_bytes))
    specs.append(_TensorSpec("routed", "U8", (sizes.mask_bytes,), sizes.mask_bytes))
    return specs


def _safetensors_header(specs: list[_TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `specs`, in order.

    `safetensors.numpy.save_file` wants every tensor in memory at once; writing the
    header ourselves lets the writer stream sequences from its spill file instead.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    start = 0
    for spec in specs:
        end = start + spec.nbytes
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [start, end],
        }
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors does: tensor data starts 8-aligned
    return struct.pack("<Q", len(text)) + text


# -- writing ---------------------------------------------------------------------------


class TraceWriter:
    """Write sequences' routes to a trace file as they arrive.

    Appended sequences go to a spill file next to the target (`PATH.partial`), so
    memory stays flat however many sequences arrive. `close()` writes the trace file
    to a temporary name and renames it into place: `path` is either the complete new
    file or whatever was there before. Leaving a `with` block by an exception
    discards everything (`discard()`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: MoELayout,
        *,
        source: str = "recorded",
        encoding: Encoding = "compact",
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self.source = source
        self.encoding: Encoding = encoding
        self._codec = _Codec(encoding, layout.num_experts, len(layout.moe_layers), layout.top_k)
        self.spill_path = self.path.with_name(self.path.name + ".partial")
        try:
            self._spill: IO[bytes] | None = open(self.spill_path, "x+b")  # noqa: SIM115
        except FileExistsError:
            raise TraceFileError(
                f"{self.spill_path} exists: another TraceWriter is writing {self.path}, or "
                "one was interrupted. Remove it if no writer is running."
            ) from None
        self._sequences = 0
        self._tokens = 0
        self._id_bytes = 0
        self._mask_bytes = 0
        self._has_tokens: bool | None = None  # decided by the first append
        self._offsets_crc = zlib.crc32(struct.pack("<q", 0))
        self._checksums_crc = zlib.crc32(b"")

    def __len__(self) -> int:
        return self._sequences

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def append(self, trace: RoutingTrace, tokens: TokenIds | None = None) -> None:
        """Add one sequence: `trace [tokens, moe_layers, top_k]`, `tokens [tokens]` ids.

        Token ids are optional, but a file holds them for every sequence or for none.
        """
        spill = self._open_spill()
        experts = self._check_trace(trace)
        token_ids = self._check_tokens(tokens, len(experts))
        ids, mask = self._codec.encode(experts)
        token_bytes = None if token_ids is None else token_ids.view(np.uint8)
        crc = _sequence_crc(ids, mask, token_bytes)
        try:
            spill.write(_RECORD.pack(len(experts), crc))
            spill.write(ids.tobytes())
            spill.write(mask.tobytes())
            if token_bytes is not None:
                spill.write(token_bytes.tobytes())
        except BaseException:
            # A half-written record would misplace every later one.
            self.discard()
            raise
        self._sequences += 1
        self._tokens += len(experts)
        self._id_bytes += len(ids)
        self._mask_bytes += len(mask)
        self._has_tokens = token_ids is not None
        self._offsets_crc = zlib.crc32(struct.pack("<q", self._tokens), self._offsets_crc)
        self._checksums_crc = zlib.crc32(struct.pack("<I", crc), self._checksums_crc)

    def close(self) -> None:
        """Write the trace file (atomically) and remove the spill file. Idempotent."""
        if self._spill is None:
            return
        # Unique while this writer holds the spill file; open() honours the umask,
        # which tempfile.mkstemp (mode 0600) would not.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "xb") as out:
                self._write_file(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            self.discard()
            raise
        self.discard()

    def discard(self) -> None:
        """Drop everything appended: remove the spill file, write no trace file."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
            self.spill_path.unlink(missing_ok=True)

    # -- internals --------------------------------------------------------------------

    def _open_spill(self) -> IO[bytes]:
        if self._spill is None:
            raise TraceFileError(f"The TraceWriter of {self.path} is closed; open a new one.")
        return self._spill

    def _check_trace(self, trace: RoutingTrace) -> np.ndarray[Any, Any]:
        where = f"Sequence {self._sequences} appended to {self.path}"
        if not isinstance(trace, RoutingTrace):
            raise TraceError(
                f"{where} is a {type(trace).__name__}, not a RoutingTrace: build one with "
                "RoutingTrace.from_all_layers(engine_array, layout, source=...)."
            )
        try:
            trace.check_layout(self.layout)
        except TraceError as error:
            raise TraceError(f"{where}: {error}") from None
        if trace.layers != self.layout.moe_layers:
            missing = [i for i in self.layout.moe_layers if i not in trace.layers]
            extra = [i for i in trace.layers if i not in self.layout.moe_layers]
            problems = [f"lacks routed layers {_short(missing)}"] if missing else []
            if extra:
                problems.append(
                    f"holds MTP layers {_short(extra)}, which trace files do not store "
                    "(append trace.select_layers(layout.moe_layers))"
                )
            raise TraceError(
                f"{where} {' and '.join(problems)}; a trace file stores every routed layer "
                f"{_short(self.layout.moe_layers)} of each sequence."
            )
        if len(trace.leading_shape) != 1:
            raise TraceError(
                f"{where} has token axes {list(trace.leading_shape)}; append one sequence "
                "at a time, shaped [tokens, layers, top_k] (for a batch: "
                "RoutingTrace(trace.expert_ids()[b], trace.layers, trace.num_experts) per row b)."
            )
        experts: np.ndarray[Any, Any] = trace.experts.detach().cpu().numpy()
        return experts

    def _check_tokens(self, tokens: TokenIds | None, count: int) -> npt.NDArray[np.int32] | None:
        where = f"Sequence {self._sequences} appended to {self.path}"
        given = tokens is not None
        if self._has_tokens is not None and given != self._has_tokens:
            had = "gave" if self._has_tokens else "gave no"
            raise TraceError(
                f"{where} {'gives' if given else 'gives no'} token ids, but the sequences "
                f"before it {had} token ids: a trace file holds token ids for every "
                "sequence or for none."
            )
        if tokens is None:
            return None
        array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        array = np.asarray(array)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TraceError(f"{where}: token ids must be integers, found dtype {array.dtype}.")
        if array.shape != (count,):
            raise TraceError(
                f"{where}: token ids have shape {list(array.shape)}, the trace [{count}] tokens."
            )
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise TraceError(
                f"{where}: token ids must fit int32, found {array.min()}..{array.max()}."
            )
        return array.astype("<i4")

    def _metadata(self) -> dict[str, str]:
        fingerprint = self.layout.fingerprint
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "num_layers": str(fingerprint["num_layers"]),
            "moe_layers": json.dumps(fingerprint["moe_layers"]),
            "mtp_layers": json.dumps(fingerprint["mtp_layers"]),
            "num_experts": str(fingerprint["num_experts"]),
            "top_k": str(fingerprint["top_k"]),
            "source": self.source,
            "encoding": self.encoding,
            "bits_per_id": str(self._codec.bits),
            "num_sequences": str(self._sequences),
            "num_tokens": str(self._tokens),
            "offsets_crc32": str(self._offsets_crc),
            "checksums_crc32": str(self._checksums_crc),
        }

    def _sizes(self) -> _Sizes:
        return _Sizes(
            self._sequences, self._tokens, self._id_bytes, self._mask_bytes, bool(self._has_tokens)
        )

    def _write_file(self, out: IO[bytes]) -> None:
        specs = _tensor_specs(self._codec, self._sizes())
        out.write(_safetensors_header(specs, self._metadata()))
        for spec in specs:
            if spec.name == "offsets":
                out.write(struct.pack("<q", 0))
                total = 0
                for tokens, _, _ in self._records():
                    total += tokens
                    out.write(struct.pack("<q", total))
            elif spec.name == "checksums":
                for _, crc, _ in self._records():
                    out.write(struct.pack("<I", crc))
            else:
                # Copied sequence by sequence: memory holds one sequence at a time.
                spill = self._open_spill()
                for tokens, _, start in self._records():
                    offset, size = self._span(spec.name, tokens)
                    spill.seek(start + offset)
                    out.write(spill.read(size))

    def _records(self) -> Iterator[tuple[int, int, int]]:
        """(tokens, crc32, payload position) of every record in the spill file."""
        spill = self._open_spill()
        spill.flush()
        position = 0
        for _ in range(self._sequences):
            spill.seek(position)
            tokens, crc = _RECORD.unpack(spill.read(_RECORD.size))
            start = position + _RECORD.size
            yield tokens, crc, start
            position = start + sum(self._span(name, tokens)[1] for name in _RECORD_SECTIONS)

    def _span(self, section: str, tokens: int) -> tuple[int, int]:
        """(offset in a record's payload, size) of one section of a sequence."""
        ids, mask = self._codec.id_bytes(tokens), self._codec.mask_bytes(tokens)
        token_bytes = 4 * tokens if self._has_tokens else 0
        spans = {"experts": (0, ids), "routed": (ids, mask), "tokens": (ids + mask, token_bytes)}
        return spans[section]


# -- reading ---------------------------------------------------------------------------


class TraceFile:
    """A trace file opened for reading one sequence at a time.

    Opening reads and checks the header and the index (`offsets`, `checksums`);
    `trace(i)` and `tokens(i)` read only sequence i's bytes and verify its checksum.
    """

    source: str
    encoding: str

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{self.path} {what}: no trace file to read.")
        try:
            self._handle: Any = _open_safetensors(self.path)
        except SafetensorError as error:
            raise TraceFileError(
                f"{self.path} is not a readable trace file: {_why_unreadable(self.path, error)}."
            ) from None
        try:
            self._read_index(self._handle.metadata() or {})
        except BaseException:
            self.close()
            raise

    # -- what the file holds ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __iter__(self) -> Iterator[RoutingTrace]:
        for index in range(len(self)):
            yield self.trace(index)

    @property
    def layout_fingerprint(self) -> dict[str, Any]:
        """The model the routes were recorded on, as `MoELayout.fingerprint`."""
        return self._layout.fingerprint

    @property
    def layers(self) -> tuple[int, ...]:
        """The global routed layers on every stored trace's layer axis."""
        return self._layout.moe_layers

    @property
    def num_experts(self) -> int:
        return self._layout.num_experts

    @property
    def top_k(self) -> int:
        return self._layout.top_k

    @property
    def bits_per_id(self) -> int:
        return self._codec.bits

    @property
    def has_tokens(self) -> bool:
        return self._has_tokens

    @property
    def total_tokens(self) -> int:
        return int(self._offsets[-1])

    def num_tokens(self, index: int) -> int:
        index = self._index(index)
        return int(self._offsets[index + 1] - self._offsets[index])

    def trace(self, index: int) -> RoutingTrace:
        """Sequence `index`'s routes: `experts [tokens, layers, top_k]`, -1 rows kept."""
        index = self._index(index)
        ids, mask, _ = self._read_sequence(index)
        experts = self._codec.decode(ids, mask, self.num_tokens(index))
        try:
            return RoutingTrace(
                torch.from_numpy(experts), self.layers, self.num_experts, self.source
            )
        except TraceError as error:
            raise TraceFileError(
                f"{self.path}: sequence {index} passed its checksum but is not a valid trace "
                f"(was it written by another tool?): {error}"
            ) from None

    def tokens(self, index: int) -> torch.Tensor:
        """Sequence `index`'s token ids: int32 `[tokens]`."""
        index = self._index(index)
        _, _, token_ids = self._read_sequence(index)
        if token_ids is None:
            raise TraceFileError(
                f"{self.path} holds no token ids: none were given to TraceWriter.append."
            )
        return torch.from_numpy(token_ids.view("<i4").copy())

    def check_layout(self, layout: MoELayout) -> None:
        """Raise unless the routes were recorded on a model of `layout`, naming each field
        that differs."""
        ours = self._layout
        differ = [
            name for name in _FINGERPRINT_WORDS if getattr(ours, name) != getattr(layout, name)
        ]
        if differ:
            raise TraceFileError(
                f"{self.path} was recorded on another model: file: {_describe(ours, differ)}; "
                f"model ({layout.family}): {_describe(layout, differ)}."
            )

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TraceFile({str(self.path)!r}, sequences={len(self)}, tokens={self.total_tokens}, "
            f"layers={_short(self.layers)}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"source={self.source!r}, encoding={self.encoding!r})"
        )

    # -- internals --------------------------------------------------------------------

    def _damaged(self, what: str) -> TraceFileError:
        return TraceFileError(f"{self.path} is a damaged trace file: {what}.")

    def _read_index(self, metadata: dict[str, str]) -> None:
        """Parse the header, then check every tensor's dtype and shape and the index."""
        found = metadata.get("format")
        if found != FORMAT:
            raise TraceFileError(
                f"{self.path} is a safetensors file but not a routereplay trace file: its "
                f"metadata has format={found!r}, not {FORMAT!r} (tensors: "
                f"{', '.join(sorted(self._handle.keys())[:6]) or 'none'})."
            )
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise TraceFileError(
                f"{self.path} is trace format version {version}; this routereplay reads "
                f"version {FORMAT_VERSION} only. Read it with the routereplay that wrote it."
            )
        fields = _HeaderFields(metadata, self._damaged)
        try:
            self._layout = MoELayout(
                num_layers=fields.integer("num_layers"),
                moe_layers=fields.integers("moe_layers"),
                num_experts=fields.integer("num_experts"),
                top_k=fields.integer("top_k"),
                mtp_layers=fields.integers("mtp_layers"),
                family="trace file",
            )
        except LayoutError as error:
            raise self._damaged(f"its layout is impossible: {error}") from None
        self.source = fields.text("source")
        encoding = fields.text("encoding")
        if encoding not in ENCODINGS:
            raise self._damaged(f"encoding {encoding!r} is none of {', '.join(ENCODINGS)}")
        self.encoding = encoding
        self._codec = _Codec(encoding, self.num_experts, len(self.layers), self.top_k)
        if fields.integer("bits_per_id") != self._codec.bits:
            raise self._damaged(
                f"bits_per_id is {fields.integer('bits_per_id')}, but {encoding} ids of "
                f"{self.num_experts} experts take {self._codec.bits}"
            )

        sequences, tokens = fields.integer("num_sequences"), fields.integer("num_tokens")
        names = set(self._handle.keys())
        self._has_tokens = "tokens" in names
        self._check_tensor(_TensorSpec("offsets", "I64", (sequences + 1,), 0))
        offsets = self._handle.get_tensor("offsets")
        self._check_crc("offsets", offsets, fields.integer("offsets_crc32"))
        counts = np.diff(offsets)
        if offsets[0] != 0 or (counts < 0).any() or offsets[-1] != tokens:
            raise self._damaged(
                f"the token offsets must rise from 0 to num_tokens={tokens}, found "
                f"{offsets[:3].tolist()} ... {offsets[-1]}"
            )
        id_bytes = (counts * len(self.layers) * self.top_k * self._codec.bits + 7) // 8
        mask_bytes = (counts * len(self.layers) + 7) // 8
        self._offsets = offsets
        self._id_starts = np.concatenate([[0], np.cumsum(id_bytes)])
        self._mask_starts = np.concatenate([[0], np.cumsum(mask_bytes)])
        sizes = _Sizes(
            sequences,
            tokens,
            int(self._id_starts[-1]),
            int(self._mask_starts[-1]),
            self._has_tokens,
        )
        specs = _tensor_specs(self._codec, sizes)
        expected = {spec.name for spec in specs}
        if names != expected:
            raise self._damaged(f"it holds tensors {sorted(names)}, expected {sorted(expected)}")
        for spec in specs:
            self._check_tensor(spec)
        self._checksums = self._handle.get_tensor("checksums")
        self._check_crc("checksums", self._checksums, fields.integer("checksums_crc32"))

    def _check_tensor(self, spec: _TensorSpec) -> None:
        if spec.name not in self._handle.keys():  # noqa: SIM118 (not a dict)
            raise self._damaged(f"it has no {spec.name!r} tensor")
        view = self._handle.get_slice(spec.name)
        dtype, shape = view.get_dtype(), tuple(view.get_shape())
        if (dtype, shape) != (spec.dtype, spec.shape):
            raise self._damaged(
                f"tensor {spec.name!r} is {dtype} {list(shape)}, the header implies "
                f"{spec.dtype} {list(spec.shape)}"
            )

    def _check_crc(self, name: str, values: np.ndarray[Any, Any], expected: int) -> None:
        found = zlib.crc32(np.ascontiguousarray(values).data)
        if found != expected:
            raise self._damaged(
                f"the {name!r} tensor has checksum {found:08x}, its header says {expected:08x}"
            )

    def _index(self, index: int) -> int:
        if self._handle is None:
            raise TraceFileError(f"{self.path} is closed; open it again with TraceFile(path).")
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"{self.path} holds {count} sequences; there is no sequence {index}.")
        return index % count

    def _read_sequence(self, index: int) -> tuple[Bytes, Bytes, Bytes | None]:
        """Sequence `index`'s experts, routed and tokens bytes, checksum verified."""
        t0, t1 = int(self._offsets[index]), int(self._offsets[index + 1])
        if self.encoding == "compact":
            ids = self._slice("experts", t0, t1).reshape(-1).view(np.uint8)
        else:
            ids = self._slice(
                "experts", int(self._id_starts[index]), int(self._id_starts[index + 1])
            )
        mask = self._slice(
            "routed", int(self._mask_starts[index]), int(self._mask_starts[index + 1])
        )
        token_ids = self._slice("tokens", t0, t1).view(np.uint8) if self._has_tokens else None
        found, expected = _sequence_crc(ids, mask, token_ids), int(self._checksums[index])
        if found != expected:
            raise TraceFileError(
                f"{self.path}: sequence {index} is damaged: its bytes have checksum "
                f"{found:08x}, the index says {expected:08x}. The file changed after it was "
                "written; the other sequences can still be read."
            )
        return ids, mask, token_ids

    def _slice(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Rows `start:stop` of one tensor, read lazily (only those bytes)."""
        view = self._handle.get_slice(name)
        if start == stop:
            # safetensors refuses even an empty slice of an empty axis.
            shape = [0, *view.get_shape()[1:]]
            return np.empty(shape, dtype=_NUMPY_DTYPES[view.get_dtype()])
        return np.ascontiguousarray(view[start:stop])


def _open_safetensors(path: Path) -> Any:
    """A lazy safetensors handle: tensors are read on demand, slice by slice."""
    return safe_open(str(path), framework="numpy")


_NUMPY_DTYPES = {"U8": "<u1", "U16": "<u2", "U32": "<u4", "I32": "<i4", "I64": "<i8"}


class _HeaderFields:
    """Typed reads of a trace file's metadata; a missing or malformed key is damage."""

    def __init__(self, metadata: dict[str, str], damaged: Any) -> None:
        self._metadata = metadata
        self._damaged = damaged

    def text(self, key: str) -> str:
        if key not in self._metadata:
            raise self._damaged(f"its header lacks the metadata key {key!r}")
        return self._metadata[key]

    def integer(self, key: str) -> int:
        value = self.text(key)
        try:
            return int(value)
        except ValueError:
            raise self._damaged(f"metadata {key}={value!r} is not an integer") from None

    def integers(self, key: str) -> tuple[int, ...]:
        value = self.text(key)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(type(i) is int for i in parsed):
            raise self._damaged(f"metadata {key}={value!r} is not a JSON list of integers")
        return tuple(parsed)


_FINGERPRINT_WORDS = {
    "num_layers": "{} layers",
    "moe_layers": "routed {}",
    "mtp_layers": "MTP {}",
    "num_experts": "{} experts",
    "top_k": "top_k={}",
}


def _describe(layout: MoELayout, fields: list[str]) -> str:
    """'61 layers, routed 3..60' for the named fingerprint fields of `layout`."""
    words = []
    for name in fields:
        value = getattr(layout, name)
        shown = (_layer_range(value) or "none") if isinstance(value, tuple) else value
        words.append(_FINGERPRINT_WORDS[name].format(shown))
    return ", ".join(words)


def _layer_range(layers: Sequence[int]) -> str:
    """'3..60' for a contiguous run, else the ids."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return _short(layers) if layers else ""


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file safetensors refused, in words a user can act on."""
    size = path.stat().st_size
    if size < 8:
        return (
            f"it is {size} bytes long, shorter than the 8-byte header length a trace file "
            "starts with (truncated?)"
        )
    with path.open("rb") as file:
        header_bytes = struct.unpack("<Q", file.read(8))[0]
        first = file.read(1)
        if first not in (b"{", b""):
            return "it does not start with a safetensors header"
        if 8 + header_bytes > size:
            return (
                f"its header ends at byte {8 + header_bytes} but the file has {size} bytes: "
                "it is truncated"
            )
        file.seek(8)
        try:
            header = json.loads(file.read(header_bytes))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return f"its safetensors header is not valid JSON ({error})"
    expected = 8 + header_bytes + end
    if expected > size:
        return f"its tensors end at byte {expected} but the file has {size} bytes: it is truncated"
    if expected < size:
        return f"{size - expected} bytes follow its last tensor"
    return f"safetensors refuses it ({error})"
