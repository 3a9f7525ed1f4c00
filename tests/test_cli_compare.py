"""`routereplay compare A B`: routing disagreement between two trace files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from routereplay import MoELayout, RoutingTrace, TraceWriter
from routereplay.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, main

LAYOUT = MoELayout.from_dense_pattern([0, 1, 1], num_experts=8, top_k=2)


def sequence(tokens: int, seed: int) -> RoutingTrace:
    scores = torch.rand(tokens, 2, 8, generator=torch.Generator().manual_seed(seed))
    return RoutingTrace(scores.topk(2, dim=-1).indices, LAYOUT.moe_layers, 8)


def write(path: Path, traces: list[RoutingTrace]) -> Path:
    with TraceWriter(path, LAYOUT) as out:
        for trace in traces:
            out.append(trace)
    return path


@pytest.fixture
def engine_file(tmp_path: Path) -> Path:
    return write(tmp_path / "engine.rr", [sequence(10, 1), sequence(6, 2)])


def changed(trace: RoutingTrace, rows: list[int]) -> RoutingTrace:
    """`trace` with the first routed layer of `rows` sent to two other experts."""
    experts = trace.expert_ids().clone()
    for row in rows:
        others = [e for e in range(8) if e not in experts[row, 0].tolist()]
        experts[row, 0] = torch.tensor(others[:2])
    return RoutingTrace(experts, trace.layers, 8)


def test_identical_files_agree(engine_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", str(engine_file), str(engine_file), "--max-disagreement", "0", "--json"]
    assert main(args) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["sequences"], report["pairs"]) == (2, 32)
    assert report["router_disagreement"] == 0.0 and not report["failed"]


def test_disagreement_above_the_bound_exits_1(
    tmp_path: Path, engine_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = write(tmp_path / "trainer.rr", [changed(sequence(10, 1), [0, 1]), sequence(6, 2)])
    args = ["compare", str(engine_file), str(trainer), "--json"]
    assert main([*args, "--max-disagreement", "0.5"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["router_disagreement"] == pytest.approx(2 / 32)
    assert report["token_disagreement"] == pytest.approx(2 / 16)
    assert main(["compare", str(engine_file), str(trainer), "--max-disagreement", "0.01"]) == (
        EXIT_CHECK_FAILED
    )
    assert "above --max-disagreement" in capsys.readouterr().err


def test_files_of_different_sequences_are_bad_input(
    tmp_path: Path, engine_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write(tmp_path / "other.rr", [sequence(10, 1), sequence(7, 2)])
    assert main(["compare", str(engine_file), str(other)]) == EXIT_BAD_INPUT
    assert "Sequence 1 has 6 tokens" in capsys.readouterr().err
    shorter = write(tmp_path / "shorter.rr", [sequence(10, 1)])
    assert main(["compare", str(engine_file), str(shorter)]) == EXIT_BAD_INPUT
