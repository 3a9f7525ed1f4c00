"""`routereplay demo`: the problem router replay solves and the fix, in numbers and a plot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
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
            "and --plot keep every number and a picture. About a minute on 2 CPU cores. "
            "--trainer megatron runs the seed's scenario instead: a megatron-core GPTModel "
            "(dense prefix, then MoE layers) split PP=2 x VPP=2 over 2 gloo processes with "
            "full recompute, a bf16 engine copy of it answering in vLLM's wire format, and "
            "verl's pre-fix route mapping measured next to routereplay's (under 4 minutes)."
        ),
    )
    command.add_argument(
        "--trainer",
        choices=("transformers", "megatron"),
        default="transformers",
        help="the training framework (megatron needs routereplay[megatron])",
    )
    command.add_argument(
        "--steps", type=int, default=None, help="GRPO steps per scheme (40; megatron: 10)"
    )
    command.add_argument("--seed", type=int, default=0, help="one seed for every scheme")
    command.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="JSON file of DeepseekV3Config fields overriding the tiny default model",
    )
    command.add_argument("--json", type=Path, default=None, help="write every number here")
    command.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    command.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (megatron: per process, 1)"
    )
    pipeline = command.add_argument_group("megatron pipeline split")
    pipeline.add_argument("--pp", type=int, default=2, help="pipeline ranks (processes), 2")
    pipeline.add_argument(
        "--vp", type=int, default=2, help="virtual stages per rank, 2; 1: no VPP (1F1B)"
    )
    pipeline.add_argument(
        "--first-stage-layers", type=int, default=None, help="layers on rank 0 (uneven split)"
    )
    pipeline.add_argument(
        "--last-stage-layers", type=int, default=None, help="layers on the last rank"
    )
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
    if args.trainer == "megatron":
        if overrides is not None:
            return bad_input("demo", "--model-config sets transformers fields; not with megatron")
        result_or_code = _run_megatron(args)
        if isinstance(result_or_code, int):
            return result_or_code
        result = result_or_code
    else:
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


def _run_megatron(args: argparse.Namespace) -> dict[str, Any] | int:
    """The megatron demo's result, or an exit code for bad input."""
    if importlib.util.find_spec("megatron") is None:
        return bad_input("demo", "--trainer megatron needs megatron-core: routereplay[megatron]")
    from routereplay.demo.megatron_run import DEFAULT_MEGATRON_STEPS, run_megatron_demo
    from routereplay.errors import LayoutError

    with _progress_bar() as progress:
        try:
            return run_megatron_demo(
                steps=args.steps or DEFAULT_MEGATRON_STEPS,
                seed=args.seed,
                pp=args.pp,
                vp=args.vp,
                first_stage_layers=args.first_stage_layers,
                last_stage_layers=args.last_stage_layers,
                progress=progress,
            )
        except LayoutError as error:  # an impossible --pp/--vp/stage split
            return bad_input("demo", error)


# Piped or redirected, a line every this many seconds (and at each phase's end).
LINE_EVERY_S = 10.0


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per phase on a terminal; otherwise a line as each phase
    starts and ends and every `LINE_EVERY_S` seconds in between, with elapsed time, so
    that a piped run never looks hung."""
    if not sys.stderr.isatty() or importlib.util.find_spec("rich") is None:
        start = time.monotonic()
        last = {"printed": start}

        def line(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done in (0, total) or now - last["printed"] >= LINE_EVERY_S:
                last["printed"] = now
                print(
                    f"[{now - start:5.0f} s] {phase}: {done}/{total} steps",
                    file=sys.stderr,
                    flush=True,
                )

        yield line
        return
    from rich.progress import Progress, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        yield update
