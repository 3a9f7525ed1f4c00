"""The `routereplay` command line.

`routereplay demo` trains a tiny MoE with GRPO without replay, with R2 and with R3,
and shows the routing disagreement and log-prob mismatch each leaves;
`routereplay layout CONFIG.json` shows which layers route and where each pipeline
stage's routed layers are; `routereplay import vllm|sglang` turns saved engine
responses into a trace file; `routereplay inspect FILE` summarises a trace file and
checks every sequence's checksum; `routereplay compare A B` measures how often two
trace files of the same tokens route differently; `routereplay bench` times what
record and replay add to a router call, and `routereplay bench ingest` what ingesting
a step's engine payloads for one trainer rank costs; `routereplay serve MODEL_DIR`
stands in for `vllm serve --enable-return-routed-experts` on CPU.

Each subcommand is a module with `add(commands)`, which registers its parser and sets
`run`, and `run(args) -> exit code`; `main` only dispatches.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from routereplay import __version__
from routereplay.cli import (
    benchmark,
    comparison,
    demonstration,
    inspection,
    layout,
    payloads,
    serving,
)
from routereplay.cli.common import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, bad_input
from routereplay.errors import RouteReplayError

__all__ = ["EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_OK", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.run(args))
    except (RouteReplayError, OSError, UnicodeDecodeError, ValueError) as error:
        # Bad input a subcommand did not catch itself: one line, exit 2, no traceback.
        return bad_input(args.command, error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routereplay",
        description=(
            "Record the experts an MoE model chose for every token and layer, carry them "
            "from the rollout engine to the trainer, and replay them exactly (R2 / R3)."
        ),
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"routereplay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (demonstration, layout, payloads, inspection, comparison, benchmark, serving):
        command.add(commands)
    return parser
