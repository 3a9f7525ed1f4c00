"""The `routereplay` command line: version, help, and the layout report."""

from __future__ import annotations

import json
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
