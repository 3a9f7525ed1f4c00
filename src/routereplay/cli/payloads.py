"""`routereplay import vllm|sglang`: saved engine responses into a checked trace file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from routereplay.cli.common import EXIT_OK, bad_input, progress

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    from routereplay.engines.responses import ENGINES

    command = commands.add_parser(
        "import",
        help="turn saved vLLM or SGLang responses (JSON lines) into a trace file",
        description=(
            "Read engine responses saved one JSON value per line, check every sample's "
            "routes against the model's layout (row count, layer count, top_k, id range, "
            "dense layers, broken captures) and write them, with their token ids, prompt "
            "lengths and ids, to a trace file for the trainer. A line is the response "
            'body as received, or {"request": ..., "response": ...}: the request fills in '
            "what the response lacks (a generate call's prompt, the routed-experts start). "
            "The endpoint is told from the body. vllm: /v1/completions, "
            "/v1/chat/completions, /inference/v1/generate (a stream as its list of data: "
            "lines), or one flat offline completion. sglang: /generate (one object or a "
            "batch list), /v1/completions, /v1/chat/completions."
        ),
    )
    command.add_argument("engine", choices=ENGINES, help="the engine that wrote the responses")
    command.add_argument("payloads", type=Path, help="responses, one JSON object per line")
    command.add_argument(
        "--config", type=Path, required=True, help="the served model's config.json"
    )
    command.add_argument("-o", "--output", type=Path, required=True, help="trace file to write")
    command.add_argument(
        "--encoding",
        choices=("compact", "packed"),
        default="compact",
        help="compact: 1-2 bytes per id; packed: ceil(log2 experts) bits per id",
    )
    command.add_argument(
        "--force", action="store_true", help="overwrite the output file if it exists"
    )
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routereplay.engines.responses import rollouts_from_saved
    from routereplay.errors import RouteReplayError, TraceFileError
    from routereplay.layout import MoELayout
    from routereplay.store import TraceWriter

    try:
        if args.output.exists() and not args.force:
            raise TraceFileError(
                f"{args.output} exists; pass --force to overwrite it, or choose another -o."
            )
        layout = MoELayout.from_hf_config(json.loads(args.config.read_text()))
        with args.payloads.open("rb") as counting:
            total = sum(1 for _ in counting)  # for the progress line; memory stays flat
        sequences = tokens = 0
        # An error leaves no output file: the writer discards on exceptions.
        with (
            args.payloads.open(encoding="utf-8") as lines,
            TraceWriter(args.output, layout, source=args.engine, encoding=args.encoding) as out,
        ):
            for number, text in progress(enumerate(lines, 1), total, "responses"):
                if not text.strip():
                    continue
                try:
                    saved = json.loads(text)
                except json.JSONDecodeError as error:
                    raise RouteReplayError(f"line {number} is not JSON: {error}") from None
                for rollout in rollouts_from_saved(args.engine, saved, layout, f"line {number}"):
                    try:
                        out.append_rollout(rollout)
                    except RouteReplayError as error:
                        # The writer counts sequences; a user looks for the line.
                        raise type(error)(f"line {number}: {error}") from None
                    sequences += 1
                    tokens += rollout.prompt_len + rollout.completion_len
    except UnicodeDecodeError as error:
        return bad_input("import", f"{args.payloads} is not UTF-8 text ({error})")
    except (OSError, json.JSONDecodeError, RouteReplayError) as error:
        return bad_input("import", error)
    report = {
        "output": str(args.output),
        "engine": args.engine,
        "sequences": sequences,
        "tokens": tokens,
        "bytes": args.output.stat().st_size,
        "layers": list(layout.moe_layers),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.output}: {sequences} sequences, {tokens} tokens from {args.engine}, "
            f"{report['bytes']} bytes, routed layers {report['layers']}"
        )
    return EXIT_OK
