"""From engine payloads to one trainer rank's replay targets: the ingestion path of a step.

The workload, the three paths (floor, verl-style, ours by stage) and the measuring live
in `routereplay.bench.ingest` (also `routereplay bench ingest`); see there.

    python benchmarks/bench_ingest.py [--sequences 1000] [--rounds 3] [--device cuda]
        [--stdlib-base64] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from routereplay.bench.ingest import ROUNDS, PathsDisagree, ingestion, render


def main() -> None:
    parser = argparse.ArgumentParser(description="Engine payloads to one rank's replay targets.")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1792)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--device", default="cpu", help="also align on this device (cuda)")
    parser.add_argument(
        "--stdlib-base64", action="store_true", help="decode with base64, not pybase64"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared machine; every case alike
    try:
        report = ingestion(
            args.sequences,
            args.min_len,
            args.max_len,
            args.rounds,
            device=args.device,
            stdlib_base64=args.stdlib_base64,
        )
    except (PathsDisagree, ValueError) as error:
        raise SystemExit(str(error)) from None
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
