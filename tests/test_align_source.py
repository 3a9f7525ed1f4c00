"""One rank's share read straight from a trace file: the same pieces as from the
per-sequence traces, reading only the token ranges the rank replays."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from routereplay import NO_ROUTE, MoELayout, PipelineSplit, RoutingTrace, TraceError
from routereplay.align import SequenceSource, balanced_micro_batches, padded_lengths, plan_thd
from routereplay.store import TraceFile, TraceFileError, TraceWriter
from routereplay.store import reader as reader_module

LAYOUT = MoELayout.from_dense_pattern([0, 1, 1, 1, 1, 0, 1, 1], num_experts=32, top_k=4)
CP = 2


def random_trace(tokens: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    scores = rng.random((tokens, len(LAYOUT.moe_layers), LAYOUT.num_experts))
    experts = np.argsort(scores, axis=-1)[..., : LAYOUT.top_k]
    experts[-1] = NO_ROUTE  # the final sampled token
    token_ids = torch.from_numpy(rng.integers(0, 1000, tokens))
    return RoutingTrace(torch.from_numpy(experts), LAYOUT.moe_layers, 32, "vllm", token_ids)


def batch(
    tmp_path: Path, lengths: list[int], encoding: str = "compact", micro_batches: int = 3
) -> tuple[Any, ...]:
    traces = [random_trace(n, seed) for seed, n in enumerate(lengths)]
    path = tmp_path / f"{encoding}.rr"
    with TraceWriter(path, LAYOUT, source="vllm", encoding=encoding) as writer:  # type: ignore[arg-type]
        for trace in traces:
            writer.append(trace)
    sizes = torch.tensor(lengths)
    groups = balanced_micro_batches(
        padded_lengths(sizes, 2 * CP), 600, min_micro_batches=micro_batches
    )
    plan = plan_thd(sizes, groups, multiple=2 * CP, cp_size=CP)
    return traces, path, plan


@pytest.mark.parametrize("encoding", ["compact", "packed"])
@pytest.mark.parametrize("cp_rank", [0, 1])
def test_a_ranks_share_from_a_file_is_its_share_from_the_traces(
    tmp_path: Path, encoding: str, cp_rank: int
) -> None:
    traces, path, plan = batch(tmp_path, [37, 256, 5, 130, 64, 190], encoding)
    layers = LAYOUT.stage_moe_layers(PipelineSplit(pp_size=2), 1)
    want = plan.rank_routes(traces, cp_rank=cp_rank, layers=layers)
    with TraceFile(path) as file:
        assert isinstance(file, SequenceSource)
        got = plan.rank_routes(file, cp_rank=cp_rank, layers=layers)
    assert got.keys() == want.keys() and len(got) >= 3
    for micro_batch, trace in want.items():
        assert got[micro_batch].layers == trace.layers
        assert torch.equal(got[micro_batch].experts, trace.experts)
        assert got[micro_batch].tokens is not None and trace.tokens is not None
        assert torch.equal(got[micro_batch].tokens.long(), trace.tokens.long())


def experts_bytes_read(monkeypatch: pytest.MonkeyPatch, begin: int, end: int) -> list[int]:
    """Sizes of the reads that fall in the file's experts tensor `[begin, end)`."""
    sizes: list[int] = []
    read_into = reader_module._read_into

    def counted(file: Any, size: int, offset: int) -> bytearray:
        if begin <= offset < end:
            sizes.append(size)
        return read_into(file, size, offset)

    monkeypatch.setattr(reader_module, "_read_into", counted)
    return sizes


def experts_span(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])["experts"]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def test_a_cp_rank_reads_only_its_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 tokens in 4 zigzag chunks of 64 (two blocks each): rank 0 holds chunks 0 and 3.
    _, path, plan = batch(tmp_path, [256] * 6)
    begin, end = experts_span(path)
    with TraceFile(path) as file:
        sizes = experts_bytes_read(monkeypatch, begin, end)
        plan.rank_routes(file, cp_rank=0)
    assert sum(sizes) == (end - begin) // 2


def test_a_damaged_block_fails_only_the_rank_that_reads_it(tmp_path: Path) -> None:
    _, path, plan = batch(tmp_path, [256], micro_batches=1)
    begin, _ = experts_span(path)
    raw = bytearray(path.read_bytes())
    row = len(LAYOUT.moe_layers) * LAYOUT.top_k
    raw[begin + 100 * row] ^= 0xFF  # token 100: chunk 1, which rank 1 holds
    path.write_bytes(bytes(raw))
    with TraceFile(path) as file:
        plan.rank_routes(file, cp_rank=0)
        with pytest.raises(TraceFileError, match=r"sequence 0 is damaged: its tokens 96\.\.127"):
            plan.rank_routes(file, cp_rank=1)


def test_a_file_of_other_sequences_is_refused(tmp_path: Path) -> None:
    _, path, _ = batch(tmp_path, [37, 256, 5])
    other = plan_thd(torch.tensor([37, 200, 5]), multiple=2 * CP, cp_size=CP)
    with (
        TraceFile(path) as file,
        pytest.raises(TraceError, match=r"Sequence 1's trace has 256 tokens; the plan's lengths"),
    ):
        other.rank_routes(file, cp_rank=0)
