"""`routereplay compare A B`: how often two trace files of the same tokens route
differently."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from routereplay.cli.common import EXIT_CHECK_FAILED, EXIT_OK, bad_input, progress

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    command = commands.add_parser(
        "compare",
        help="how often two trace files of the same tokens route differently",
        description=(
            "Compare two trace files sequence by sequence (e.g. the rollout engine's routes "
            "and the trainer's recorded ones): the share of (token, layer) pairs whose expert "
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
        help="fail (exit 1) above this share of differing (token, layer) pairs, e.g. 0.01",
    )
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    from routereplay.align import concat_traces
    from routereplay.errors import RouteReplayError, TraceError
    from routereplay.metrics import routing_agreement
    from routereplay.store import TraceFile

    try:
        with TraceFile(args.a) as a, TraceFile(args.b) as b:
            if len(a) != len(b):
                raise TraceError(f"{args.a} holds {len(a)} sequences, {args.b} {len(b)}.")
            pairs = []
            for index in progress(range(len(a)), len(a), "sequences"):
                first, second = a.trace(index), b.trace(index)
                if first.token_shape != second.token_shape:
                    raise TraceError(
                        f"Sequence {index} has {first.num_rows} tokens in {args.a} and "
                        f"{second.num_rows} in {args.b}: not the same tokens."
                    )
                pairs.append((first, second))
        # One comparison over every token: rows and layers weigh alike across sequences.
        joined = [concat_traces(side)[0] for side in zip(*pairs, strict=True)]
        agreement = routing_agreement(*joined)
    except (OSError, RouteReplayError) as error:
        return bad_input("compare", error)
    report = {"a": str(args.a), "b": str(args.b), "sequences": len(pairs), **agreement.to_dict()}
    failed = args.max_disagreement is not None and (
        agreement.router_disagreement > args.max_disagreement
    )
    report["max_disagreement"] = args.max_disagreement
    report["failed"] = failed
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.a} vs {args.b}: {len(pairs)} sequences, {agreement.pairs} (token, layer) pairs"
        )
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
