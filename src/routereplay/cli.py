"""The `routereplay` command line.

Today: `routereplay layout CONFIG.json` shows which layers route and where each
pipeline stage's routed layers are; `routereplay import vllm|sglang` turns saved
engine responses into a trace file; `routereplay inspect FILE` summarises a trace
file and checks every sequence's checksum; `routereplay compare A B` measures how
often two trace files of the same tokens route differently. `demo` and `bench` arrive
with the issues that build them; they are not listed until they work.

Each subcommand is one `_add_<verb>(commands)` that registers its parser and sets
`run` to a `_run_<verb>(args) -> exit code`; `main` only dispatches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from routereplay import __version__

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Item = TypeVar("Item")
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]  # add_subparsers() returns it


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    return int(args.run(args))


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
    _add_layout(commands)
    _add_import(commands)
    _add_inspect(commands)
    _add_compare(commands)
    return parser


def _bad_input(command: str, error: Exception) -> int:
    print(f"routereplay {command}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _progress(items: Iterable[Item], total: int, label: str) -> Iterator[Item]:
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


# -- layout -------------------------------------------------------------------------------


def _add_layout(commands: Commands) -> None:
    layout = commands.add_parser(
        "layout",
        help="show which decoder layers route, overall and per pipeline stage",
        description=(
            "Read a Hugging Face config.json and print its routed layers (global, 0-based), "
            "its dense layers, and, with --pp, the layers megatron-core places on each "
            "(pipeline rank, virtual stage). Use it to check that an engine's all-layer "
            "routes line up with the trainer's routers before a run."
        ),
    )
    layout.add_argument("config", type=Path, help="a model's config.json")
    layout.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    layout.add_argument("--vp", type=int, default=1, help="virtual stages per pipeline rank")
    layout.add_argument("--first-stage-layers", type=int, default=None)
    layout.add_argument("--last-stage-layers", type=int, default=None)
    layout.add_argument("--json", action="store_true", help="print JSON for machines")
    layout.set_defaults(run=_run_layout)


def _run_layout(args: argparse.Namespace) -> int:
    from routereplay.errors import RouteReplayError
    from routereplay.layout import MoELayout

    try:
        config = json.loads(args.config.read_text())
        layout = MoELayout.from_hf_config(config)
        stages = [
            {
                "pp_rank": rank,
                "vp_stage": stage,
                "layers": list(layers),
                "moe_layers": [i for i in layers if layout.is_moe(i)],
            }
            for stage in range(args.vp)
            for rank in range(args.pp)
            for layers in [
                layout.stage_layers(
                    args.pp,
                    rank,
                    args.vp,
                    stage,
                    args.first_stage_layers,
                    args.last_stage_layers,
                )
            ]
        ]
    except (OSError, json.JSONDecodeError, RouteReplayError) as error:
        return _bad_input("layout", error)
    report = {"family": layout.family, **layout.fingerprint, "stages": stages}
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(
        f"{layout.family}: {layout.num_layers} decoder layers, {layout.num_experts} experts, "
        f"top_k={layout.top_k}"
    )
    print(f"  routed: {list(layout.moe_layers)}")
    print(f"  dense:  {list(layout.dense_layers)}")
    if layout.mtp_layers:
        print(f"  MTP:    {list(layout.mtp_layers)}")
    if args.pp > 1:
        for stage in stages:
            print(
                f"  pp_rank {stage['pp_rank']} vp_stage {stage['vp_stage']}: "
                f"layers {stage['layers']}, routed {stage['moe_layers']}"
            )
    return EXIT_OK


# -- import -------------------------------------------------------------------------------


def _add_import(commands: Commands) -> None:
    from routereplay.engines.responses import ENGINES

    command = commands.add_parser(
        "import",
        help="turn saved vLLM or SGLang responses (JSON lines) into a trace file",
        description=(
            "Read engine responses saved one JSON object per line, with their token ids, "
            "check every sequence's routes against the model's layout (row count, layer "
            "count, top_k, id range, dense layers, broken captures) and write them to a "
            "trace file for the trainer. vllm: an OpenAI-compatible response with "
            "prompt_token_ids and per-choice token_ids and routed_experts (one sequence per "
            "choice), or one flat completion. sglang: a /generate response with the "
            "request's input_ids merged in, or a JSON list of them."
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
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    from routereplay.engines.responses import sequences_from_response
    from routereplay.errors import RouteReplayError
    from routereplay.layout import MoELayout
    from routereplay.store import TraceWriter

    try:
        layout = MoELayout.from_hf_config(json.loads(args.config.read_text()))
        lines = args.payloads.read_text().splitlines()
        sequences = tokens = 0
        # An error leaves no output file: the writer discards on exceptions.
        with TraceWriter(args.output, layout, source=args.engine, encoding=args.encoding) as out:
            for number, text in _progress(enumerate(lines, 1), len(lines), "responses"):
                if not text.strip():
                    continue
                try:
                    response = json.loads(text)
                except json.JSONDecodeError as error:
                    raise RouteReplayError(f"line {number} is not JSON: {error}") from None
                for decoded in sequences_from_response(args.engine, response, layout, number):
                    out.append(decoded.routes, tokens=decoded.tokens)
                    sequences += 1
                    tokens += len(decoded.tokens)
    except (OSError, json.JSONDecodeError, RouteReplayError) as error:
        return _bad_input("import", error)
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


# -- inspect ------------------------------------------------------------------------------


def _add_inspect(commands: Commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="summarise a trace file: sequences, layout, size, no-route rows, expert load",
        description=(
            "Read a trace file written by routereplay.store.TraceWriter and print what it "
            "holds: sequences, tokens, the routed layers, experts and top_k it was recorded "
            "for, source, encoding, bytes per token, (token, layer) rows without a route, "
            "and per routed layer the share of routes of the most and least loaded expert "
            "and the load imbalance (max / mean). Every sequence is read, so every "
            "checksum is verified: a damaged file exits with 2."
        ),
    )
    inspect.add_argument("file", type=Path, help="a trace file written by TraceWriter")
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    inspect.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from routereplay.errors import RouteReplayError

    try:
        report = _inspect(args.file)
    except (OSError, RouteReplayError) as error:
        return _bad_input("inspect", error)
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    per_token = report["bytes_per_token"]
    print(f"{args.file}: {report['sequences']} sequences, {report['tokens']} tokens")
    print(f"  source:    {report['source']}")
    print(f"  encoding:  {report['encoding']}, {report['bits_per_id']} bits per id")
    print(
        f"  layers:    {report['num_layers']} decoder layers, routed {report['layers']}, "
        f"{report['num_experts']} experts, top_k={report['top_k']}"
    )
    print(
        f"  size:      {report['file_bytes']} bytes, "
        f"{'-' if per_token is None else f'{per_token:.2f}'} bytes per token"
    )
    print(f"  token ids: {'stored' if report['has_tokens'] else 'not stored'}")
    print(f"  no route:  {report['no_route_rows']} of {report['rows']} (token, layer) rows")
    print("  expert load per routed layer (share of routes; imbalance = max / mean):")
    load = report["load"]
    for layer, most, least, imbalance in zip(
        load["layers"], load["max_share"], load["min_share"], load["imbalance"], strict=True
    ):
        if imbalance is None:
            print(f"    layer {layer:>3}: no routes")
        else:
            print(
                f"    layer {layer:>3}: max {most:6.1%}  min {least:6.1%}  "
                f"imbalance {imbalance:.2f}"
            )
    return EXIT_OK


def _inspect(path: Path) -> dict[str, Any]:
    """Everything `inspect` reports, read from every sequence of the file at `path`."""
    import numpy as np

    from routereplay.store import TraceFile

    with TraceFile(path) as traces:
        layers, experts = len(traces.layers), traces.num_experts
        counts = np.zeros(layers * experts, dtype=np.int64)  # [layers * experts]
        no_route = 0
        # Layer j's ids count into counts[j * experts : (j + 1) * experts].
        shift = (np.arange(layers) * experts)[:, None]
        for trace in _progress(traces, len(traces), "sequences"):
            ids = trace.expert_ids().numpy()  # [tokens, layers, top_k]
            routed = ids[..., 0] >= 0  # [tokens, layers]
            no_route += int((~routed).sum())
            counts += np.bincount((ids + shift)[routed].ravel(), minlength=layers * experts)
        fingerprint = traces.layout_fingerprint
        tokens = traces.total_tokens
        file_bytes = path.stat().st_size
        report = {
            "path": str(path),
            "sequences": len(traces),
            "tokens": tokens,
            "num_layers": fingerprint["num_layers"],
            "layers": list(traces.layers),
            "mtp_layers": fingerprint["mtp_layers"],
            "num_experts": experts,
            "top_k": traces.top_k,
            "source": traces.source,
            "encoding": traces.encoding,
            "bits_per_id": traces.bits_per_id,
            "has_tokens": traces.has_tokens,
            "file_bytes": file_bytes,
            "bytes_per_token": file_bytes / tokens if tokens else None,
            "rows": tokens * layers,
            "no_route_rows": no_route,
        }
    per_layer = counts.reshape(layers, experts)
    routes = per_layer.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        most = per_layer.max(axis=1) / routes
        least = per_layer.min(axis=1) / routes

    def listed(values: Any) -> list[float | None]:
        return [float(v) if total else None for v, total in zip(values, routes, strict=True)]

    report["load"] = {
        "layers": report["layers"],
        "routes": routes.tolist(),
        "max_share": listed(most),
        "min_share": listed(least),
        "imbalance": listed(most * experts),  # max / mean, the mean share being 1 / experts
    }
    return report


if __name__ == "__main__":
    raise SystemExit(main())


# -- compare ------------------------------------------------------------------------------


def _add_compare(commands: Commands) -> None:
    command = commands.add_parser(
        "compare",
        help="how often two trace files of the same tokens route differently",
        description=(
            "Compare two trace files sequence by sequence (e.g. the rollout engine's routes "
            "and the trainer's recorded ones): the share of (token, layer) rows whose expert "
            "sets differ, the share of tokens differing on any layer, per-layer "
            "disagreement, mean overlap@k and Jaccard. Rows without a route (-1) in either "
            "file are left out and counted. Exits 1 when the router-level disagreement "
            "exceeds --max-disagreement."
        ),
    )
    command.add_argument("a", type=Path, help="a trace file")
    command.add_argument("b", type=Path, help="a trace file of the same sequences")
    command.add_argument(
        "--max-disagreement",
        type=float,
        default=None,
        help="fail (exit 1) above this share of differing (token, layer) rows, e.g. 0.01",
    )
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from routereplay.errors import RouteReplayError, TraceError
    from routereplay.metrics import routing_agreement
    from routereplay.store import TraceFile
    from routereplay.trace import RoutingTrace

    try:
        with TraceFile(args.a) as a, TraceFile(args.b) as b:
            if len(a) != len(b):
                raise TraceError(f"{args.a} holds {len(a)} sequences, {args.b} {len(b)}.")
            pairs = []
            for index in _progress(range(len(a)), len(a), "sequences"):
                first, second = a.trace(index), b.trace(index)
                if first.leading_shape != second.leading_shape:
                    raise TraceError(
                        f"Sequence {index} has {first.num_rows} tokens in {args.a} and "
                        f"{second.num_rows} in {args.b}: not the same tokens."
                    )
                pairs.append((first, second))
        # One comparison over every token: rows and layers weigh alike across sequences.
        joined = [
            RoutingTrace(torch.cat([t.experts for t in side]), side[0].layers, side[0].num_experts)
            for side in zip(*pairs, strict=True)
        ]
        agreement = routing_agreement(*joined)
    except (OSError, RouteReplayError) as error:
        return _bad_input("compare", error)
    report = {"a": str(args.a), "b": str(args.b), "sequences": len(pairs), **agreement.to_dict()}
    failed = args.max_disagreement is not None and (
        agreement.router_disagreement > args.max_disagreement
    )
    report["max_disagreement"] = args.max_disagreement
    report["failed"] = failed
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.a} vs {args.b}: {len(pairs)} sequences, {agreement.rows} (token, layer) rows")
        print(f"  router disagreement: {agreement.router_disagreement:.4%}")
        print(f"  token disagreement:  {agreement.token_disagreement:.4%}")
        print(f"  overlap@k {agreement.overlap_at_k:.4f}, Jaccard {agreement.jaccard:.4f}")
        print(f"  rows without a route in either file: {agreement.skipped}")
        worst = sorted(agreement.per_layer.items(), key=lambda item: -item[1])[:5]
        print("  most disagreeing layers: " + ", ".join(f"{k}: {v:.2%}" for k, v in worst))
        if failed:
            print(
                f"routereplay compare: disagreement {agreement.router_disagreement:.4%} is above "
                f"--max-disagreement {args.max_disagreement:.4%}",
                file=sys.stderr,
            )
    return EXIT_CHECK_FAILED if failed else EXIT_OK
