"""Writing trace files: `TraceWriter` streams sequences into the file as they arrive
and puts it in place atomically on `close()`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import torch

from routereplay.errors import TraceError, TraceFileError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout
from routereplay.store.codec import Codec, Encoding, block_crcs
from routereplay.store.container import (
    BLOCK_TOKENS,
    FORMAT,
    FORMAT_VERSION,
    METADATA_CRC,
    Sizes,
    fact_checksums,
    metadata_crc,
    safetensors_header,
    tensor_specs,
)
from routereplay.store.partial import sync_directory, take_partial
from routereplay.trace import RoutingTrace

TokenIds = torch.Tensor | np.ndarray[Any, Any] | Sequence[int]

# Counts no trace file reaches (10**18 bytes is an exabyte): the header is reserved at
# the length it would have with them, so that any real header fits in its place.
_LARGEST_COUNT = 10**18 - 1
_LARGEST_CRC = 2**32 - 1


class TraceWriter:
    """Write sequences' routes to a trace file as they arrive.

    Each appended sequence's ids go straight to their place in the file being written,
    `PATH.partial` (locked while this writer lives; one left by a writer that died is
    recognised by its released lock and removed), and its routed mask and token ids to
    unnamed temporary files beside it, so memory stays flat however many sequences
    arrive. `close()` appends the small tensors, writes the header into the room kept
    for it, and renames the file into place: `path` is either the complete new file or
    whatever was there before. Leaving a `with` block by an exception discards
    everything (`discard()`).

    `durable=False` skips the fsync before the rename: the file is complete for every
    reader at once, but a power loss soon after may leave it torn (the reader then
    refuses it as damaged), where the fsync costs about a disk write of the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: MoELayout,
        *,
        source: str = "recorded",
        encoding: Encoding = "compact",
        durable: bool = True,
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self.source = source
        self.encoding: Encoding = encoding
        self.durable = durable
        self._codec = Codec(encoding, layout.num_experts, len(layout.moe_layers), layout.top_k)
        self.spill_path = self.path.with_name(self.path.name + ".partial")
        self._sequences = 0
        self._tokens = 0
        self._id_bytes = 0
        self._mask_bytes = 0
        self._has_tokens: bool | None = None  # decided by the first append
        # In memory until close: 12 bytes per sequence and 4 per block of BLOCK_TOKENS
        # tokens (1M tokens: 128 KB), and the facts below.
        self._offsets = array("q", [0])
        self._checksums = array("I")
        self._block_checksums = array("I")
        # [S] each, or None when the sequences give none (decided by the first append,
        # like token ids).
        self._prompt_lens: list[int] | None = None
        self._sequence_ids: list[str] | None = None
        self._id_index: dict[str, int] = {}
        self._spill: IO[bytes] | None = take_partial(self.spill_path, self.path)
        try:
            self._header_size = len(self._header(self._fact_tensors(), largest=_LARGEST_COUNT))
            self._spill.seek(self._header_size)  # the ids follow the header's room
            # Unnamed (O_TMPFILE where there is one): nothing is left if this process dies.
            self._sides = {
                name: tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 (until close)
                for name in ("routed", "tokens")
            }
        except BaseException:
            self.discard()
            raise

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

    def append(
        self,
        trace: RoutingTrace,
        tokens: TokenIds | None = None,
        *,
        prompt_len: int | None = None,
        sequence_id: str | None = None,
    ) -> None:
        """Add one sequence: `trace [tokens, moe_layers, top_k]`, `tokens [tokens]` ids,
        its `prompt_len` (tokens before the completion) and a unique `sequence_id`.

        Each is optional, but a file holds it for every sequence or for none.
        """
        spill = self._open_spill()
        experts = self._check_trace(trace)
        token_ids = self._check_tokens(self._tokens_of(trace, tokens), len(experts))
        self._check_facts(prompt_len, sequence_id, len(experts))
        ids, mask = self._codec.encode(experts)
        token_bytes = None if token_ids is None else token_ids.view(np.uint8)
        blocks = block_crcs(self._codec, len(experts), ids, mask, token_bytes, BLOCK_TOKENS)
        crc = zlib.crc32(blocks.astype("<u4").tobytes())  # a sequence's: of its blocks'
        try:
            spill.write(ids.data)
            self._sides["routed"].write(mask.data)
            if token_bytes is not None:
                self._sides["tokens"].write(token_bytes.data)
        except BaseException:
            # A half-written sequence would misplace every later one.
            self.discard()
            raise
        self._sequences += 1
        self._tokens += len(experts)
        self._id_bytes += len(ids)
        self._mask_bytes += len(mask)
        self._has_tokens = token_ids is not None
        self._add_facts(prompt_len, sequence_id)
        self._offsets.append(self._tokens)
        self._checksums.append(crc)
        self._block_checksums.extend(blocks.tolist())

    def append_rollout(self, rollout: Rollout) -> None:
        """Add one engine `Rollout`: its routes, token ids, prompt length and id."""
        if not isinstance(rollout, Rollout) or rollout.routes is None:
            found = "a Rollout without routes" if isinstance(rollout, Rollout) else "not a Rollout"
            raise TraceError(
                f"Sequence {self._sequences} appended to {self.path} is {found}: record "
                "routes on the engine (vLLM --enable-return-routed-experts, SGLang "
                "return_routed_experts, RecordingEngine(record_routes=True))."
            )
        self.append(
            rollout.routes,
            rollout.token_ids,
            prompt_len=rollout.prompt_len,
            sequence_id=rollout.sequence_id,
        )

    def close(self) -> None:
        """Finish the trace file and rename it into place (atomically). Idempotent."""
        if self._spill is None:
            return
        try:
            self._finish(self._spill)
            os.replace(self.spill_path, self.path)
        except BaseException:
            self.discard()
            raise
        self._release()
        if self.durable:
            sync_directory(self.path.parent)  # the rename itself, on POSIX

    def discard(self) -> None:
        """Drop everything appended: remove the partial file, write no trace file."""
        if self._spill is not None:
            # Unlinked while still locked: a new writer never takes it for stale.
            self.spill_path.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        for side in getattr(self, "_sides", {}).values():
            side.close()
        if self._spill is not None:
            self._spill.close()
            self._spill = None

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
            # Readers trust the rows' form to the checksum: ids written into the trace
            # since it was validated are checked again here.
            trace.recheck()
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
        if len(trace.token_shape) != 1:
            raise TraceError(
                f"{where} has token axes {list(trace.token_shape)}; append one sequence "
                "at a time, shaped [tokens, layers, top_k] (for a batch: "
                "RoutingTrace(trace.expert_ids()[b], trace.layers, trace.num_experts) per row b)."
            )
        experts: np.ndarray[Any, Any] = trace.experts.detach().cpu().numpy()
        return experts

    def _tokens_of(self, trace: RoutingTrace, tokens: TokenIds | None) -> TokenIds | None:
        """The token ids to store: `tokens`, else the trace's own when it knows them all;
        given ids must agree with the trace's where it knows them."""
        known = trace.tokens
        if known is None:
            return tokens
        if tokens is None:
            return None if bool((known < 0).any()) else known
        given = (
            torch.as_tensor(np.asarray(tokens)) if not isinstance(tokens, torch.Tensor) else tokens
        )
        if given.shape == known.shape and not given.is_floating_point():
            differ = (known >= 0) & (known.long() != given.long())
            if bool(differ.any()):
                position = int(differ.nonzero()[0][0])
                raise TraceError(
                    f"Sequence {self._sequences} appended to {self.path}: the token ids given "
                    f"hold {int(given[position])} at position {position}, where the trace was "
                    f"recorded for {int(known[position])}."
                )
        return tokens

    def _check_tokens(self, tokens: TokenIds | None, count: int) -> npt.NDArray[np.int32] | None:
        where = f"Sequence {self._sequences} appended to {self.path}"
        given = tokens is not None
        if self._has_tokens is not None and given != self._has_tokens:
            had = "gave" if self._has_tokens else "gave no"
            raise TraceError(
                f"{where} {'gives' if given else 'gives no'} token ids, but the sequences "
                f"before it {had} token ids: a trace file holds token ids for every "
                "sequence or for none"
                + (
                    ""
                    if given
                    else " (a trace that knows only some of its ids gives none: "
                    "pass them with append(trace, tokens))"
                )
                + "."
            )
        if tokens is None:
            return None
        array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        try:
            array = np.asarray(array)
        except (ValueError, TypeError, OverflowError):
            raise TraceError(f"{where}: token ids must be a flat list of integers.") from None
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TraceError(f"{where}: token ids must be integers, found dtype {array.dtype}.")
        if array.shape != (count,):
            raise TraceError(
                f"{where}: token ids have shape {list(array.shape)}, the trace [{count}] tokens."
            )
        info = np.iinfo(np.int32)
        if array.size and (array.min() < 0 or array.max() > info.max):
            raise TraceError(
                f"{where}: token ids must lie in [0, 2**31), found {array.min()}..{array.max()}."
            )
        return array.astype("<i4")

    def _check_facts(self, prompt_len: int | None, sequence_id: str | None, count: int) -> None:
        where = f"Sequence {self._sequences} appended to {self.path}"
        for name, value, held in (
            ("a prompt_len", prompt_len, self._prompt_lens),
            ("a sequence_id", sequence_id, self._sequence_ids),
        ):
            if self._sequences and (value is None) != (held is None):
                raise TraceError(
                    f"{where} {'gives' if value is not None else 'gives no'} {name[2:]}, but "
                    f"the sequences before it {'gave none' if held is None else 'did'}: a "
                    f"trace file holds {name[2:]} for every sequence or for none."
                )
        if prompt_len is not None and (
            not isinstance(prompt_len, Integral)
            or isinstance(prompt_len, bool)
            or not 1 <= prompt_len <= count
        ):
            raise TraceError(
                f"{where}: prompt_len must be an integer in [1, {count}] (a prompt holds at "
                f"least one of the sequence's tokens), found {prompt_len!r}."
            )
        if sequence_id is not None:
            if not isinstance(sequence_id, str):
                raise TraceError(
                    f"{where}: sequence_id must be a string, found {type(sequence_id).__name__}."
                )
            try:
                sequence_id.encode()
            except UnicodeEncodeError:
                raise TraceError(
                    f"{where}: sequence_id {sequence_id!r} is not valid Unicode text (a lone "
                    "surrogate?); ids are stored as UTF-8."
                ) from None
            if sequence_id in self._id_index:
                raise TraceError(
                    f"{where}: sequence_id {sequence_id!r} was given to sequence "
                    f"{self._id_index[sequence_id]} already; ids name one sequence each."
                )

    def _add_facts(self, prompt_len: int | None, sequence_id: str | None) -> None:
        if prompt_len is not None:
            self._prompt_lens = self._prompt_lens if self._prompt_lens is not None else []
            self._prompt_lens.append(int(prompt_len))
        if sequence_id is not None:
            self._id_index[sequence_id] = self._sequences - 1
            self._sequence_ids = self._sequence_ids if self._sequence_ids is not None else []
            self._sequence_ids.append(sequence_id)

    def _fact_tensors(self) -> dict[str, bytes]:
        """The bytes of the per-sequence tensors held in memory: `offsets`, `checksums`,
        and the facts `prompt_lens`, `sequence_id_offsets` and `sequence_ids`."""
        tensors = {
            "offsets": np.frombuffer(self._offsets, dtype=np.int64).astype("<i8").tobytes(),
            "checksums": np.frombuffer(self._checksums, dtype=np.uint32).astype("<u4").tobytes(),
            "block_checksums": np.frombuffer(self._block_checksums, dtype=np.uint32)
            .astype("<u4")
            .tobytes(),
        }
        if self._prompt_lens is not None:
            tensors["prompt_lens"] = np.asarray(self._prompt_lens, dtype="<i4").tobytes()
        if self._sequence_ids is not None:
            encoded = [i.encode() for i in self._sequence_ids]
            ends = np.cumsum([0, *(len(i) for i in encoded)], dtype="<i8")
            tensors["sequence_id_offsets"] = ends.tobytes()
            tensors["sequence_ids"] = b"".join(encoded)
        return tensors

    def _metadata(self, facts: dict[str, bytes]) -> dict[str, str]:
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
            "offsets_crc32": str(zlib.crc32(facts["offsets"])),
            "checksums_crc32": str(zlib.crc32(facts["checksums"])),
            "block_tokens": str(BLOCK_TOKENS),
            "block_checksums_crc32": str(zlib.crc32(facts["block_checksums"])),
        } | fact_checksums(facts)

    def _sizes(self, facts: dict[str, bytes]) -> Sizes:
        ids = facts.get("sequence_ids")
        return Sizes(
            self._sequences,
            self._tokens,
            self._id_bytes,
            self._mask_bytes,
            bool(self._has_tokens),
            has_prompt_lens="prompt_lens" in facts,
            sequence_id_bytes=None if ids is None else len(ids),
            blocks=len(self._block_checksums),
        )

    def _header(self, facts: dict[str, bytes], largest: int | None = None) -> bytes:
        """The file's header over `facts` (`_fact_tensors`); with `largest`, the longest
        header any file of this writer's layout can have (every count `largest`, every
        tensor there)."""
        sizes, metadata = self._sizes(facts), self._metadata(facts)
        if largest is not None:
            sizes = Sizes(largest, largest, largest, largest, True, True, largest, largest)
            counts = ("num_sequences", "num_tokens")
            crcs = (
                "offsets_crc32",
                "checksums_crc32",
                "block_checksums_crc32",
                "prompt_lens_crc32",
                "sequence_ids_crc32",
            )
            metadata |= dict.fromkeys(counts, str(largest)) | dict.fromkeys(crcs, str(_LARGEST_CRC))
        metadata[METADATA_CRC] = str(
            _LARGEST_CRC if largest is not None else metadata_crc(metadata)
        )
        size = None if largest is not None else self._header_size
        return safetensors_header(tensor_specs(self._codec, sizes), metadata, size)

    def _finish(self, out: IO[bytes]) -> None:
        """After the ids: every other tensor in `tensor_specs` order, then the header in
        its room, then (durable) the fsync."""
        facts = self._fact_tensors()
        for spec in tensor_specs(self._codec, self._sizes(facts))[1:]:
            if spec.name in self._sides:
                side = self._sides[spec.name]
                side.seek(0)
                shutil.copyfileobj(side, out, 1 << 20)
            else:
                out.write(facts[spec.name])
        out.seek(0)
        out.write(self._header(facts))
        out.flush()
        if self.durable:
            os.fsync(out.fileno())
