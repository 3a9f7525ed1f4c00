"""A trace file's header and index, parsed and checked on open: the layout and
encoding it records, where each sequence's bytes are, and every checksum of the index
(offsets, per-sequence and block checksums, prompt lengths, sequence ids). Anything
that does not add up is a `TraceFileError` naming the file."""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from routereplay.errors import LayoutError, TraceFileError
from routereplay.layout import MoELayout
from routereplay.store.codec import ENCODINGS, Codec
from routereplay.store.container import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_CRC,
    READABLE_VERSIONS,
    HeaderFields,
    Sizes,
    TensorSpec,
    metadata_crc,
    tensor_specs,
)


class FileIndex:
    """The parsed header and index of the trace file at `path`, open in safetensors'
    `handle`. Token, id byte and mask byte offsets per sequence are kept both as numpy
    arrays and (`starts`) as Python ints, for the per-read arithmetic (numpy scalars
    cost a microsecond each)."""

    layout: MoELayout
    source: str
    encoding: str
    codec: Codec
    has_tokens: bool
    offsets: np.ndarray[Any, Any]
    id_starts: np.ndarray[Any, Any]
    mask_starts: np.ndarray[Any, Any]
    starts: tuple[list[int], list[int], list[int]]
    checksums: np.ndarray[Any, Any]
    block_tokens: int
    block_starts: np.ndarray[Any, Any] | None  # version 3; None for versions 1 and 2
    block_firsts: list[int]
    block_checksums: np.ndarray[Any, Any]
    prompt_lens: np.ndarray[Any, Any] | None
    sequence_ids: list[str] | None
    index_of: dict[str, int]

    def __init__(self, handle: Any, path: Path) -> None:
        self.path = path
        self._handle = handle
        self.index_of = {}
        self._read(handle.metadata() or {})
        del self._handle  # the reader owns it

    def _damaged(self, what: str) -> TraceFileError:
        return TraceFileError(f"{self.path} is a damaged trace file: {what}.")

    def _read(self, metadata: dict[str, str]) -> None:
        """Parse the header, then check every tensor's dtype and shape and the index."""
        found = metadata.get("format")
        if found != FORMAT:
            raise TraceFileError(
                f"{self.path} is a safetensors file but not a routereplay trace file: its "
                f"metadata has format={found!r}, not {FORMAT!r} (tensors: "
                f"{', '.join(sorted(self._handle.keys())[:6]) or 'none'})."
            )
        version = metadata.get("format_version")
        if version not in [str(v) for v in READABLE_VERSIONS]:
            raise TraceFileError(
                f"{self.path} is trace format version {version}; this routereplay reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))} (it writes "
                f"{FORMAT_VERSION}). Read it with the routereplay that wrote it."
            )
        fields = HeaderFields(metadata, self._damaged)
        if version != "1":  # version 1 files carry no metadata checksum
            found_crc, expected_crc = metadata_crc(metadata), fields.integer(METADATA_CRC)
            if found_crc != expected_crc:
                raise self._damaged(
                    f"its metadata has checksum {found_crc:08x}, its {METADATA_CRC} says "
                    f"{expected_crc:08x}: a header field (layers, experts, top_k, counts) "
                    "changed after the file was written, and its routes cannot be placed"
                )
        try:
            self.layout = MoELayout(
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
        self.codec = Codec(
            encoding, self.layout.num_experts, len(self.layout.moe_layers), self.layout.top_k
        )
        if fields.integer("bits_per_id") != self.codec.bits:
            raise self._damaged(
                f"bits_per_id is {fields.integer('bits_per_id')}, but {encoding} ids of "
                f"{self.layout.num_experts} experts take {self.codec.bits}"
            )

        sequences, tokens = fields.integer("num_sequences"), fields.integer("num_tokens")
        names = set(self._handle.keys())
        self.has_tokens = "tokens" in names
        self._check_tensor(TensorSpec("offsets", "I64", (sequences + 1,), 0))
        offsets = self._handle.get_tensor("offsets")
        self._check_crc("offsets", offsets, fields.integer("offsets_crc32"))
        counts = np.diff(offsets)
        if offsets[0] != 0 or (counts < 0).any() or offsets[-1] != tokens:
            raise self._damaged(
                f"the token offsets must rise from 0 to num_tokens={tokens}, found "
                f"{offsets[:3].tolist()} ... {offsets[-1]}"
            )
        self.block_starts = None
        if version not in ("1", "2"):
            block = fields.integer("block_tokens")
            if block < 8 or block % 8:
                raise self._damaged(f"block_tokens={block} is not a positive multiple of 8")
            self.block_tokens = block
            self.block_starts = np.concatenate([[0], np.cumsum(-(-counts // block))])
            self.block_firsts = self.block_starts.tolist()
        id_bytes = (
            counts * len(self.layout.moe_layers) * self.layout.top_k * self.codec.bits + 7
        ) // 8
        mask_bytes = (counts * len(self.layout.moe_layers) + 7) // 8
        self.offsets = offsets
        self.id_starts = np.concatenate([[0], np.cumsum(id_bytes)])
        self.mask_starts = np.concatenate([[0], np.cumsum(mask_bytes)])
        self.starts = (
            offsets.tolist(),
            self.id_starts.tolist(),
            self.mask_starts.tolist(),
        )
        if version == "1" and names & {"prompt_lens", "sequence_id_offsets", "sequence_ids"}:
            raise self._damaged(
                "it says format version 1 but holds version 2's prompt_lens or sequence_ids"
            )
        id_bytes_total = None
        if "sequence_ids" in names:
            shape = self._handle.get_slice("sequence_ids").get_shape()
            if len(shape) != 1:
                raise self._damaged(f"tensor 'sequence_ids' is [{shape}], not 1-D bytes")
            id_bytes_total = int(shape[0])
        sizes = Sizes(
            sequences,
            tokens,
            int(self.id_starts[-1]),
            int(self.mask_starts[-1]),
            self.has_tokens,
            has_prompt_lens="prompt_lens" in names,
            sequence_id_bytes=id_bytes_total,
            blocks=None if self.block_starts is None else int(self.block_starts[-1]),
        )
        specs = tensor_specs(self.codec, sizes)
        expected = {spec.name for spec in specs}
        if names != expected:
            raise self._damaged(f"it holds tensors {sorted(names)}, expected {sorted(expected)}")
        for spec in specs:
            self._check_tensor(spec)
        self.checksums = self._handle.get_tensor("checksums")
        self._check_crc("checksums", self.checksums, fields.integer("checksums_crc32"))
        if self.block_starts is not None:
            self._read_blocks(fields)
        self._read_facts(fields, sizes)

    def _read_blocks(self, fields: HeaderFields) -> None:
        """Version 3's block checksums: checksummed, and each sequence's checksum the
        crc32 of its blocks' (so that no block checksum moved to another sequence)."""
        assert self.block_starts is not None
        blocks = self._handle.get_tensor("block_checksums")
        self._check_crc("block_checksums", blocks, fields.integer("block_checksums_crc32"))
        raw = np.ascontiguousarray(blocks, dtype="<u4").tobytes()
        for index, (b0, b1) in enumerate(itertools.pairwise(self.block_starts.tolist())):
            if zlib.crc32(raw[4 * b0 : 4 * b1]) != int(self.checksums[index]):
                raise self._damaged(
                    f"sequence {index}'s checksum is not that of its block checksums"
                )
        self.block_checksums = blocks.astype(np.uint32)  # native, as block_crcs gives them

    def _read_facts(self, fields: HeaderFields, sizes: Sizes) -> None:
        """Prompt lengths and sequence ids, checksummed and checked against the index."""
        self.prompt_lens = None
        self.sequence_ids = None
        if sizes.has_prompt_lens:
            lengths = self._handle.get_tensor("prompt_lens")
            self._check_crc("prompt_lens", lengths, fields.integer("prompt_lens_crc32"))
            bad = (lengths < 1) | (lengths > np.diff(self.offsets))
            if bad.any():
                index = int(bad.argmax())
                raise self._damaged(
                    f"sequence {index}'s prompt_len {int(lengths[index])} is not within its "
                    f"{int(self.offsets[index + 1] - self.offsets[index])} tokens"
                )
            self.prompt_lens = lengths
        if sizes.sequence_id_bytes is not None:
            ends = self._handle.get_tensor("sequence_id_offsets")
            raw = self._handle.get_tensor("sequence_ids").tobytes()
            crc = zlib.crc32(raw, zlib.crc32(np.ascontiguousarray(ends).data))
            if crc != fields.integer("sequence_ids_crc32"):
                raise self._damaged("the sequence ids do not match their checksum")
            if ends[0] != 0 or (np.diff(ends) < 0).any() or ends[-1] != len(raw):
                raise self._damaged("the sequence id offsets do not rise from 0 to its bytes")
            try:
                ids = [raw[a:b].decode() for a, b in itertools.pairwise(ends.tolist())]
            except UnicodeDecodeError:
                raise self._damaged("a sequence id is not UTF-8") from None
            self.index_of = {sequence_id: i for i, sequence_id in enumerate(ids)}
            if len(self.index_of) != len(ids):
                raise self._damaged("two sequences share an id")
            self.sequence_ids = ids

    def _check_tensor(self, spec: TensorSpec) -> None:
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
