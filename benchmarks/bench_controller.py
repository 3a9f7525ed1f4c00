"""What the controller adds to one router call, next to native top-k selection.

Side by side in one run, for logits `[tokens, experts]`:
  native select    routing.select: scores, top-k, gate weights (what a router does anyway)
  record route     controller.route in record mode (native + keep the ids)
  replay route     controller.route in replay mode (trace ids, native ids for the
                   counterfactual count, gate weights at the replayed ids)
  native/replay fwd+bwd   the same through autograd
  replay entry     entering replay(): re-validating the trace, once per step, not per layer
Ratios are what to read; absolute times depend on the (shared) machine.

    python benchmarks/bench_controller.py [--tokens 2048] [--experts 64] [--top-k 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from routereplay import MoELayout, ReplayController, RouterSpec, select

CALLS = 40
ROUNDS = 7


def main() -> None:
    parser = argparse.ArgumentParser(description="Controller overhead per router call.")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # steadier on a shared 2-core machine

    layout = MoELayout.from_dense_pattern([1], args.experts, args.top_k)
    spec = RouterSpec(args.top_k, "softmax", renormalize=True)
    logits = torch.randn(args.tokens, args.experts)
    leaf = logits.clone().requires_grad_()
    controller = ReplayController(layout)
    with controller.record() as recording:
        controller.route(0, torch.randn_like(logits), spec)  # other logits: real disagreement
    # One micro-batch key per call, so every call is a first visit, not a recompute.
    routes = dict.fromkeys(range(CALLS), recording.trace)

    def per_call(body: Callable[[], object], mode: str) -> float:
        context = controller.replay(routes) if mode == "replay" else controller.record()
        with context:
            start = time.perf_counter()
            for mb in range(CALLS):
                controller.set_micro_batch(mb)
                body()
            return (time.perf_counter() - start) / CALLS

    def plain(body: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(CALLS):
            body()
        return (time.perf_counter() - start) / CALLS

    def replay_entry() -> float:
        start = time.perf_counter()
        with controller.replay(routes[0]):
            pass
        return time.perf_counter() - start

    cases: dict[str, Callable[[], float]] = {
        "native select": lambda: plain(lambda: select(logits, spec)),
        "record route": lambda: per_call(lambda: controller.route(0, logits, spec), "record"),
        "replay route": lambda: per_call(lambda: controller.route(0, logits, spec), "replay"),
        "native fwd+bwd": lambda: plain(lambda: select(leaf, spec).weights.sum().backward()),
        "replay fwd+bwd": lambda: per_call(
            lambda: controller.route(0, leaf, spec).weights.sum().backward(), "replay"
        ),
        "replay entry": replay_entry,
    }
    # Interleave rounds so that machine noise hits every case alike; keep the medians.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, case in cases.items():
            samples[name].append(case())
    median = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    ratios = {
        "record / native select": median["record route"] / median["native select"],
        "replay / native select": median["replay route"] / median["native select"],
        "replay / native fwd+bwd": median["replay fwd+bwd"] / median["native fwd+bwd"],
        "replay entry / native select": median["replay entry"] / median["native select"],
    }
    shape = {"tokens": args.tokens, "experts": args.experts, "top_k": args.top_k}
    if args.json:
        print(json.dumps({"shape": shape, "seconds": median, "ratios": ratios}, indent=2))
        return
    print(f"router call, logits [{args.tokens}, {args.experts}], top-{args.top_k}")
    for name, seconds in median.items():
        print(f"  {name:<16} {seconds * 1e6:9.1f} us")
    for name, ratio in ratios.items():
        print(f"  {name:<30} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
