"""The `routereplay` command line: version, help, and the layout report."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import tiny_config

from routereplay import __version__
from routereplay.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"routereplay {__version__}"


def test_the_console_script_is_installed_and_teaches() -> None:
    result = subprocess.run(
        [Path(sys.executable).with_name("routereplay"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Record the experts an MoE model chose" in result.stdout
    assert "layout" in result.stdout and "Exit codes" in result.stdout


@pytest.fixture
def deepseek_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    config = tiny_config("deepseek_v3", num_hidden_layers=8, first_k_dense_replace=2)
    path.write_text(config.to_json_string())
    return path


def test_layout_reports_routed_layers_per_stage_as_json(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layout", str(deepseek_config), "--pp", "2", "--vp", "2", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["moe_layers"] == [2, 3, 4, 5, 6, 7]
    assert report["mtp_layers"] == [8]
    stages = {(s["pp_rank"], s["vp_stage"]): s["moe_layers"] for s in report["stages"]}
    assert stages == {(0, 0): [], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}


def test_layout_prints_a_readable_summary(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layout", str(deepseek_config), "--pp", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "deepseek_v3: 8 decoder layers, 8 experts, top_k=2" in out
    assert "dense:  [0, 1]" in out
    assert "pp_rank 1 vp_stage 0: layers [4, 5, 6, 7], routed [4, 5, 6, 7]" in out


def test_layout_takes_uneven_first_and_last_stages(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["layout", str(deepseek_config), "--pp", "3", "--json"]
    assert main([*argv, "--first-stage-layers", "2", "--last-stage-layers", "2"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"] == {
        "pp_size": 3,
        "vp_size": 1,
        "first_stage_layers": 2,
        "last_stage_layers": 2,
        "account_for_embedding": False,
        "account_for_loss": False,
    }
    assert [s["layers"] for s in report["stages"]] == [[0, 1], [2, 3, 4, 5], [6, 7]]


def test_layout_counts_the_embedding_and_the_loss_as_layers_when_asked(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["layout", str(deepseek_config), "--pp", "2", "--json"]
    assert main([*argv, "--account-for-embedding", "--account-for-loss"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["account_for_embedding"] is True
    assert report["pipeline"]["account_for_loss"] is True
    # 8 layers + 2 pseudo-layers over 2 ranks: 5 slots each, one of them taken.
    assert [s["layers"] for s in report["stages"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_layout_of_uneven_stages_with_accounting_exits_2_with_the_reason(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["layout", str(deepseek_config), "--pp", "2", "--first-stage-layers", "2"]
    assert main([*argv, "--account-for-loss"]) == EXIT_BAD_INPUT
    assert "cannot be combined with account_for_embedding/loss" in capsys.readouterr().err


def test_layout_of_an_impossible_split_exits_2_with_the_reason(
    deepseek_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layout", str(deepseek_config), "--pp", "3"]) == EXIT_BAD_INPUT
    assert "8 layers do not divide over pp_size=3" in capsys.readouterr().err


def test_layout_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layout", str(tmp_path / "nope.json")]) == EXIT_BAD_INPUT
    assert "nope.json" in capsys.readouterr().err


# -- inspect ------------------------------------------------------------------------------


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    """Two sequences on layers 1 and 2 of 4 experts, top-2, with known expert load.

    Layer 1 sends every route to experts 0 and 1; layer 2 spreads them evenly.
    """
    import torch

    from routereplay import MoELayout, RoutingTrace
    from routereplay.store import TraceWriter

    layout = MoELayout.from_dense_pattern([0, 1, 1], num_experts=4, top_k=2)
    first = [[[0, 1], [0, 1]], [[0, 1], [2, 3]], [[1, 0], [0, 1]], [[0, 1], [3, 2]]]
    second = [[[1, 0], [2, 3]], [[-1, -1], [0, 1]]]  # the last token has no route on layer 1
    path = tmp_path / "rollouts.rr"
    with TraceWriter(path, layout, source="vllm", encoding="packed") as writer:
        for experts in (first, second):
            writer.append(RoutingTrace(torch.tensor(experts), (1, 2), 4, "vllm"))
    return path


def test_inspect_reports_a_trace_file_as_json(
    trace_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(trace_file), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["sequences"], report["tokens"], report["no_route_pairs"]) == (2, 6, 1)
    assert (report["num_layers"], report["layers"], report["num_experts"], report["top_k"]) == (
        3,
        [1, 2],
        4,
        2,
    )
    assert (report["source"], report["encoding"], report["bits_per_id"]) == ("vllm", "packed", 2)
    assert report["bytes_per_token"] == trace_file.stat().st_size / 6
    assert report["load"] == {
        "layers": [1, 2],
        "routes": [10, 12],
        "max_share": [0.5, 0.25],
        "min_share": [0.0, 0.25],
        "imbalance": [2.0, 1.0],
    }


def test_inspect_prints_a_readable_summary(
    trace_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(trace_file)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "rollouts.rr: 2 sequences, 6 tokens" in out
    assert "3 decoder layers, routed [1, 2], 4 experts, top_k=2" in out
    assert "encoding:  packed, 2 bits per id" in out
    assert "no route:  1 of 12 (token, layer) pairs" in out
    assert "layer   1: max  50.0%  min   0.0%  imbalance 2.00" in out
    assert "layer   2: max  25.0%  min  25.0%  imbalance 1.00" in out


def test_inspect_of_a_damaged_file_exits_2_naming_the_sequence(
    trace_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = bytearray(trace_file.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    end = json.loads(raw[8 : 8 + length])["routed"]["data_offsets"][1]
    raw[8 + length + end - 1] ^= 0xFF  # the routed mask of the last sequence
    trace_file.write_bytes(bytes(raw))
    assert main(["inspect", str(trace_file), "--json"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "routereplay inspect: " in captured.err and "sequence 1 is damaged" in captured.err


def test_inspect_of_a_truncated_file_exits_2(
    trace_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_file.write_bytes(trace_file.read_bytes()[:-5])
    assert main(["inspect", str(trace_file)]) == EXIT_BAD_INPUT
    assert "rollouts.rr is not a readable trace file" in capsys.readouterr().err


def test_inspect_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nope.rr")]) == EXIT_BAD_INPUT
    assert "nope.rr does not exist" in capsys.readouterr().err


def test_help_lists_inspect(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "inspect" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": "8"},
        {"model_type": "qwen3_moe", "num_hidden_layers": 2.5, "num_experts": 8},
        ["not", "a", "config"],
    ],
    ids=["experts a string", "layers a float", "not an object"],
)
def test_a_malformed_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: object
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["layout", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("routereplay layout: ") and len(err.strip().splitlines()) == 1
