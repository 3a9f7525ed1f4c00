"""`routereplay bench ingest`: a step's vLLM payloads to one rank's replay targets, timed
next to a floor and a verl-style batch, the three paths' results checked equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from routereplay.bench import ingest
from routereplay.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, main
from routereplay.engines.base64_field import decoder_name

# 16 sequences (one per micro-batch) of 16..48 tokens, one round: about a second.
TINY = ["--sequences", "16", "--min-len", "16", "--max-len", "48", "--rounds", "1"]
CASES = {
    "floor",
    "verl-style",
    "ours",
    "ours: decode",
    "ours: validate",
    "ours: align",
    "ours: file write, compact",
    "ours: file write, compact, no fsync",
    "ours: file write, packed",
    "ours: file write, packed, no fsync",
    "ours: file read, compact",
    "ours: file read, packed",
    "ours: rank's ranges of file, compact",
    "ours: rank's ranges of file, packed",
}


def bench_ingest(capsys: pytest.CaptureFixture[str], *options: str) -> dict[str, Any]:
    assert main(["bench", "ingest", *TINY, *options, "--json"]) == EXIT_OK
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_bench_ingest_times_every_case_once_the_paths_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = bench_ingest(capsys)
    assert report["equal_to_floor"] == [
        "verl-style",
        "ours",
        "ours, via a file",
        "ours, a rank's ranges of a file",
    ]
    assert set(report["seconds"]) == CASES
    assert set(report["ns_per_id"]) == set(report["mb_per_s"]) == CASES
    assert all(seconds > 0 for seconds in report["seconds"].values())
    assert set(report["peak_mb"]) == {"floor", "verl-style", "ours"}
    assert set(report["ratios"]) == {
        "ours / floor",
        "verl-style / ours",
        "ours peak / verl-style peak",
        "file write / read, compact",
        "file write, no fsync / read, compact",
        "file write / read, packed",
        "file write, no fsync / read, packed",
    }
    assert all(ratio > 0 for ratio in report["ratios"].values())
    assert report["shape"]["sequences"] == 16
    assert report["shape"]["micro_batches"] == 16


def test_bench_ingest_prints_a_table_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest", *TINY]) == EXIT_OK
    table = capsys.readouterr().out
    assert "in 16 sequences, 48 layers, top-8 of 128" in table
    for case in CASES:
        assert f"\n  {case} " in table
    assert "ours / floor" in table


def test_bench_ingest_fails_when_a_path_differs_from_the_floor(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def off_by_one(work: ingest.Workload) -> dict[int, np.ndarray[Any, Any]]:
        share = ingest.verl_style(work)
        share[3] = share[3] + 1
        return share

    monkeypatch.setattr(ingest, "ours", off_by_one)
    assert main(["bench", "ingest", *TINY]) == EXIT_CHECK_FAILED
    captured = capsys.readouterr()
    assert "ours: micro-batch 3 differs from the floor's" in captured.err
    assert "median ms" not in captured.out


def test_bench_ingest_can_decode_with_the_standard_library_and_restores_the_decoder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = decoder_name()
    assert bench_ingest(capsys, "--stdlib-base64")["shape"]["base64"] == "base64"
    assert decoder_name() == before


def test_bench_ingest_refuses_fewer_sequences_than_micro_batches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "ingest", "--sequences", "6"]) == EXIT_BAD_INPUT
    assert "6 sequences cannot fill the workload's 16 micro-batches" in capsys.readouterr().err


def test_bench_ingest_refuses_a_longest_below_the_shortest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "ingest", "--min-len", "64", "--max-len", "32"]) == EXIT_BAD_INPUT
    assert "routereplay bench ingest: the longest sequence" in capsys.readouterr().err


def test_bench_refuses_an_option_of_the_other_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest", "--tokens", "64"]) == EXIT_BAD_INPUT
    assert "--tokens is an option of `routereplay bench router`" in capsys.readouterr().err
    assert main(["bench", "--sequences", "16"]) == EXIT_BAD_INPUT
    assert "--sequences is an option of `routereplay bench ingest`" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda"]) == EXIT_BAD_INPUT
    assert "--device is an option of `routereplay bench ingest`" in capsys.readouterr().err


def test_the_repositorys_script_is_the_cli_case() -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "bench_ingest.py"
    done = subprocess.run(
        [sys.executable, str(script), "--sequences", "5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert "routereplay bench ingest: 5 sequences cannot fill" in done.stderr


def test_bench_router_named_is_the_default_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "router", "--tokens", "64", "--rounds", "1", "--json"]) == EXIT_OK
    named = json.loads(capsys.readouterr().out)
    assert main(["bench", "--tokens", "64", "--rounds", "1", "--json"]) == EXIT_OK
    default = json.loads(capsys.readouterr().out)
    assert named["shape"] == default["shape"]
    assert set(named["seconds"]) == set(default["seconds"])


def test_every_path_agrees_on_sequences_shorter_than_a_cp_chunk() -> None:
    # 2..12 tokens: the zigzag tail chunk of some holds only padding.
    work = ingest.Workload(sequences=32, shortest=2, longest=12)
    reference = ingest.floor(work)
    ingest.check_equal(ingest.verl_style(work), reference, "verl-style")
    ingest.check_equal(ingest.ours(work), reference, "ours")
