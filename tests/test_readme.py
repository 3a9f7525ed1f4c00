"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write files where they run
    # ... and read the real engine responses as from tests/data.
    (tmp_path / "vllm-0.32.0").symlink_to(Path(__file__).parent / "data" / "vllm-0.32.0")
    # The blocks of one section continue each other, as a reader reads them.
    sections = re.split(r"^#{2,3} ", README.read_text(), flags=re.MULTILINE)
    blocks = 0
    for section in sections:
        names: dict[str, object] = {}
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
            exec(compile(block, str(README), "exec"), names)
            blocks += 1
    assert blocks >= 3, "the README should show core, transformers and engine examples"
