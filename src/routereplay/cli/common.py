"""What every subcommand shares: exit codes, the bad-input report, a progress line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Item = TypeVar("Item")
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]  # add_subparsers() returns it


def bad_input(command: str, error: Exception | str) -> int:
    """Report `error` on stderr as `routereplay COMMAND: ...`; exit code 2."""
    print(f"routereplay {command}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def progress(items: Iterable[Item], total: int, label: str) -> Iterator[Item]:
    """Yield `items`, showing `done/total label` on a terminal's stderr after a second."""
    start = last = time.monotonic()
    shown = False
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if sys.stderr.isatty() and now - start > 1 and (now - last > 0.1 or done == total):
            print(f"\r{done}/{total} {label}", end="", file=sys.stderr, flush=True)
            last, shown = now, True
    if shown:
        print(file=sys.stderr)
