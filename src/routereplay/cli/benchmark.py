"""`routereplay bench [router|ingest]`: what replay adds to a router call, and what
ingesting a step's engine payloads costs, on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from routereplay.cli.common import EXIT_CHECK_FAILED, EXIT_OK, bad_input

if TYPE_CHECKING:
    from routereplay.cli.common import Commands

# Each case's own options and their defaults; an option of the other case is refused.
OPTIONS: dict[str, dict[str, object]] = {
    "router": {"tokens": 2048, "experts": 64, "top_k": 8},
    "ingest": {
        "sequences": 1000,
        "min_len": 256,
        "max_len": 1792,
        "stdlib_base64": False,
        "device": "cpu",
    },
}
ROUNDS = {"router": 7, "ingest": 3}


def add(commands: Commands) -> None:
    command = commands.add_parser(
        "bench",
        help="time a router call with record and replay, or a step's ingestion of engine routes",
        description=(
            "Time one case, its variants side by side in interleaved rounds, and print the "
            "ratios. router (the default): one router call natively, recording and "
            "replaying (forward, and forward plus backward). ingest: a step of vLLM server "
            "payloads (base64 .npy, 48 layers, top-8 of 128) to one trainer rank's replay "
            "targets (CP=2 zigzag, PP=4, 16 micro-batches) by a floor (decode, view, copy "
            "the share once), a verl-style zero-filled batch and routereplay (and by stage: "
            "decode, validate, align, trace file write and read), with peak memory; the "
            "three paths' results must be equal, or it exits 1. Whole-model and engine "
            "benchmarks live in the repository's benchmarks/ (make bench)."
        ),
        epilog="Exit codes: 0 ok, 1 the ingestion paths disagree, 2 bad input.",
    )
    command.add_argument(
        "case", nargs="?", choices=tuple(OPTIONS), default="router", help="what to time (router)"
    )
    command.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help="interleaved rounds, the median kept (router 7, ingest 3)",
    )
    command.add_argument(
        "--threads", type=int, default=1, metavar="N", help="torch.set_num_threads (1)"
    )
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    router = command.add_argument_group("router: one call's logits [tokens, experts]")
    router.add_argument("--tokens", type=int, default=None, metavar="N", help="(2048)")
    router.add_argument("--experts", type=int, default=None, metavar="N", help="(64)")
    router.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="experts per token (8)"
    )
    ingest = command.add_argument_group("ingest: the step's sequences")
    ingest.add_argument(
        "--sequences", type=int, default=None, metavar="N", help="at least 16 (1000)"
    )
    ingest.add_argument(
        "--min-len", type=int, default=None, metavar="TOKENS", help="the shortest (256)"
    )
    ingest.add_argument(
        "--max-len", type=int, default=None, metavar="TOKENS", help="the longest (1792)"
    )
    ingest.add_argument(
        "--stdlib-base64",
        action="store_const",
        const=True,
        default=None,
        help="decode with Python's base64 even where pybase64 (routereplay[fast]) is installed",
    )
    ingest.add_argument(
        "--device", default=None, help="also build the rank's share on this device (cuda)"
    )
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    (other,) = set(OPTIONS) - {args.case}
    given = [name for name in OPTIONS[other] if getattr(args, name) is not None]
    foreign = ["--" + name.replace("_", "-") for name in given]
    if foreign:
        options = "is an option" if len(foreign) == 1 else "are options"
        return bad_input(
            f"bench {args.case}",
            f"{', '.join(foreign)} {options} of `routereplay bench {other}`, not {args.case}",
        )
    for name, default in {**OPTIONS[args.case], "rounds": ROUNDS[args.case]}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return _router(args) if args.case == "router" else _ingest(args)


def _router(args: argparse.Namespace) -> int:
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


def _ingest(args: argparse.Namespace) -> int:
    import torch

    from routereplay.bench.ingest import PathsDisagree, ingestion, render

    if args.threads < 1:
        return bad_input("bench ingest", "--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        report = ingestion(
            args.sequences,
            args.min_len,
            args.max_len,
            args.rounds,
            device=args.device,
            stdlib_base64=args.stdlib_base64,
        )
    except ValueError as error:  # a workload that cannot be built
        return bad_input("bench ingest", error)
    except PathsDisagree as error:
        print(
            f"routereplay bench ingest: {error}; that path is wrong, so no times are shown",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    print(json.dumps(report) if args.json else render(report))
    return EXIT_OK
