"""`routereplay demo` and `routereplay bench` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routereplay.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_demo_prints_the_table_and_writes_json_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    args = ["demo", "--steps", "1", "--json", str(out), "--plot", str(picture)]
    assert main(args) == EXIT_OK
    table = capsys.readouterr().out
    for scheme in ("none", "R2", "R3"):
        assert f"\n{scheme} " in table
    result = json.loads(out.read_text())
    assert list(result["modes"]) == ["none", "R2", "R3"]
    assert result["modes"]["R3"]["summary"]["routing_disagreement"] == 0.0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_a_model_config_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "model.json"
    config.write_text("{not json")
    assert main(["demo", "--model-config", str(config)]) == EXIT_BAD_INPUT
    assert "routereplay demo:" in capsys.readouterr().err


def test_bench_reports_replay_overhead_as_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tokens", "64", "--rounds", "1", "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert set(result["ratios"]) == {
        "record / native select",
        "replay / native select",
        "replay / native fwd+bwd",
        "replay entry / native select",
    }
    assert all(ratio > 0 for ratio in result["ratios"].values())


def test_bench_refuses_impossible_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--experts", "4", "--top-k", "8"]) == EXIT_BAD_INPUT
    assert "top_k must be in [1, num_experts=4]" in capsys.readouterr().err
