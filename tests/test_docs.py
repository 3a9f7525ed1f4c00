"""Every example in README.md and docs/ runs as written.

How a page's fenced blocks are run, in page order, in a fresh folder that also holds
the real vLLM 0.32.0 responses (`vllm-0.32.0/`, as from `tests/data`):

- ```python: executed in-process; the blocks of one page continue each other, as a
  reader reads them.
- ```python title="NAME.py": a whole script, written to NAME.py; a shell block of the
  same page runs it (`torchrun --nproc-per-node 2 NAME.py` for the multi-process ones).
- ```sh: every command runs and must exit 0: `routereplay ...` in-process through the
  console script's `routereplay.cli.main`, `torchrun ... NAME.py` (with the project's
  environment on PATH) under `tests/run_example.py`, which makes megatron-core
  run on CPU (the patches a GPU-less test needs, which no example shows). Commands
  that install, build or start an outside program (`pip install`, `make`, `vllm serve`,
  SGLang's launcher) are not run: `NOT_RUN` lists each such prefix; an example script
  another test runs is left to it (`RUN_ELSEWHERE`); any other command must run.
- any other language (`text`, `json`, ...) is output or data, not code.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from routereplay import cli

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNER = Path(__file__).parent / "run_example.py"
FIXTURES = Path(__file__).parent / "data" / "vllm-0.32.0"
# Shell commands shown to be run elsewhere: installing, building, outside servers.
NOT_RUN = (
    "pip install ",
    "make ",
    "git clone ",
    "cd ",
    "vllm serve ",
    "python -m sglang.launch_server ",
)
# Commands another test runs already, and that test.
RUN_ELSEWHERE = {"python examples/trl_grpo_router_replay.py": "tests/test_trl.py"}
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="([\w.-]+\.py)"')
SCRIPT_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    title: str | None
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match.group(2))
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, match.start()) + 1,
                language=match.group(1),
                title=title.group(1) if title else None,
                code=match.group(3),
            )
        )
    return found


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = line.split(" #")[0].strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def run_command(command: str, where: str, cwd: Path) -> None:
    if command.startswith(NOT_RUN):
        return
    for prefix, test in RUN_ELSEWHERE.items():
        if command.startswith(prefix):
            script = Path(prefix.split()[1]).name
            assert script in (ROOT / test).read_text(), f"{where}: {test} no longer runs {script}"
            return
    words = shlex.split(command)
    if words[0] == "routereplay":
        # In-process, as the console script runs it: the same code, without a
        # subprocess importing torch again.
        code = cli.main(words[1:])
        assert code == 0, f"{where}: `{command}` exited {code}"
        return
    if words[0] != "torchrun":
        pytest.fail(f"{where}: `{command}`: neither run here nor listed in NOT_RUN")
    # The runner goes between torchrun's options and the script.
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    words = ["torchrun", "--standalone", *words[1:script], str(RUNNER), *words[script:]]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # A session of its own: on a timeout every rank torchrun started goes with it.
    process = subprocess.Popen(
        words,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{where}: `{command}` ran past {SCRIPT_TIMEOUT_S} s:\n{output}")
    if process.returncode != 0:
        pytest.fail(f"{where}: `{command}` exited {process.returncode}:\n{output}")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write files where they run
    (tmp_path / "vllm-0.32.0").symlink_to(FIXTURES)
    names: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks_of(page):
        if block.language == "python" and block.title is not None:
            (tmp_path / block.title).write_text(block.code)
        elif block.language == "python":
            # Line numbers of the page itself, so a traceback shows the page's lines.
            code = "\n" * block.line + block.code
            exec(compile(code, str(block.page), "exec"), names)
        elif block.language == "sh":
            for command in shell_commands(block.code):
                run_command(command, block.where, tmp_path)


def test_every_script_is_run_by_its_page() -> None:
    for page in PAGES:
        scripts = [b for b in blocks_of(page) if b.title is not None]
        commands = " ".join(
            c for b in blocks_of(page) if b.language == "sh" for c in shell_commands(b.code)
        )
        for block in scripts:
            assert re.search(rf"(?:^|\s){re.escape(block.title)}(?:\s|$)", commands), (
                f"{block.where}: no shell block of the page runs {block.title}"
            )


def test_every_block_is_run_or_data() -> None:
    """A code block in a language the runner does not know would silently rot."""
    for page in PAGES:
        for block in blocks_of(page):
            assert block.language in {"python", "sh", "text", "json"}, (
                f"{block.where}: a ```{block.language} block; use python, sh, text or json"
            )


def test_the_extras_named_exist() -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for page in PAGES:
        for named in re.findall(r"routereplay\[([\w,]+)\]", page.read_text()):
            assert set(named.split(",")) <= extras, f"{page.name}: routereplay[{named}]"


def test_the_readme_stays_a_front_page() -> None:
    """Usage, design and benchmarks belong in docs/: the README is the commands, what the
    project is, the demo, a quickstart and the map of the documentation."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < 200, f"README.md has {lines} lines: move the detail to a page under docs/"
