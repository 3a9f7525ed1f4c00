"""`routereplay inspect FILE`: what a trace file holds, every checksum verified."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routereplay.cli.common import EXIT_OK, bad_input, progress

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="summarise a trace file: sequences, layout, size, no-route rows, expert load",
        description=(
            "Read a trace file written by routereplay.store.TraceWriter and print what it "
            "holds: sequences, tokens, the routed layers, experts and top_k it was recorded "
            "for, source, encoding, bytes per token, (token, layer) pairs without a route, "
            "and per routed layer the share of routes of the most and least loaded expert "
            "and the load imbalance (max / mean). Every sequence is read, so every "
            "checksum is verified: a damaged file exits with 2."
        ),
    )
    inspect.add_argument("file", type=Path, help="a trace file written by TraceWriter")
    inspect.add_argument(
        "--sequences",
        action="store_true",
        help="list every sequence: its id, prompt length and token ids",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    inspect.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routereplay.errors import RouteReplayError

    try:
        report = _inspect(args.file, args.sequences)
    except (OSError, RouteReplayError) as error:
        return bad_input("inspect", error)
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
    stored = [name for name in ("tokens", "prompt_lens", "sequence_ids") if report[f"has_{name}"]]
    print(f"  stored:    {', '.join(n.replace('_', ' ') for n in stored) or 'routes only'}")
    print(f"  no route:  {report['no_route_pairs']} of {report['pairs']} (token, layer) pairs")
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
    for entry in report.get("sequence_list", []):
        name = "" if entry["id"] is None else f" {entry['id']}"
        prompt = "" if entry["prompt_len"] is None else f", prompt {entry['prompt_len']}"
        print(f"  sequence {entry['index']}{name}: {entry['num_tokens']} tokens{prompt}")
    return EXIT_OK


def _inspect(path: Path, sequences: bool = False) -> dict[str, Any]:
    """Everything `inspect` reports, read from every sequence of the file at `path`;
    with `sequences`, each sequence's id, prompt length and token ids too."""
    import numpy as np

    from routereplay.store import TraceFile

    with TraceFile(path) as traces:
        layers, experts = len(traces.layers), traces.num_experts
        counts = np.zeros(layers * experts, dtype=np.int64)  # [layers * experts]
        no_route = 0
        # Layer j's ids count into counts[j * experts : (j + 1) * experts].
        shift = (np.arange(layers) * experts)[:, None]
        for trace in progress(traces, len(traces), "sequences"):
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
            "has_prompt_lens": traces.has_prompt_lens,
            "has_sequence_ids": traces.has_sequence_ids,
            "file_bytes": file_bytes,
            "bytes_per_token": file_bytes / tokens if tokens else None,
            "pairs": tokens * layers,
            "no_route_pairs": no_route,
        }
        if sequences:
            report["sequence_list"] = [_sequence(traces, i) for i in range(len(traces))]
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


def _sequence(traces: Any, index: int) -> dict[str, Any]:
    """One sequence's entry in `inspect --sequences`."""
    return {
        "index": index,
        "id": traces.sequence_id(index) if traces.has_sequence_ids else None,
        "num_tokens": traces.num_tokens(index),
        "prompt_len": traces.prompt_len(index) if traces.has_prompt_lens else None,
        "token_ids": traces.tokens(index).tolist() if traces.has_tokens else None,
    }
