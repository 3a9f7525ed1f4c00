"""Reading a range of a sequence's tokens from a trace file: only the checksummed blocks
that hold them are read and verified (format 3), and the result is the whole trace's
slice."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from routereplay import NO_ROUTE, MoELayout, RoutingTrace
from routereplay.store import TraceFile, TraceFileError, TraceWriter
from routereplay.store import reader as reader_module
from routereplay.store.container import BLOCK_TOKENS, metadata_crc

LAYOUT = MoELayout.from_dense_pattern([0, 1, 1, 0, 1, 1], num_experts=16, top_k=4)


def random_trace(tokens: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    scores = rng.random((tokens, len(LAYOUT.moe_layers), LAYOUT.num_experts))
    experts = np.argsort(scores, axis=-1)[..., : LAYOUT.top_k]
    experts[rng.random((tokens, len(LAYOUT.moe_layers))) < 0.1] = NO_ROUTE
    token_ids = torch.from_numpy(rng.integers(0, 1000, tokens))
    return RoutingTrace(torch.from_numpy(experts), LAYOUT.moe_layers, 16, "vllm", token_ids)


def write(path: Path, traces: list[RoutingTrace], encoding: str = "compact") -> Path:
    with TraceWriter(path, LAYOUT, source="vllm", encoding=encoding) as writer:  # type: ignore[arg-type]
        for trace in traces:
            writer.append(trace)
    return path


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.integers(0, 3 * BLOCK_TOKENS + 5), min_size=1, max_size=4),
    encoding=st.sampled_from(["compact", "packed"]),
    data=st.data(),
)
def test_a_token_range_reads_as_the_whole_traces_slice(
    tmp_path: Path, lengths: list[int], encoding: str, data: Any
) -> None:
    traces = [random_trace(n, seed) for seed, n in enumerate(lengths)]
    path = write(tmp_path / f"{encoding}.rr", traces, encoding)
    with TraceFile(path) as file:
        for index, whole in enumerate(traces):
            start = data.draw(st.integers(0, whole.num_rows))
            stop = data.draw(st.integers(start, whole.num_rows))
            part = file.trace(index, start, stop)
            assert torch.equal(part.experts, whole.experts[start:stop].to(part.experts.dtype))
            assert part.tokens is not None and whole.tokens is not None
            assert torch.equal(part.tokens.long(), whole.tokens[start:stop].long())


def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    read_into = reader_module._read_into

    def counted(file: Any, size: int, offset: int) -> bytearray:
        sizes.append(size)
        return read_into(file, size, offset)

    monkeypatch.setattr(reader_module, "_read_into", counted)
    return sizes


def test_a_range_reads_only_the_blocks_that_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "t.rr", [random_trace(40 * BLOCK_TOKENS, 0)])
    with TraceFile(path) as file:
        sizes = bytes_read(monkeypatch)
        file.trace(0, 5 * BLOCK_TOKENS + 3, 6 * BLOCK_TOKENS + 1)  # in blocks 5 and 6
        row = len(LAYOUT.moe_layers) * LAYOUT.top_k
        experts, routed, tokens = sizes
        assert experts == 2 * BLOCK_TOKENS * row  # of 40 blocks' bytes
        assert routed == 2 * BLOCK_TOKENS * len(LAYOUT.moe_layers) // 8
        assert tokens == 2 * BLOCK_TOKENS * 4
        sizes.clear()
        file.trace(0)
        assert sizes[0] == 40 * BLOCK_TOKENS * row


def flip_experts_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8 : 8 + length])["experts"]["data_offsets"][0]
    raw[8 + length + begin + position] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_block_fails_only_the_ranges_that_hold_it(tmp_path: Path) -> None:
    trace = random_trace(4 * BLOCK_TOKENS, 0)
    path = write(tmp_path / "t.rr", [trace])
    row = len(LAYOUT.moe_layers) * LAYOUT.top_k
    flip_experts_byte(path, (2 * BLOCK_TOKENS + 1) * row)  # token 65's first id
    with TraceFile(path) as file:
        assert torch.equal(
            file.trace(0, 0, 2 * BLOCK_TOKENS).experts, trace.experts[:64].to(torch.int8)
        )
        first, last = 2 * BLOCK_TOKENS, 3 * BLOCK_TOKENS - 1
        message = rf"t\.rr: sequence 0 is damaged: its tokens {first}\.\.{last} have checksum"
        with pytest.raises(TraceFileError, match=message):
            file.trace(0, 2 * BLOCK_TOKENS + 5, 2 * BLOCK_TOKENS + 6)
        with pytest.raises(TraceFileError, match=message):
            file.trace(0)


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (4, 3), (0, 5 * BLOCK_TOKENS), (1.5, 3)])
def test_a_range_outside_the_sequence_is_refused(tmp_path: Path, start: Any, stop: int) -> None:
    path = write(tmp_path / "t.rr", [random_trace(2 * BLOCK_TOKENS, 0)])
    with TraceFile(path) as file, pytest.raises(TraceFileError, match=r"t\.rr: (tokens|start)"):
        file.trace(0, start, stop)


def test_block_checksums_moved_between_sequences_are_damage(tmp_path: Path) -> None:
    path = write(tmp_path / "t.rr", [random_trace(BLOCK_TOKENS, 0), random_trace(BLOCK_TOKENS, 1)])
    with safe_open(str(path), framework="numpy") as raw:
        metadata = dict(raw.metadata())
    tensors = load_file(path)
    tensors["block_checksums"] = tensors["block_checksums"][::-1].copy()  # resealed below
    metadata["block_checksums_crc32"] = str(zlib.crc32(tensors["block_checksums"].tobytes()))
    metadata["metadata_crc32"] = str(metadata_crc(metadata))
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(TraceFileError, match=r"sequence 0's checksum is not that of its block"):
        TraceFile(path)


def test_an_impossible_block_size_is_damage(tmp_path: Path) -> None:
    path = write(tmp_path / "t.rr", [random_trace(BLOCK_TOKENS, 0)])
    with safe_open(str(path), framework="numpy") as raw:
        metadata = dict(raw.metadata())
    metadata["block_tokens"] = "12"
    metadata["metadata_crc32"] = str(metadata_crc(metadata))
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(TraceFileError, match=r"block_tokens=12 is not a positive multiple of 8"):
        TraceFile(path)


def test_written_files_start_with_the_ids_after_the_headers_room(tmp_path: Path) -> None:
    path = write(tmp_path / "t.rr", [random_trace(3, 0)])
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header["experts"]["data_offsets"][0] == 0  # the first tensor
    assert raw[8 : 8 + length].rstrip(b" ").endswith(b"}")  # the room is spaces
    assert os.path.getsize(path) == 8 + length + max(
        v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"
    )


def test_an_invalid_row_in_a_range_is_named_by_its_place_in_the_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = random_trace(3 * BLOCK_TOKENS, 0)
    row = 2 * BLOCK_TOKENS + 6
    trace.experts[row, 1] = trace.experts[row, 1, 0]  # written by a writer that trusts it
    monkeypatch.setattr(RoutingTrace, "recheck", lambda self: None)
    path = write(tmp_path / "t.rr", [trace])
    start = 2 * BLOCK_TOKENS + 1
    with TraceFile(path, verify_rows=True) as file:
        with pytest.raises(
            TraceFileError,
            match=rf"sequence 0's tokens {start}\.\.{row + 2} \(rows counted from token {start}\)"
            rf" passed their checksum .*: Row \(token {row - start}\), layer 2,",
        ):
            file.trace(0, start, row + 3)
        with pytest.raises(TraceFileError, match=rf"sequence 0 passed .*Row \(token {row}\)"):
            file.trace(0)
