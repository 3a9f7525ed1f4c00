"""What the controller adds to one router call, next to native top-k selection.

The measurement lives in `routereplay.bench.router` (also `routereplay bench`); see there.

    python benchmarks/bench_controller.py [--tokens 2048] [--experts 64] [--top-k 8]
                                          [--device cpu|cuda] [--dtype float32|bfloat16]
                                          [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from routereplay.bench.router import render, router_overhead


def main() -> None:
    parser = argparse.ArgumentParser(description="Controller overhead per router call.")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine
    dtype = getattr(torch, args.dtype)
    result = router_overhead(args.tokens, args.experts, args.top_k, device=args.device, dtype=dtype)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
