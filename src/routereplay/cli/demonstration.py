"""`routereplay demo`: the problem router replay solves and the fix, in numbers and a plot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routereplay.cli.common import EXIT_BAD_INPUT, EXIT_OK, bad_input

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    command = commands.add_parser(
        "demo",
        help="train a tiny MoE with GRPO three ways (no replay, R2, R3) and compare",
        description=(
            "Warm up a tiny DeepSeek-V3-style MoE on a task with a verifiable reward (sort a "
            "few digits), then run a minimal GRPO loop from the same weights, prompts and "
            "seeds three ways: rollouts sampled in bf16 by the embedded engine, training in "
            "fp32, with no replay, with R2 (record in the log-prob pass, replay in the "
            "update) and with R3 (replay the engine's routes everywhere). Per step it "
            "measures reward, rollout-trainer routing disagreement (under R3: on replayed "
            "rows, and what the trainer's router would have chosen), the log-prob mismatch "
            "(mean |delta|, k3 KL, F(2)) and an fp32 noise floor. Prints a table; --json "
            "and --plot keep every number and a picture. About a minute on 2 CPU cores."
        ),
    )
    command.add_argument("--steps", type=int, default=None, help="GRPO steps per scheme (40)")
    command.add_argument("--seed", type=int, default=0, help="one seed for every scheme")
    command.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="JSON file of DeepseekV3Config fields overriding the tiny default model",
    )
    command.add_argument("--json", type=Path, default=None, help="write every number here")
    command.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    command.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import torch

        from routereplay.demo import DEFAULT_STEPS, plot, render_table, run_demo
    except ImportError as error:
        return bad_input("demo", ImportError(f"{error}; install routereplay[hf,plot]"))
    try:
        overrides = json.loads(args.model_config.read_text()) if args.model_config else None
    except (OSError, json.JSONDecodeError) as error:
        return bad_input("demo", error)
    torch.set_num_threads(args.threads)
    with _progress_bar() as progress:
        try:
            result = run_demo(
                steps=args.steps or DEFAULT_STEPS,
                seed=args.seed,
                model_config=overrides,
                progress=progress,
            )
        except (ValueError, TypeError) as error:  # bad --steps or --model-config fields
            return bad_input("demo", error)
    print(render_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"every number: {args.json}")
    if args.plot is not None:
        try:
            print(f"plot: {plot(result, args.plot)}")
        except ImportError:
            print("routereplay demo: --plot needs matplotlib (routereplay[plot])", file=sys.stderr)
            return EXIT_BAD_INPUT
    return EXIT_OK


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per phase on a terminal; one line per phase otherwise."""
    if not sys.stderr.isatty() or importlib.util.find_spec("rich") is None:

        def line(phase: str, done: int, total: int) -> None:
            if done == 0:
                print(f"{phase}: {total} steps", file=sys.stderr, flush=True)

        yield line
        return
    from rich.progress import Progress

    tasks: dict[str, Any] = {}
    with Progress() as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        yield update
