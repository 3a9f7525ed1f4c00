"""What recording routes costs the embedded engine's generation.

A random Qwen3-MoE (8 layers, 64 experts, top-8 by default) in bf16 generates a batch
of completions with a KV cache, three ways, side by side in one run with the case order
rotating every round:
  native    routers untouched (controller detached), nothing recorded
  attached  routers patched, routing natively through the controller, nothing recorded
  record    routes of prefill and every decode step recorded into per-sequence traces
The target: record at most 5% slower than native. Read the ratios; absolute times
depend on the (shared) machine.

    python benchmarks/bench_engine.py [--batch 8] [--prompt 64] [--new 64] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from tiny_moe import random_qwen3_moe

import routereplay
from routereplay.engines.hf import RecordingEngine, SamplingParams

CASES = ("native", "attached", "record")


def build_model(args: argparse.Namespace) -> Any:
    return random_qwen3_moe(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        heads=max(1, args.hidden // 64),
        vocab=1024,
        positions=args.prompt + args.new + 8,
        head_dim=64 if args.hidden >= 64 else args.hidden,
        norm_topk_prob=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Route-recording overhead of generation.")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = RecordingEngine(build_model(args), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 1024, (args.batch, args.prompt), generator=generator).tolist()
    # No stop token: every case generates exactly the same number of tokens.
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0)

    def run(case: str) -> float:
        attached = engine.controller.attached
        if case == "native" and attached:
            engine.controller.detach()
        elif case != "native" and not attached:
            engine.controller = routereplay.attach(engine.model, source="hf-engine")
        start = time.perf_counter()
        engine.generate(prompts, params, record_routes=case == "record")
        return time.perf_counter() - start

    for case in CASES:  # warm up
        run(case)
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    for round_index in range(args.rounds):
        order = CASES[round_index % len(CASES) :] + CASES[: round_index % len(CASES)]
        for case in order:
            samples[case].append(run(case))
    median = {case: sorted(v)[len(v) // 2] for case, v in samples.items()}
    ratios = {
        "record / native": median["record"] / median["native"],
        "attached / native": median["attached"] / median["native"],
    }
    tokens = args.batch * (args.prompt + args.new)
    if args.json:
        print(json.dumps({"args": vars(args), "seconds": median, "ratios": ratios}, indent=2))
        return
    print(
        f"bf16 generation: {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
        f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens ({tokens} tokens)"
    )
    for case, seconds in median.items():
        print(f"  {case:<9} {seconds:7.2f} s")
    for name, ratio in ratios.items():
        print(f"  {name:<18} {ratio:6.3f}x")


if __name__ == "__main__":
    main()
