"""The safetensors container of a trace file: its tensors in file order, the header
that places them, typed reads of its metadata fields, words for the layout those
fields record, and why a file safetensors refused is unreadable."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routereplay.errors import TraceFileError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.store.codec import Codec

FORMAT = "routereplay.trace"
FORMAT_VERSION = 3
# Version 1 is version 2 without prompt lengths and sequence ids; version 3 adds a
# checksum per block of BLOCK_TOKENS tokens, so that a range of a sequence's tokens is
# read and verified alone. All three are read.
READABLE_VERSIONS = (1, 2, 3)
# Tokens per checksummed block (a multiple of 8: every block's ids and routed mask
# start on a byte boundary, whatever the bits per id).
BLOCK_TOKENS = 32


@dataclass(frozen=True)
class Sizes:
    """The counts that fix a trace file's tensor shapes and byte lengths."""

    sequences: int
    tokens: int
    id_bytes: int
    mask_bytes: int
    has_tokens: bool
    has_prompt_lens: bool = False
    sequence_id_bytes: int | None = None  # None: the file holds no sequence ids
    blocks: int | None = None  # checksummed blocks (version 3); None: versions 1, 2


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a trace file: its name, safetensors dtype, shape and byte length."""

    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    nbytes: int


NUMPY_DTYPES = {"U8": "<u1", "U16": "<u2", "U32": "<u4", "I32": "<i4", "I64": "<i8"}


def tensor_specs(codec: Codec, sizes: Sizes) -> list[TensorSpec]:
    """The tensors of a trace file, in the order this writer lays them out: `experts`
    first, which it streams into place as sequences arrive, then the small ones, whose
    sizes are known only at the end. Readers place tensors by the header, in any order
    (files of earlier writers begin with `offsets`)."""
    specs = []
    if codec.encoding == "compact":
        width = codec.id_dtype.itemsize
        shape = (sizes.tokens, codec.num_layers, codec.top_k)
        specs.append(TensorSpec("experts", f"U{8 * width}", shape, sizes.id_bytes))
    else:
        specs.append(TensorSpec("experts", "U8", (sizes.id_bytes,), sizes.id_bytes))
    specs.append(TensorSpec("routed", "U8", (sizes.mask_bytes,), sizes.mask_bytes))
    if sizes.has_tokens:
        specs.append(TensorSpec("tokens", "I32", (sizes.tokens,), 4 * sizes.tokens))
    index = (sizes.sequences + 1,), 8 * (sizes.sequences + 1)
    specs.append(TensorSpec("offsets", "I64", *index))
    if sizes.sequence_id_bytes is not None:
        specs.append(TensorSpec("sequence_id_offsets", "I64", *index))
    specs.append(TensorSpec("checksums", "U32", (sizes.sequences,), 4 * sizes.sequences))
    if sizes.blocks is not None:
        specs.append(TensorSpec("block_checksums", "U32", (sizes.blocks,), 4 * sizes.blocks))
    if sizes.has_prompt_lens:
        specs.append(TensorSpec("prompt_lens", "I32", (sizes.sequences,), 4 * sizes.sequences))
    if sizes.sequence_id_bytes is not None:
        size = sizes.sequence_id_bytes
        specs.append(TensorSpec("sequence_ids", "U8", (size,), size))
    return specs


METADATA_CRC = "metadata_crc32"


def metadata_crc(metadata: dict[str, str]) -> int:
    """zlib.crc32 of every other metadata field, in key order: one changed digit in
    `moe_layers` or `num_experts` would otherwise move routes onto other layers."""
    fields = sorted((k, v) for k, v in metadata.items() if k != METADATA_CRC)
    return zlib.crc32(json.dumps(fields, separators=(",", ":")).encode())


def fact_checksums(facts: dict[str, bytes]) -> dict[str, str]:
    """The metadata checksums of the per-sequence facts a file holds: `prompt_lens_crc32`
    and `sequence_ids_crc32` (over `sequence_id_offsets`, then `sequence_ids`)."""
    checksums = {}
    if "prompt_lens" in facts:
        checksums["prompt_lens_crc32"] = str(zlib.crc32(facts["prompt_lens"]))
    if "sequence_ids" in facts:
        crc = zlib.crc32(facts["sequence_ids"], zlib.crc32(facts["sequence_id_offsets"]))
        checksums["sequence_ids_crc32"] = str(crc)
    return checksums


def safetensors_header(
    specs: list[TensorSpec], metadata: dict[str, str], size: int | None = None
) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `specs`, in order.

    `safetensors.numpy.save_file` wants every tensor in memory at once; writing the
    header ourselves lets the writer stream sequences into the file instead. `size`:
    the header's length in bytes, the JSON padded with spaces to it (a `TraceFileError`
    if the JSON is longer); by default the JSON padded to a multiple of 8, as
    safetensors does.
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
    room = -len(text) % 8 if size is None else size - 8 - len(text)
    if room < 0:
        raise TraceFileError(
            f"The trace file's header needs {8 + len(text)} bytes, more than the {size} "
            "reserved for it."
        )
    text += b" " * room  # JSON may end in spaces; tensor data starts after them
    return struct.pack("<Q", len(text)) + text


class HeaderFields:
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
        # Every integer in the header is a count, an id or a crc32: plain ASCII digits.
        # int() would also take "-1", " 5 " and "1_0".
        if not (value.isascii() and value.isdigit()):
            raise self._damaged(f"metadata {key}={value!r} is not a non-negative integer")
        return int(value)

    def integers(self, key: str) -> tuple[int, ...]:
        value = self.text(key)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(type(i) is int for i in parsed):
            raise self._damaged(f"metadata {key}={value!r} is not a JSON list of integers")
        return tuple(parsed)


FINGERPRINT_WORDS = {
    "num_layers": "{} layers",
    "moe_layers": "routed {}",
    "mtp_layers": "MTP {}",
    "num_experts": "{} experts",
    "top_k": "top_k={}",
}


def describe(layout: MoELayout, fields: list[str]) -> str:
    """'61 layers, routed 3..60' for the named fingerprint fields of `layout`."""
    words = []
    for name in fields:
        value = getattr(layout, name)
        shown = (_layer_range(value) or "none") if isinstance(value, tuple) else value
        words.append(FINGERPRINT_WORDS[name].format(shown))
    return ", ".join(words)


def _layer_range(layers: Sequence[int]) -> str:
    """'3..60' for a contiguous run, else the ids."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return _short(layers) if layers else ""


def why_unreadable(path: Path, error: Exception) -> str:
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
