"""Trace files: many sequences in one safetensors file, read back exactly and strictly."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from routereplay import NO_ROUTE, MoELayout, Rollout, RoutingTrace, TraceError
from routereplay.store import TraceFile, TraceFileError, TraceWriter
from routereplay.store.codec import sequence_crc
from routereplay.store.container import TensorSpec, metadata_crc, safetensors_header


def random_trace(
    layout: MoELayout, tokens: int, seed: int = 0, missing: float = 0.2, source: str = "vllm"
) -> RoutingTrace:
    """Distinct ids per row over every routed layer, some rows -1 (no route)."""
    rng = np.random.default_rng(seed)
    layers = len(layout.moe_layers)
    scores = rng.random((tokens, layers, layout.num_experts))
    experts = np.argsort(scores, axis=-1)[..., : layout.top_k]
    experts[rng.random((tokens, layers)) < missing] = NO_ROUTE
    return RoutingTrace(torch.from_numpy(experts), layout.moe_layers, layout.num_experts, source)


def write(
    path: Path,
    layout: MoELayout,
    traces: list[RoutingTrace],
    tokens: list[np.ndarray] | None = None,
    encoding: str = "compact",
) -> Path:
    with TraceWriter(path, layout, source="vllm", encoding=encoding) as writer:  # type: ignore[arg-type]
        for i, trace in enumerate(traces):
            writer.append(trace, None if tokens is None else tokens[i])
    return path


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of one tensor in a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def three_sequences(hybrid_layout: MoELayout) -> list[RoutingTrace]:
    return [random_trace(hybrid_layout, tokens, seed) for seed, tokens in enumerate((7, 1, 12))]


@pytest.fixture
def trace_path(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> Path:
    tokens = [np.arange(t.num_rows) + 100 * i for i, t in enumerate(three_sequences)]
    return write(tmp_path / "rollouts.rr", hybrid_layout, three_sequences, tokens)


# -- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["compact", "packed"])
def test_sequences_read_back_exactly_with_their_tokens(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace], encoding: str
) -> None:
    tokens = [np.arange(t.num_rows, dtype=np.int64) * 7 for t in three_sequences]
    path = write(tmp_path / "t.rr", hybrid_layout, three_sequences, tokens, encoding)
    with TraceFile(path) as traces:
        assert len(traces) == 3 and traces.encoding == encoding and traces.source == "vllm"
        assert [traces.num_tokens(i) for i in range(3)] == [7, 1, 12]
        assert traces.total_tokens == 20 and traces.layers == hybrid_layout.moe_layers
        for i, original in enumerate(three_sequences):
            read = traces.trace(i)
            assert read.equal(original) and read.source == "vllm"
            assert torch.equal(traces.tokens(i), torch.from_numpy(tokens[i]).int())
        assert all(a.equal(b) for a, b in zip(traces, three_sequences, strict=True))


@pytest.mark.parametrize("encoding", ["compact", "packed"])
def test_no_route_rows_stay_apart_from_expert_255_with_256_experts(
    tmp_path: Path, encoding: str
) -> None:
    # Every 8-bit value is an expert here: -1 must live in the mask, not in the ids.
    layout = MoELayout.from_dense_pattern([1, 1], num_experts=256, top_k=2)
    experts = torch.tensor([[[255, 0], [NO_ROUTE, NO_ROUTE]], [[NO_ROUTE, NO_ROUTE], [254, 255]]])
    trace = RoutingTrace(experts, (0, 1), 256)
    with TraceFile(write(tmp_path / "t.rr", layout, [trace], encoding=encoding)) as traces:
        assert traces.trace(0).expert_ids().tolist() == experts.tolist()


@pytest.mark.parametrize(
    ("num_experts", "dtype"),
    [(8, "U8"), (256, "U8"), (257, "U16"), (65536, "U16"), (65537, "U32")],
)
def test_compact_ids_take_one_two_or_four_bytes(
    tmp_path: Path, num_experts: int, dtype: str
) -> None:
    layout = MoELayout.from_dense_pattern([0, 1], num_experts=num_experts, top_k=2)
    trace = random_trace(layout, tokens=3)
    path = write(tmp_path / "t.rr", layout, [trace])
    with safe_open(str(path), framework="numpy") as raw:
        experts = raw.get_slice("experts")
        assert (experts.get_dtype(), experts.get_shape()) == (dtype, [3, 1, 2])
    with TraceFile(path) as traces:
        assert traces.trace(0).equal(trace)


@pytest.mark.parametrize(
    ("num_experts", "bits"), [(2, 1), (8, 3), (9, 4), (128, 7), (200, 8), (256, 8), (300, 9)]
)
def test_packed_ids_take_ceil_log2_experts_bits(
    tmp_path: Path, num_experts: int, bits: int
) -> None:
    layout = MoELayout.from_dense_pattern([1, 1, 1], num_experts=num_experts, top_k=2)
    traces = [random_trace(layout, tokens=5, seed=1), random_trace(layout, tokens=3, seed=2)]
    path = write(tmp_path / "t.rr", layout, traces, encoding="packed")
    # Each sequence is padded to a whole byte so that it can be read alone.
    expected = sum(math.ceil(t.num_rows * 3 * 2 * bits / 8) for t in traces)
    begin, end = tensor_bytes(path, "experts")
    assert end - begin == expected
    with TraceFile(path) as read:
        assert read.bits_per_id == bits
        assert all(a.equal(b) for a, b in zip(read, traces, strict=True))


def test_the_file_is_plain_safetensors_readable_without_routereplay(
    trace_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    tensors = load_file(trace_path)
    assert set(tensors) == {
        "offsets",
        "checksums",
        "block_checksums",
        "tokens",
        "experts",
        "routed",
    }
    assert tensors["offsets"].tolist() == [0, 7, 8, 20]
    first = three_sequences[0].expert_ids().numpy()
    routed = first[..., 0] != NO_ROUTE
    assert np.array_equal(tensors["experts"][:7][routed], first[routed])
    assert (tensors["experts"][:7][~routed] == 0).all()  # -1 rows live in the mask
    with safe_open(str(trace_path), framework="numpy") as raw:
        metadata = raw.metadata()
    assert metadata["format"] == "routereplay.trace" and metadata["format_version"] == "3"
    assert json.loads(metadata["moe_layers"]) == list(hybrid_layout.moe_layers)
    assert (metadata["num_layers"], metadata["num_experts"], metadata["top_k"]) == ("8", "16", "4")
    assert (metadata["source"], metadata["encoding"]) == ("vllm", "compact")


def test_the_header_carries_the_layout_fingerprint(
    trace_path: Path, hybrid_layout: MoELayout
) -> None:
    with TraceFile(trace_path) as traces:
        assert traces.layout_fingerprint == hybrid_layout.fingerprint
        traces.check_layout(hybrid_layout)


def test_token_ids_are_optional(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    with TraceFile(write(tmp_path / "t.rr", hybrid_layout, three_sequences)) as traces:
        assert not traces.has_tokens and traces.trace(2).equal(three_sequences[2])
        with pytest.raises(TraceFileError, match=r"t\.rr holds no token ids"):
            traces.tokens(0)


def test_empty_files_and_empty_sequences_read_back(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    with TraceFile(write(tmp_path / "none.rr", hybrid_layout, [])) as traces:
        assert len(traces) == 0 and traces.total_tokens == 0 and list(traces) == []
    empty = random_trace(hybrid_layout, tokens=0)
    with TraceFile(write(tmp_path / "zero.rr", hybrid_layout, [empty], [np.arange(0)])) as traces:
        assert traces.trace(0).equal(empty) and traces.tokens(0).numel() == 0


# -- writing --------------------------------------------------------------------------------


def test_appended_sequences_spill_beside_the_target_until_close(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    path = tmp_path / "t.rr"
    writer = TraceWriter(path, hybrid_layout)
    for trace in three_sequences:
        writer.append(trace)
    assert writer.spill_path == tmp_path / "t.rr.partial"
    assert writer.spill_path.exists() and not path.exists()
    writer.close()
    assert path.exists() and not writer.spill_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rr"]  # no temporary left


def test_ids_stream_into_their_place_in_the_file_as_sequences_arrive(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    # No spill copy at close: each sequence's ids are written once, after the room
    # kept for the header, in the order the final file holds them.
    path = tmp_path / "t.rr"
    with TraceWriter(path, hybrid_layout) as writer:
        start = writer.spill_path.stat().st_size
        for trace in three_sequences:
            writer.append(trace)
            writer._open_spill().flush()
        streamed = writer.spill_path.read_bytes()
    begin, end = tensor_bytes(path, "experts")
    assert streamed[begin:end] == path.read_bytes()[begin:end] and len(streamed) == end
    assert start == 0 and begin > 0


@pytest.mark.parametrize("durable", [True, False])
def test_close_fsyncs_before_the_rename_unless_told_not_to(
    tmp_path: Path,
    hybrid_layout: MoELayout,
    three_sequences: list[RoutingTrace],
    monkeypatch: pytest.MonkeyPatch,
    durable: bool,
) -> None:
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        "routereplay.store.writer.os.fsync", lambda fd: calls.append("fsync") or fsync(fd)
    )
    monkeypatch.setattr(
        "routereplay.store.writer.os.replace",
        lambda a, b: calls.append("rename") or replace(a, b),
    )
    with TraceWriter(tmp_path / "t.rr", hybrid_layout, durable=durable) as writer:
        writer.append(three_sequences[0])
    # The file's data before the rename, then the directory holding the rename.
    assert calls == (["fsync", "rename", "fsync"] if durable else ["rename"])
    with TraceFile(tmp_path / "t.rr") as traces:
        assert traces.trace(0).equal(three_sequences[0])


def test_files_of_earlier_writers_with_offsets_first_read_back(
    trace_path: Path, three_sequences: list[RoutingTrace]
) -> None:
    # Writers before this one (format 2) laid the index first and the ids after it:
    # readers place tensors by the header, in any order.
    as_version(trace_path, 2)
    with safe_open(str(trace_path), framework="numpy") as raw:
        metadata = dict(raw.metadata())
    tensors = load_file(trace_path)
    order = ["offsets", "checksums", "tokens", "experts", "routed"]
    specs = [
        TensorSpec(
            name,
            {"<i8": "I64", "<u4": "U32", "<i4": "I32", "|u1": "U8"}[tensors[name].dtype.str],
            tensors[name].shape,
            tensors[name].nbytes,
        )
        for name in order
    ]
    body = b"".join(tensors[name].tobytes() for name in order)
    trace_path.write_bytes(safetensors_header(specs, metadata) + body)
    with TraceFile(trace_path) as traces:
        assert all(a.equal(b) for a, b in zip(traces, three_sequences, strict=True))
        assert traces.tokens(2).tolist() == list(range(200, 212))


def test_memory_stays_flat_however_many_sequences_arrive(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    trace = random_trace(hybrid_layout, tokens=256)  # 6 KiB of ids per sequence
    with TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer:
        for _ in range(20):
            writer.append(trace)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(500):  # 3 MiB of ids: they must go to disk, not stay in memory
                writer.append(trace)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert grown < 64 * 1024
    with TraceFile(tmp_path / "t.rr") as traces:
        assert len(traces) == 520 and traces.trace(519).equal(trace)


def test_an_exception_in_the_block_leaves_no_file_and_no_spill(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    path = tmp_path / "t.rr"
    with pytest.raises(RuntimeError, match="rollout failed"), TraceWriter(path, hybrid_layout) as w:
        w.append(three_sequences[0])
        raise RuntimeError("rollout failed")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rewrite_leaves_the_previous_file_as_it_was(
    trace_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    before = trace_path.read_bytes()
    with pytest.raises(RuntimeError), TraceWriter(trace_path, hybrid_layout) as writer:
        writer.append(three_sequences[0])
        raise RuntimeError
    assert trace_path.read_bytes() == before
    assert [p.name for p in trace_path.parent.iterdir()] == [trace_path.name]


def test_a_close_that_fails_leaves_the_previous_file_and_no_debris(
    trace_path: Path,
    hybrid_layout: MoELayout,
    three_sequences: list[RoutingTrace],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = trace_path.read_bytes()
    writer = TraceWriter(trace_path, hybrid_layout)
    writer.append(three_sequences[0])

    def disk_full(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("routereplay.store.writer.os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert trace_path.read_bytes() == before
    assert [p.name for p in trace_path.parent.iterdir()] == [trace_path.name]


def test_a_live_writers_spill_file_is_never_touched(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    with TraceWriter(tmp_path / "t.rr", hybrid_layout) as first:
        first.append(three_sequences[0])
        with pytest.raises(
            TraceFileError, match=r"t\.rr\.partial is held by a TraceWriter that is writing"
        ):
            TraceWriter(tmp_path / "t.rr", hybrid_layout)
        first.append(three_sequences[1])
    with TraceFile(tmp_path / "t.rr") as traces:
        assert len(traces) == 2


def test_a_killed_writers_leftovers_do_not_block_the_next_writer(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    # A writer in another process appends, then dies without closing (as kill -9 would).
    script = f"""
import os, torch
from routereplay import MoELayout, RoutingTrace
from routereplay.store import TraceWriter
layout = MoELayout({hybrid_layout.num_layers}, {hybrid_layout.moe_layers}, 16, 4)
writer = TraceWriter({str(tmp_path / "t.rr")!r}, layout)
writer.append(RoutingTrace(torch.full((3, 6, 4), -1), layout.moe_layers, 16))
open({str(tmp_path / ".t.rr.999.tmp")!r}, "wb").write(b"half a file")
os._exit(9)
"""
    died = subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    assert died.returncode == 9 and (tmp_path / "t.rr.partial").exists()
    with TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer:
        writer.append(three_sequences[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rr"]
    with TraceFile(tmp_path / "t.rr") as traces:
        assert len(traces) == 1 and traces.trace(0).equal(three_sequences[2])


def test_a_writer_into_a_missing_directory_says_so(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    with pytest.raises(TraceFileError, match=r"the directory .*nope does not exist"):
        TraceWriter(tmp_path / "nope" / "t.rr", hybrid_layout)


def test_a_file_truncated_under_an_open_reader_is_an_error_not_a_crash(
    trace_path: Path, three_sequences: list[RoutingTrace]
) -> None:
    with TraceFile(trace_path) as traces:
        size = trace_path.stat().st_size
        with open(trace_path, "r+b") as file:
            file.truncate(size // 2)  # under the open reader, as a rewriting tool would
        with pytest.raises(TraceFileError, match=r"was truncated while open"):
            for index in range(len(traces)):
                traces.trace(index)


def test_appending_after_close_is_an_error(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    writer = TraceWriter(tmp_path / "t.rr", hybrid_layout)
    writer.close()
    with pytest.raises(TraceFileError, match=r"TraceWriter of .*t\.rr is closed"):
        writer.append(three_sequences[0])


def test_an_unknown_encoding_is_refused(tmp_path: Path, hybrid_layout: MoELayout) -> None:
    with pytest.raises(
        TraceFileError, match="Unknown encoding 'zip'; choose one of compact, packed"
    ):
        TraceWriter(tmp_path / "t.rr", hybrid_layout, encoding="zip")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_append_checks_the_trace_against_the_layout(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    other = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], num_experts=16, top_k=2)
    with TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer:
        with pytest.raises(
            TraceError, match=r"Sequence 0 appended to .*: This vllm trace has 16 experts, top_k=2"
        ):
            writer.append(random_trace(other, tokens=3))
        writer.append(random_trace(hybrid_layout, tokens=3))  # the writer is still usable


def test_append_names_the_routed_layers_a_trace_lacks(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    stage = random_trace(hybrid_layout, tokens=3).select_layers([2, 3, 4])  # one pipeline stage
    with (
        TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer,
        pytest.raises(TraceError, match=r"lacks routed layers \[5, 6, 7\]; a trace file"),
    ):
        writer.append(stage)


def test_append_refuses_mtp_layers(tmp_path: Path) -> None:
    layout = MoELayout.from_dense_pattern([0, 1, 1], num_experts=8, top_k=2, mtp_layers=1)
    trace = RoutingTrace(torch.tensor([[[0, 1], [2, 3], [4, 5]]]), (1, 2, 3), 8)
    with (
        TraceWriter(tmp_path / "t.rr", layout) as writer,
        pytest.raises(TraceError, match=r"holds MTP layers \[3\].*select_layers"),
    ):
        writer.append(trace)


def test_append_takes_one_sequence_not_a_batch(tmp_path: Path, hybrid_layout: MoELayout) -> None:
    batch = random_trace(hybrid_layout, tokens=6).reshape_tokens(2, 3)
    with (
        TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer,
        pytest.raises(TraceError, match=r"has token axes \[2, 3\]; append one sequence"),
    ):
        writer.append(batch)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.arange(4), r"token ids have shape \[4\], the trace \[3\] tokens"),
        (np.zeros((3, 1), dtype=np.int64), r"token ids have shape \[3, 1\]"),
        (np.array([0.5, 1, 2]), "token ids must be integers, found dtype float64"),
        (np.array([0, 1, 2**31]), r"token ids must lie in \[0, 2\*\*31\), found 0..2147483648"),
        (np.array([0, -5, 2]), r"token ids must lie in \[0, 2\*\*31\), found -5..2"),
    ],
)
def test_token_ids_must_fit_the_trace(
    tmp_path: Path, hybrid_layout: MoELayout, tokens: np.ndarray, message: str
) -> None:
    with (
        TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer,
        pytest.raises(TraceError, match=message),
    ):
        writer.append(random_trace(hybrid_layout, tokens=3), tokens)


def test_token_ids_are_given_for_every_sequence_or_none(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    trace = random_trace(hybrid_layout, tokens=3)
    with TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer:
        writer.append(trace, torch.tensor([5, 6, 7]))
        with pytest.raises(TraceError, match="Sequence 1 .* gives no token ids, but the sequences"):
            writer.append(trace)
        partly = trace.with_tokens(torch.tensor([5, 6, -1]))  # the final token's unknown
        with pytest.raises(TraceError, match=r"knows only some of its ids gives none: pass them"):
            writer.append(partly)


# -- reading ------------------------------------------------------------------------------------


def test_check_layout_names_each_field_that_differs(tmp_path: Path) -> None:
    deepseek = MoELayout.from_dense_pattern([0] * 3 + [1] * 58, num_experts=256, top_k=8)
    qwen = MoELayout.from_dense_pattern([1] * 48, num_experts=256, top_k=8, family="qwen3_moe")
    path = write(tmp_path / "t.rr", deepseek, [random_trace(deepseek, tokens=2)])
    with (
        TraceFile(path) as traces,
        pytest.raises(
            TraceFileError,
            match=r"t\.rr was recorded on another model: file: 61 layers, routed 3\.\.60; "
            r"model \(qwen3_moe\): 48 layers, routed 0\.\.47\.$",
        ),
    ):
        traces.check_layout(qwen)


def test_check_layout_names_experts_and_top_k(trace_path: Path) -> None:
    other = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], num_experts=32, top_k=2)
    with (
        TraceFile(trace_path) as traces,
        pytest.raises(
            TraceFileError,
            match=r"file: 16 experts, top_k=4; model \(custom\): 32 experts, top_k=2\.",
        ),
    ):
        traces.check_layout(other)


@pytest.mark.parametrize(
    ("version", "what"), [(3, r"its tokens 0\.\.0 have checksum"), (2, "its bytes have checksum")]
)
def test_a_damaged_sequence_is_named_and_the_others_still_read(
    trace_path: Path, three_sequences: list[RoutingTrace], version: int, what: str
) -> None:
    if version != 3:
        as_version(trace_path, version)
    begin, _ = tensor_bytes(trace_path, "experts")
    flip_byte(trace_path, begin + 7 * 6 * 4)  # the first id of sequence 1 (7 tokens before it)
    with TraceFile(trace_path) as traces:
        with pytest.raises(TraceFileError, match=rf"rollouts\.rr: sequence 1 is damaged: {what}"):
            traces.trace(1)
        with pytest.raises(TraceFileError, match="sequence 1 is damaged"):
            traces.tokens(1)
        assert traces.trace(0).equal(three_sequences[0])
        assert traces.trace(2).equal(three_sequences[2])


@pytest.mark.parametrize("tensor", ["routed", "tokens"])
def test_damaged_masks_and_token_ids_fail_the_checksum(trace_path: Path, tensor: str) -> None:
    _, end = tensor_bytes(trace_path, tensor)
    flip_byte(trace_path, end - 1)  # in the last sequence
    with (
        TraceFile(trace_path) as traces,
        pytest.raises(TraceFileError, match="sequence 2 is damaged"),
    ):
        traces.trace(2)


def test_a_damaged_index_is_found_on_open(trace_path: Path) -> None:
    begin, _ = tensor_bytes(trace_path, "offsets")
    flip_byte(trace_path, begin + 8)
    with pytest.raises(
        TraceFileError,
        match=r"rollouts\.rr is a damaged trace file: the 'offsets' tensor has checksum \w+, its header says",
    ):
        TraceFile(trace_path)


def cut_points(size: int, header_end: int) -> list[int]:
    return [0, 5, 8, 9, header_end // 2, header_end, (header_end + size) // 2, size - 1]


@pytest.mark.parametrize("cut", range(8))
def test_a_file_truncated_anywhere_is_reported_as_truncated(trace_path: Path, cut: int) -> None:
    raw = trace_path.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    kept = cut_points(len(raw), header_end)[cut]
    trace_path.write_bytes(raw[:kept])
    with pytest.raises(
        TraceFileError, match=rf"rollouts\.rr is not a readable trace file: .*\b{kept}\b.*truncated"
    ):
        TraceFile(trace_path)


def test_bytes_after_the_last_tensor_are_reported(trace_path: Path) -> None:
    trace_path.write_bytes(trace_path.read_bytes() + b"\0\0\0")
    with pytest.raises(TraceFileError, match="3 bytes follow its last tensor"):
        TraceFile(trace_path)


def test_a_file_that_is_not_safetensors_is_not_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not routes, just some text")
    with pytest.raises(
        TraceFileError,
        match=r"notes\.txt is not a readable trace file: it does not start with a safetensors header",
    ):
        TraceFile(path)


def test_model_weights_are_not_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(
        TraceFileError,
        match=r"model\.safetensors is a safetensors file but not a routereplay trace file: its "
        r"metadata has format=None, not 'routereplay.trace' \(tensors: lm_head.weight\)",
    ):
        TraceFile(path)


def rewrite_metadata(path: Path, reseal: bool = True, **changes: str | None) -> None:
    """Rewrite a trace file with safetensors' own writer, metadata keys changed or
    dropped; `reseal` writes the metadata checksum anew, as a tool that means it would."""
    with safe_open(str(path), framework="numpy") as raw:
        metadata = dict(raw.metadata())
    tensors = load_file(path)
    for key, value in changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    if reseal and "metadata_crc32" not in changes:
        metadata["metadata_crc32"] = str(metadata_crc(metadata))
    save_file(tensors, path, metadata=metadata)


def as_version(path: Path, version: int) -> None:
    """Rewrite a (compact) trace file as writers of format `version` (1 or 2) wrote it:
    no block checksums, each sequence's checksum over its experts, routed and tokens
    bytes, and (version 1) no metadata checksum."""
    with safe_open(str(path), framework="numpy") as raw:
        metadata = dict(raw.metadata())
    tensors = load_file(path)
    del tensors["block_checksums"], metadata["block_tokens"], metadata["block_checksums_crc32"]
    offsets = tensors["offsets"]
    layers = len(json.loads(metadata["moe_layers"]))
    mask_ends = np.cumsum([0, *(-(-int(n) * layers // 8) for n in np.diff(offsets))])
    crcs = []
    for i, (t0, t1) in enumerate(itertools.pairwise(offsets)):
        ids = tensors["experts"][t0:t1].reshape(-1).view(np.uint8)
        mask = tensors["routed"][mask_ends[i] : mask_ends[i + 1]]
        token_ids = tensors["tokens"][t0:t1].view(np.uint8) if "tokens" in tensors else None
        crcs.append(sequence_crc(ids, mask, token_ids))
    tensors["checksums"] = np.array(crcs, dtype="<u4")
    metadata["checksums_crc32"] = str(zlib.crc32(tensors["checksums"].tobytes()))
    metadata["format_version"] = str(version)
    del metadata["metadata_crc32"]
    if version == 2:
        metadata["metadata_crc32"] = str(metadata_crc(metadata))
    save_file(tensors, path, metadata=metadata)


def test_a_file_written_by_safetensors_itself_reads_back(
    trace_path: Path, three_sequences: list[RoutingTrace]
) -> None:
    rewrite_metadata(trace_path)  # other tensor order, same content
    with TraceFile(trace_path) as traces:
        assert all(a.equal(b) for a, b in zip(traces, three_sequences, strict=True))


def test_an_unsupported_format_version_is_named(trace_path: Path) -> None:
    rewrite_metadata(trace_path, format_version="4")
    with pytest.raises(
        TraceFileError,
        match=r"rollouts\.rr is trace format version 4; this routereplay reads versions 1, 2, 3 "
        r"\(it writes 3\)",
    ):
        TraceFile(trace_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"top_k": None}, "its header lacks the metadata key 'top_k'"),
        ({"num_experts": "many"}, "metadata num_experts='many' is not a non-negative integer"),
        ({"num_sequences": "-1"}, "metadata num_sequences='-1' is not a non-negative integer"),
        ({"top_k": " 4 "}, "metadata top_k=' 4 ' is not a non-negative integer"),
        ({"moe_layers": "[2, 3"}, r"metadata moe_layers='\[2, 3' is not a JSON list of integers"),
        (
            {"moe_layers": "[3, 2]"},
            "its layout is impossible: moe_layers must be strictly increasing",
        ),
        ({"encoding": "zip"}, "encoding 'zip' is none of compact, packed"),
        ({"bits_per_id": "4"}, "bits_per_id is 4, but compact ids of 16 experts take 8"),
        ({"num_tokens": "21"}, r"tensor 'offsets'|offsets must rise from 0 to num_tokens=21"),
        ({"num_sequences": "4"}, r"tensor 'offsets' is I64 \[4\], the header implies I64 \[5\]"),
        (
            {"top_k": "2"},
            r"tensor 'experts' is U8 \[20, 6, 4\], the header implies U8 \[20, 6, 2\]",
        ),
    ],
)
def test_a_header_that_does_not_match_its_tensors_is_damage(
    trace_path: Path, changes: dict[str, str | None], message: str
) -> None:
    rewrite_metadata(trace_path, **changes)
    with pytest.raises(TraceFileError, match=rf"rollouts\.rr is a damaged trace file: .*{message}"):
        TraceFile(trace_path)


def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.rr does not exist"):
        TraceFile(tmp_path / "nope.rr")


def test_a_sequence_outside_the_file_is_an_index_error(trace_path: Path) -> None:
    with TraceFile(trace_path) as traces:
        assert traces.num_tokens(-1) == 12
        with pytest.raises(IndexError, match="holds 3 sequences; there is no sequence 3"):
            traces.trace(3)


def test_a_closed_file_says_so(trace_path: Path) -> None:
    traces = TraceFile(trace_path)
    traces.close()
    with pytest.raises(TraceFileError, match="is closed; open it again"):
        traces.trace(0)


# -- any layout, any routes ---------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> MoELayout:
    num_layers = draw(st.integers(1, 12))
    dense_prefix = draw(st.integers(0, num_layers - 1))
    rest = draw(
        st.lists(
            st.booleans(),
            min_size=num_layers - dense_prefix - 1,
            max_size=num_layers - dense_prefix - 1,
        )
    )
    pattern = [False] * dense_prefix + [True] + rest  # the first layer after the prefix routes
    num_experts = draw(st.integers(2, 300))
    top_k = draw(st.integers(1, min(8, num_experts)))
    return MoELayout.from_dense_pattern(pattern, num_experts, top_k)


@given(
    layout=layouts(),
    lengths=st.lists(st.integers(0, 20), max_size=4),
    missing=st.sampled_from([0.0, 0.3, 1.0]),
    encoding=st.sampled_from(["compact", "packed"]),
    with_tokens=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_layout_and_routes_read_back_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    layout: MoELayout,
    lengths: list[int],
    missing: float,
    encoding: str,
    with_tokens: bool,
    seed: int,
) -> None:
    traces = [random_trace(layout, n, seed + i, missing) for i, n in enumerate(lengths)]
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 2**31 - 1, n) for n in lengths] if with_tokens else None
    path = write(tmp_path_factory.mktemp("any") / "t.rr", layout, traces, tokens, encoding)
    with TraceFile(path) as read:
        assert len(read) == len(traces) and read.layout_fingerprint == layout.fingerprint
        for i, trace in enumerate(traces):
            assert read.trace(i).equal(trace)
            if tokens is not None:
                assert read.tokens(i).tolist() == tokens[i].tolist()


# -- prompt lengths and sequence ids -------------------------------------------------------


def rollout_of(trace: RoutingTrace, index: int, prompt_len: int) -> Rollout:
    tokens = torch.arange(trace.num_rows) + 100 * index
    return Rollout(
        prompt_ids=tokens[:prompt_len],
        completion_ids=tokens[prompt_len:],
        routes=trace,
        sequence_id=f"cmpl-{index}/0",
    )


@pytest.fixture
def rollouts(three_sequences: list[RoutingTrace]) -> list[Rollout]:
    return [rollout_of(t, i, min(3, t.num_rows)) for i, t in enumerate(three_sequences)]


@pytest.fixture
def rollout_path(tmp_path: Path, hybrid_layout: MoELayout, rollouts: list[Rollout]) -> Path:
    with TraceWriter(tmp_path / "rollouts.rr", hybrid_layout, source="vllm") as writer:
        for rollout in rollouts:
            writer.append_rollout(rollout)
    return writer.path


def test_rollouts_read_back_with_their_prompt_lengths_and_ids(
    rollout_path: Path, rollouts: list[Rollout]
) -> None:
    with TraceFile(rollout_path) as traces:
        assert traces.has_prompt_lens and traces.has_sequence_ids
        for index, rollout in enumerate(rollouts):
            back = traces.rollout(index)
            assert back.prompt_ids.tolist() == rollout.prompt_ids.tolist()
            assert back.completion_ids.tolist() == rollout.completion_ids.tolist()
            assert back.routes is not None and rollout.routes is not None
            assert back.routes.equal(rollout.routes)
            assert back.sequence_id == rollout.sequence_id == traces.sequence_id(index)
            assert traces.index_of(f"cmpl-{index}/0") == index


def test_a_sequence_id_given_twice_is_refused(
    tmp_path: Path, hybrid_layout: MoELayout, rollouts: list[Rollout]
) -> None:
    with TraceWriter(tmp_path / "r.rr", hybrid_layout) as writer:
        writer.append_rollout(rollouts[0])
        with pytest.raises(
            TraceError, match=r"sequence_id 'cmpl-0/0' was given to sequence 0 already"
        ):
            second = rollouts[1]
            assert second.routes is not None
            writer.append(second.routes, second.token_ids, prompt_len=1, sequence_id="cmpl-0/0")
        writer.discard()


@pytest.mark.parametrize("field", ["prompt_len", "sequence_id"])
def test_a_fact_given_for_some_sequences_only_is_refused(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace], field: str
) -> None:
    value = {"prompt_len": 1, "sequence_id": "a"}[field]
    with TraceWriter(tmp_path / "r.rr", hybrid_layout) as writer:
        writer.append(three_sequences[0], **{field: value})  # type: ignore[arg-type]
        with pytest.raises(TraceError, match=rf"gives no {field}, but the sequences before it did"):
            writer.append(three_sequences[1])
        writer.discard()


def test_a_prompt_longer_than_its_sequence_is_refused(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    with TraceWriter(tmp_path / "r.rr", hybrid_layout) as writer:
        with pytest.raises(TraceError, match=r"prompt_len must be an integer in \[1, 7\].*found 8"):
            writer.append(three_sequences[0], prompt_len=8)
        writer.discard()


def test_a_rollout_without_routes_is_refused(
    tmp_path: Path, hybrid_layout: MoELayout, rollouts: list[Rollout]
) -> None:
    bare = Rollout(rollouts[0].prompt_ids, rollouts[0].completion_ids, routes=None)
    with TraceWriter(tmp_path / "r.rr", hybrid_layout) as writer:
        with pytest.raises(TraceError, match=r"is a Rollout without routes: record routes"):
            writer.append_rollout(bare)
        writer.discard()


@pytest.mark.parametrize("tensor", ["prompt_lens", "sequence_ids"])
def test_a_changed_prompt_length_or_id_is_caught_by_its_checksum(
    rollout_path: Path, tensor: str
) -> None:
    begin, _ = tensor_bytes(rollout_path, tensor)
    flip_byte(rollout_path, begin)
    with pytest.raises(TraceFileError, match=r"is a damaged trace file"):
        TraceFile(rollout_path)


def test_a_token_range_of_a_version_2_file_reads_its_whole_sequence(
    trace_path: Path, three_sequences: list[RoutingTrace]
) -> None:
    as_version(trace_path, 2)  # no block checksums: the sequence's checksum verifies it
    with TraceFile(trace_path) as traces:
        part = traces.trace(2, 3, 9)
        assert torch.equal(part.experts, three_sequences[2].experts[3:9].to(part.experts.dtype))
        assert part.tokens is not None and part.tokens.tolist() == list(range(203, 209))


def test_a_version_1_file_without_prompt_lengths_or_ids_still_reads(
    trace_path: Path, three_sequences: list[RoutingTrace]
) -> None:
    as_version(trace_path, 1)
    with TraceFile(trace_path) as traces:
        assert not traces.has_prompt_lens and not traces.has_sequence_ids
        assert all(a.equal(b) for a, b in zip(traces, three_sequences, strict=True))
        with pytest.raises(TraceFileError, match=r"holds no prompt lengths"):
            traces.prompt_len(0)


@pytest.mark.parametrize(
    "changes", [{"moe_layers": "[2, 3, 4, 5, 6, 8]"}, {"num_experts": "17"}, {"source": "sglang"}]
)
def test_one_changed_header_field_is_caught_by_the_metadata_checksum(
    trace_path: Path, changes: dict[str, str]
) -> None:
    rewrite_metadata(trace_path, reseal=False, **changes)
    with pytest.raises(
        TraceFileError, match=r"damaged trace file: its metadata has checksum .* changed after"
    ):
        TraceFile(trace_path)


def test_a_version_2_file_without_its_metadata_checksum_is_damage(trace_path: Path) -> None:
    rewrite_metadata(trace_path, metadata_crc32=None)
    with pytest.raises(TraceFileError, match=r"lacks the metadata key 'metadata_crc32'"):
        TraceFile(trace_path)


def test_a_model_that_differs_only_in_an_mtp_layer_reads_the_file(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    path = write(tmp_path / "r.rr", hybrid_layout, three_sequences)
    with_mtp = MoELayout(
        hybrid_layout.num_layers,
        hybrid_layout.moe_layers,
        hybrid_layout.num_experts,
        hybrid_layout.top_k,
        mtp_layers=(hybrid_layout.num_layers,),
    )
    with TraceFile(path) as traces:
        traces.check_layout(with_mtp)  # transformers' DeepSeek-V3 config adds one by default
        with pytest.raises(TraceFileError, match=r"recorded on another model: file: 16 experts"):
            traces.check_layout(
                MoELayout(
                    hybrid_layout.num_layers, hybrid_layout.moe_layers, 17, hybrid_layout.top_k
                )
            )


def test_a_trace_that_knows_its_tokens_stores_them_and_refuses_others(
    tmp_path: Path, hybrid_layout: MoELayout, three_sequences: list[RoutingTrace]
) -> None:
    known = three_sequences[0].with_tokens(torch.arange(7) + 3)
    with TraceWriter(tmp_path / "r.rr", hybrid_layout) as writer:
        writer.append(known)  # no tokens argument: the trace's own
        with pytest.raises(
            TraceError, match=r"hold 0 at position 0, where the trace was recorded for 3"
        ):
            writer.append(known, torch.arange(7))
    with TraceFile(tmp_path / "r.rr") as traces:
        assert traces.tokens(0).tolist() == list(range(3, 10))


# -- the rows' form: the writer validates, the checksum carries it ---------------------


def repeated_first_row(trace: RoutingTrace) -> RoutingTrace:
    """`trace` with its first routed row naming one expert twice, written in place
    after validation (as a buggy caller, or another tool, would)."""
    row = int((trace.experts[:, 0, 0] != NO_ROUTE).nonzero()[0])
    trace.experts[row, 0, 1] = trace.experts[row, 0, 0]
    return trace


def test_ids_written_into_a_trace_after_validation_are_refused_by_the_writer(
    tmp_path: Path, hybrid_layout: MoELayout
) -> None:
    trace = repeated_first_row(random_trace(hybrid_layout, 6, missing=0.0))
    with (
        TraceWriter(tmp_path / "t.rr", hybrid_layout) as writer,
        pytest.raises(TraceError, match="Sequence 0 appended.*same expert twice"),
    ):
        writer.append(trace)


@pytest.mark.parametrize("encoding", ["compact", "packed"])
def test_rows_from_a_writer_that_does_not_validate_are_found_with_verify_rows(
    tmp_path: Path, hybrid_layout: MoELayout, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    trace = repeated_first_row(random_trace(hybrid_layout, 6, missing=0.0))
    with monkeypatch.context() as patch:
        patch.setattr(RoutingTrace, "recheck", lambda self: None)  # another tool's writer
        path = write(tmp_path / "t.rr", hybrid_layout, [trace], encoding=encoding)
    with pytest.raises(TraceFileError, match="passed its checksum.*same expert twice"):
        TraceFile(path, verify_rows=True).trace(0)
    # By default the reader trusts the rows' form to the checksum: the ids read back.
    assert TraceFile(path).trace(0).equal(trace)


@pytest.mark.parametrize("encoding", ["compact", "packed"])
@pytest.mark.parametrize(
    ("num_experts", "top_k"),
    [(128, 8), (300, 4), (64, 6), (16, 8), (2, 1), (256, 8), (100_000, 2)],
)
def test_every_id_width_and_row_width_reads_back_exactly(
    tmp_path: Path, encoding: str, num_experts: int, top_k: int
) -> None:
    # Rows of one machine word (8 x int8, 4 x int16) take the word-wise -1 path; packed
    # ids below 8 bits the grouped path, above it the bit-matrix path.
    layout = MoELayout.from_dense_pattern([1, 0, 1], num_experts, top_k)
    traces = [random_trace(layout, tokens, seed) for seed, tokens in enumerate((1, 9, 33))]
    path = write(tmp_path / "t.rr", layout, traces, encoding=encoding)
    with TraceFile(path) as file:
        for i, trace in enumerate(traces):
            assert file.trace(i).equal(trace)
