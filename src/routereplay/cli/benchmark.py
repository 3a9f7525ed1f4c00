"""`routereplay bench`: what replay adds to a router call on this machine."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from routereplay.cli.common import EXIT_OK, bad_input

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    command = commands.add_parser(
        "bench",
        help="measure what record and replay add to one router call, next to native routing",
        description=(
            "Time one router call natively, recording and replaying (forward, and forward "
            "plus backward), side by side with interleaved rounds, and print the ratios. "
            "Whole-model and engine benchmarks live in the repository's benchmarks/ "
            "(make bench)."
        ),
    )
    command.add_argument("--tokens", type=int, default=2048)
    command.add_argument("--experts", type=int, default=64)
    command.add_argument("--top-k", type=int, default=8)
    command.add_argument("--rounds", type=int, default=7)
    command.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from routereplay.bench.router import render, router_overhead
    from routereplay.errors import RouteReplayError

    if min(args.tokens, args.experts, args.top_k, args.rounds, args.threads) < 1:
        return bad_input("bench", ValueError("every size must be at least 1"))
    torch.set_num_threads(args.threads)
    try:
        result = router_overhead(args.tokens, args.experts, args.top_k, args.rounds)
    except RouteReplayError as error:  # e.g. top_k above the expert count
        return bad_input("bench", error)
    print(json.dumps(result) if args.json else render(result))
    return EXIT_OK
