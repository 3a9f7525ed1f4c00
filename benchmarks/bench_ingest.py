"""From engine payloads to one trainer rank's replay targets: the ingestion path of a step.

The workload, the three paths (floor, verl-style, ours by stage) and the measuring live
in `routereplay.bench.ingest`; this script is `routereplay bench ingest` (its options,
output and exit codes), for `make bench`.

    python benchmarks/bench_ingest.py [--sequences 1000] [--rounds 3] [--device cuda]
        [--stdlib-base64] [--json]
"""

from __future__ import annotations

import sys

from routereplay.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "ingest", *sys.argv[1:]]))
