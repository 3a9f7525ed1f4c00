"""Reading trace files: `TraceFile` checks the header and index on open, then reads
and verifies one sequence at a time."""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from routereplay.errors import TraceError, TraceFileError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout
from routereplay.store.codec import Bytes, block_crcs, sequence_crc
from routereplay.store.container import (
    FINGERPRINT_WORDS,
    NUMPY_DTYPES,
    describe,
    why_unreadable,
)
from routereplay.store.index import FileIndex
from routereplay.trace import RoutingTrace


class TraceFile:
    """A trace file opened for reading one sequence at a time.

    Opening reads and checks the header and the index (`offsets`, `checksums`);
    `trace(i)` and `tokens(i)` read only sequence i's bytes and verify its checksum
    and its ids' range. The rows' form (all -1 or distinct ids) is the writer's
    guarantee, which the checksum carries: `verify_rows=True` scans them again too,
    for files from another tool (about twice the read time).
    """

    source: str
    encoding: str

    def __init__(self, path: str | os.PathLike[str], *, verify_rows: bool = False) -> None:
        self.path = Path(path)
        self.verify_rows = verify_rows
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{self.path} {what}: no trace file to read.")
        # Our descriptor first, then safetensors by name; if a writer's atomic rename
        # landed in between, they would read two files: open again.
        for _ in range(3):
            self._file = self.path.open("rb")
            try:
                self._handle: Any = _open_safetensors(self.path)
            except SafetensorError as error:
                self._file.close()
                raise TraceFileError(
                    f"{self.path} is not a readable trace file: {why_unreadable(self.path, error)}."
                ) from None
            if os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path)):
                break
            self._handle.__exit__(None, None, None)
            self._file.close()
        weakref.finalize(self, self._file.close)
        try:
            self._ix = FileIndex(self._handle, self.path)
            self.source, self.encoding = self._ix.source, self._ix.encoding
            # Sequences are read with pread from that descriptor, not through the memory
            # map: a file truncated under an open reader then gives a short read, which
            # is an error, where a mapped page past the end would kill the process (SIGBUS).
            self._placement = _tensor_placement(self._file)
        except BaseException:
            self.close()
            raise

    # -- what the file holds ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ix.offsets) - 1

    def __iter__(self) -> Iterator[RoutingTrace]:
        for index in range(len(self)):
            yield self.trace(index)

    @property
    def layout_fingerprint(self) -> dict[str, Any]:
        """The model the routes were recorded on, as `MoELayout.fingerprint`."""
        return self._ix.layout.fingerprint

    @property
    def layers(self) -> tuple[int, ...]:
        """The global routed layers on every stored trace's layer axis."""
        return self._ix.layout.moe_layers

    @property
    def num_experts(self) -> int:
        """Experts per routed layer of the model the routes were recorded on."""
        return self._ix.layout.num_experts

    @property
    def top_k(self) -> int:
        """Experts per (token, layer)."""
        return self._ix.layout.top_k

    @property
    def bits_per_id(self) -> int:
        """Bits each stored id takes: 8, 16 or 32 (compact), ceil(log2 experts) (packed)."""
        return self._ix.codec.bits

    @property
    def has_tokens(self) -> bool:
        """Whether the file holds every sequence's token ids."""
        return self._ix.has_tokens

    @property
    def total_tokens(self) -> int:
        """Tokens over all sequences."""
        return int(self._ix.offsets[-1])

    def num_tokens(self, index: int) -> int:
        """Tokens of sequence `index`."""
        index = self._index(index)
        tokens = self._ix.starts[0]
        return tokens[index + 1] - tokens[index]

    def trace(self, index: int, start: int = 0, stop: int | None = None) -> RoutingTrace:
        """Sequence `index`'s routes: `experts [tokens, layers, top_k]`, -1 rows kept, with
        its token ids when the file holds them.

        `start`, `stop`: its tokens `start .. stop - 1` only, `[stop - start, layers,
        top_k]`. A version 3 file reads and verifies only the checksummed blocks of
        `block_tokens` tokens that hold them; older files read the whole sequence.
        """
        index = self._index(index)
        start, stop = self._token_range(index, start, stop)
        ids, mask, token_ids, first, last = self._read_rows(index, start, stop)
        experts = self._ix.codec.decode(ids, mask, last - first)[start - first : stop - first]
        # The token ids were read for the checksum anyway: the trace knows its tokens.
        if token_ids is not None:
            token_ids = token_ids.view("<i4")[start - first : stop - first]
        tokens = None if token_ids is None else torch.from_numpy(token_ids.copy())
        try:
            if experts.dtype != self._ix.codec.storage_dtype:  # an id beyond num_experts
                return RoutingTrace(
                    torch.from_numpy(experts), self.layers, self.num_experts, self.source, tokens
                )
            trace = RoutingTrace.from_verified_rows(
                torch.from_numpy(experts), self.layers, self.num_experts, self.source, tokens
            )
            if self.verify_rows:
                trace.validate()
            return trace
        except TraceError as error:
            # The trace's rows count from `start`: say so, or "token 5" names another token.
            what = f"sequence {index} passed its checksum but is"
            if start:
                what = (
                    f"sequence {index}'s tokens {start}..{stop - 1} (rows counted from token "
                    f"{start}) passed their checksum but are"
                )
            raise TraceFileError(
                f"{self.path}: {what} not a valid trace (was it written by another tool?): {error}"
            ) from None

    @property
    def has_prompt_lens(self) -> bool:
        """Whether the file holds every sequence's prompt length (format 2)."""
        return self._ix.prompt_lens is not None

    @property
    def has_sequence_ids(self) -> bool:
        """Whether the file holds every sequence's unique id (format 2)."""
        return self._ix.sequence_ids is not None

    def prompt_len(self, index: int) -> int:
        """Sequence `index`'s prompt length: its tokens before the completion."""
        index = self._index(index)
        if self._ix.prompt_lens is None:
            raise TraceFileError(
                f"{self.path} holds no prompt lengths: none were given to TraceWriter.append."
            )
        return int(self._ix.prompt_lens[index])

    def sequence_id(self, index: int) -> str:
        """Sequence `index`'s id: the engine's request id and choice, or a user's uid."""
        index = self._index(index)
        if self._ix.sequence_ids is None:
            raise TraceFileError(
                f"{self.path} holds no sequence ids: none were given to TraceWriter.append."
            )
        return self._ix.sequence_ids[index]

    def index_of(self, sequence_id: str) -> int:
        """The index of the sequence named `sequence_id`."""
        if self._handle is None:
            raise TraceFileError(f"{self.path} is closed; open it again with TraceFile(path).")
        if self._ix.sequence_ids is None:
            raise TraceFileError(f"{self.path} holds no sequence ids to look {sequence_id!r} up.")
        if not isinstance(sequence_id, str) or sequence_id not in self._ix.index_of:
            raise TraceFileError(f"{self.path} holds no sequence with id {sequence_id!r}.")
        return self._ix.index_of[sequence_id]

    def rollout(self, index: int) -> Rollout:
        """Sequence `index` as a `Rollout`: its token ids split at its prompt length, its
        routes and id. Needs a file written with token ids and prompt lengths."""
        tokens, prompt_len = self.tokens(index).long(), self.prompt_len(index)
        return Rollout(
            prompt_ids=tokens[:prompt_len],
            completion_ids=tokens[prompt_len:],
            routes=self.trace(index),
            sequence_id=self.sequence_id(index) if self.has_sequence_ids else None,
        )

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
        """Raise unless the routes were recorded on a model of `layout` (decoder layers,
        routed layers, experts, top_k; MTP layers are not stored), naming each field that
        differs."""
        ours = self._ix.layout
        # MTP layers are never stored: a model that differs only in them replays the file
        # exactly as `replay()` accepts its traces.
        stored = [name for name in FINGERPRINT_WORDS if name != "mtp_layers"]
        differ = [name for name in stored if getattr(ours, name) != getattr(layout, name)]
        if differ:
            raise TraceFileError(
                f"{self.path} was recorded on another model: file: {describe(ours, differ)}; "
                f"model ({layout.family}): {describe(layout, differ)}."
            )

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; reading afterwards is an error."""
        handle, self._handle = self._handle, None
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
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

    def _index(self, index: int) -> int:
        if self._handle is None:
            raise TraceFileError(f"{self.path} is closed; open it again with TraceFile(path).")
        if type(index) is not int and (isinstance(index, bool) or not isinstance(index, Integral)):
            raise TraceFileError(
                f"{self.path}: a sequence index is an integer, found {index!r}; look a "
                "sequence id up with index_of."
            )
        count = len(self._ix.starts[0]) - 1
        if not -count <= index < count:
            raise IndexError(f"{self.path} holds {count} sequences; there is no sequence {index}.")
        return index % count

    def _read_sequence(self, index: int) -> tuple[Bytes, Bytes, Bytes | None]:
        """Sequence `index`'s experts, routed and tokens bytes, checksums verified."""
        ids, mask, token_ids, _, _ = self._read_rows(index, 0, self.num_tokens(index))
        return ids, mask, token_ids

    def _read_rows(
        self, index: int, start: int, stop: int
    ) -> tuple[Bytes, Bytes, Bytes | None, int, int]:
        """The experts, routed and tokens bytes of sequence `index`'s tokens `first ..
        last - 1` (returned after them), holding tokens `start .. stop - 1`, checksums
        verified: the blocks that hold them (version 3), else the whole sequence."""
        token_starts, id_starts, mask_starts = self._ix.starts
        t0, t1 = token_starts[index], token_starts[index + 1]
        first, last = 0, t1 - t0  # the tokens read: whole blocks, or the whole sequence
        if self._ix.block_starts is not None:
            block = self._ix.block_tokens
            first, last = start // block * block, min(-(-stop // block) * block, t1 - t0)
        if self.encoding == "compact":
            ids = self._slice("experts", t0 + first, t0 + last).reshape(-1).view(np.uint8)
        else:  # a sequence's packed bytes end padded: its last token's block takes them
            id_start = id_starts[index]
            id_end = id_start + self._ix.codec.id_bytes(last)
            if last == t1 - t0:
                id_end = id_starts[index + 1]
            ids = self._slice("experts", id_start + self._ix.codec.id_bytes(first), id_end)
        mask_start = mask_starts[index]
        mask_end = mask_start + self._ix.codec.mask_bytes(last)
        if last == t1 - t0:
            mask_end = mask_starts[index + 1]
        mask = self._slice("routed", mask_start + self._ix.codec.mask_bytes(first), mask_end)
        token_ids = None
        if self._ix.has_tokens:
            token_ids = self._slice("tokens", t0 + first, t0 + last).view(np.uint8)
        if self._ix.block_starts is None:
            found, expected = sequence_crc(ids, mask, token_ids), int(self._ix.checksums[index])
            if found != expected:
                raise TraceFileError(
                    f"{self.path}: sequence {index} is damaged: its bytes have checksum "
                    f"{found:08x}, the index says {expected:08x}. The file changed after it "
                    "was written; the other sequences can still be read."
                )
            return ids, mask, token_ids, first, last
        found_blocks = block_crcs(
            self._ix.codec, last - first, ids, mask, token_ids, self._ix.block_tokens
        )
        b0 = self._ix.block_firsts[index] + first // self._ix.block_tokens
        stored = self._ix.block_checksums[b0 : b0 + found_blocks.size]
        if found_blocks.tobytes() != stored.tobytes():  # the rare case compares in detail
            bad = int(np.flatnonzero(found_blocks != stored)[0])
            begin = first + bad * self._ix.block_tokens
            end = min(begin + self._ix.block_tokens, t1 - t0) - 1
            raise TraceFileError(
                f"{self.path}: sequence {index} is damaged: its tokens {begin}..{end} have "
                f"checksum {int(found_blocks[bad]):08x}, the index says "
                f"{int(stored[bad]):08x}. The file changed after it was written; the other "
                "sequences (and this one's other blocks) can still be read."
            )
        return ids, mask, token_ids, first, last

    def _token_range(self, index: int, start: int, stop: int | None) -> tuple[int, int]:
        tokens = self.num_tokens(index)
        stop = tokens if stop is None else stop
        for name, value in (("start", start), ("stop", stop)):
            if type(value) is not int and (
                isinstance(value, bool) or not isinstance(value, Integral)
            ):
                raise TraceFileError(f"{self.path}: {name} is a token index, found {value!r}.")
        if not 0 <= start <= stop <= tokens:
            raise TraceFileError(
                f"{self.path}: tokens {start}..{stop - 1} of sequence {index} were asked for; "
                f"it has {tokens} (0 <= start <= stop <= {tokens})."
            )
        return int(start), int(stop)

    def _slice(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Rows `start:stop` of one tensor, read lazily (only those bytes)."""
        begin, dtype, shape, row = self._placement[name]
        size = (stop - start) * row
        data = _read_into(self._file, size, begin + start * row)
        if len(data) != size:
            raise TraceFileError(
                f"{self.path} was truncated while open: {len(data)} of the {size} bytes of "
                f"tensor {name!r} rows {start}:{stop} could be read. Was the file rewritten "
                "under this reader?"
            )
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])


def _read_into(file: Any, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset` (fewer at the end of the file) in a writable buffer:
    decoding then works in place, without a copy to write -1 rows into."""
    buffer = bytearray(size)
    if hasattr(os, "preadv"):
        read = os.preadv(file.fileno(), [buffer], offset)
    else:  # no preadv (Windows): a reader is not shared between threads
        file.seek(offset)
        read = file.readinto(buffer)
    del buffer[read:]
    return buffer


def _read_at(file: Any, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (fewer at the end of the file)."""
    if hasattr(os, "pread"):
        return os.pread(file.fileno(), size, offset)
    file.seek(offset)  # no pread (Windows): a reader is not shared between threads
    data: bytes = file.read(size)
    return data


def _tensor_placement(
    file: Any,
) -> dict[str, tuple[int, np.dtype[Any], tuple[int, ...], int]]:
    """Each tensor's absolute byte offset, dtype, shape and bytes per row (along its
    first axis), from the safetensors header (already validated by safetensors and
    `_read_index`)."""
    (length,) = struct.unpack("<Q", _read_at(file, 8, 0))
    header = json.loads(_read_at(file, length, 8))
    placement = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = np.dtype(NUMPY_DTYPES[spec["dtype"]]), tuple(spec["shape"])
        row = dtype.itemsize * math.prod(shape[1:])
        placement[name] = (8 + length + spec["data_offsets"][0], dtype, shape, row)
    return placement


def _open_safetensors(path: Path) -> Any:
    """A lazy safetensors handle: tensors are read on demand, slice by slice."""
    return safe_open(str(path), framework="numpy")
