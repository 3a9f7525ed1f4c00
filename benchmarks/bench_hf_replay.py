"""A whole training step of a transformers MoE model: native, attached, replay, record.

A random Qwen3-MoE causal LM built from a config (no downloads, float32, train mode),
forward + backward of the next-token cross-entropy on `--tokens` tokens per step,
measured side by side in one run:
  native   the unmodified model (routers not attached, or detached again)
  off      `routereplay.attach(model)`, no context: routing goes through the controller
  replay   `with controller.replay(trace)` around the step, entered once per step (that
           re-validates the trace), the trace recorded once beforehand on the same input;
           it knows its token ids, so replay checks them against the batch (token check)
  unchecked  the same, the trace without token ids: no token check
  record   `with controller.record()` around the step
The weights never change (no optimizer step), so the replayed ids are the native ones:
the experts do the same work in every case and only the routing overhead differs.

Rounds are interleaved, the case order rotating every round, so that machine noise
hits every case alike. Read the ratios: `median` is the ratio of the medians, `paired`
the median over rounds of each round's ratio (steadier while the load drifts).
Absolute times depend on the (shared) machine, whose noise (a few %) can exceed the
routing overhead itself; so the step also reports, in every case, the time spent
inside the router forwards (module hooks, the same in every case, a few us per step)
and, for replay, entering the context: the overhead itself, free of that noise. (The
router backward is not timed apart: native top-k values and replay's gather at given
ids back-propagate at the same cost, within a few us per layer.)

Threads: `torch.set_num_threads(2)` by default, the whole 2-core machine as a trainer
would use it; the routing overhead is Python and small ops that do not scale with
threads, so fewer threads make the step slower and the ratios smaller, not truer.
`--threads 1` is steadier while other work shares the machine.

    python benchmarks/bench_hf_replay.py [--layers 8] [--experts 64] [--top-k 8]
        [--tokens 2048] [--hidden 192] [--rounds 9] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from tiny_moe import random_qwen3_moe

import routereplay
from routereplay.integrations.hf import find_routers

CASES = ("native", "off", "replay", "unchecked", "record")
VOCAB = 1024
WARMUP_STEPS = 2


def build_model(args: argparse.Namespace) -> Any:
    return random_qwen3_moe(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        heads=max(1, args.hidden // 64),
        vocab=VOCAB,
        positions=max(args.tokens // args.batch, 128),
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ).train()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class CheckClock:
    """Seconds spent in replay's batch check (token axes, padding, token ids)."""

    def __init__(self) -> None:
        import routereplay.controller as controller_module

        self.seconds = 0.0
        check = controller_module.check_batch

        def timed(*args: Any) -> None:
            start = time.perf_counter()
            check(*args)
            self.seconds += time.perf_counter() - start

        controller_module.check_batch = timed


class RouterClock:
    """Seconds spent inside every router forward, whichever forward it runs."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        self._start = 0.0
        for router in find_routers(model).values():
            router.register_forward_pre_hook(self._enter)
            router.register_forward_hook(self._exit)

    def _enter(self, module: Any, args: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, module: Any, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay overhead on a whole HF MoE step.")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.tokens % args.batch:
        parser.error(f"--tokens {args.tokens} does not split into --batch {args.batch}.")
    torch.set_num_threads(args.threads)

    model = build_model(args)
    clock = RouterClock(model)
    checks = CheckClock()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(VOCAB, (args.batch, args.tokens // args.batch), generator=generator)

    controller: routereplay.ReplayController | None = None

    def attached(on: bool) -> routereplay.ReplayController | None:
        """Attach or detach (between timed steps, never inside one); the controller."""
        nonlocal controller
        if on and controller is None:
            controller = routereplay.attach(model)
        elif not on and controller is not None:
            controller.detach()
            controller = None
        return controller

    def attached_controller() -> routereplay.ReplayController:
        ctl = attached(True)
        assert ctl is not None
        return ctl

    # The trace to replay: the routing of this very input, recorded once.
    with torch.no_grad(), attached_controller().record() as recording:
        model(input_ids)
    trace = recording.trace
    assert trace.tokens is not None  # a recording keeps the batch's token ids
    unchecked = trace.with_tokens(None)

    entries: list[float] = []  # seconds to enter replay(): the trace re-validation

    def prepare(case: str) -> Callable[[], None]:
        """Untimed: (de)attach, clear the grads, collect garbage; returns the timed step."""
        if case == "native":
            attached(False)
        else:
            ctl = attached_controller()
        model.zero_grad(set_to_none=True)
        gc.collect()

        def plain() -> None:
            model(input_ids, labels=input_ids).loss.backward()

        def in_context() -> None:
            start = time.perf_counter()
            replayed = {"replay": trace, "unchecked": unchecked}.get(case)
            with ctl.replay(replayed) if replayed is not None else ctl.record():
                if case == "replay":
                    entries.append(time.perf_counter() - start)
                plain()

        return plain if case in ("native", "off") else in_context

    check_seconds: list[float] = []  # per replay step: the token check

    def timed(case: str) -> tuple[float, float]:
        """Seconds of one step (context entry included) and of its router forwards."""
        body = prepare(case)
        clock.seconds = checks.seconds = 0.0
        start = time.perf_counter()
        body()
        if case == "replay":
            check_seconds.append(checks.seconds)
        return time.perf_counter() - start, clock.seconds

    for case in CASES:
        for _ in range(WARMUP_STEPS):
            timed(case)
    entries.clear()
    check_seconds.clear()

    steps: dict[str, list[float]] = {case: [] for case in CASES}
    routers: dict[str, list[float]] = {case: [] for case in CASES}
    per_round: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
        this_round: dict[str, list[float]] = {case: [] for case in CASES}
        for case in order:
            for _ in range(args.steps):
                seconds, in_routers = timed(case)
                this_round[case].append(seconds)
                routers[case].append(in_routers)
        for case, values in this_round.items():
            steps[case].extend(values)
        per_round.append({case: median(values) for case, values in this_round.items()})

    # The replayed routing was the native routing: same experts, same work.
    ctl = attached_controller()
    with ctl.replay(trace), torch.no_grad():
        model(input_ids)
    disagreement = ctl.totals().disagreement_rate
    attached(False)

    seconds = {case: median(values) for case, values in steps.items()}
    router_seconds = {case: median(values) for case, values in routers.items()}
    entry = median(entries)
    ratios = {
        f"{case} / native": {
            "median": seconds[case] / seconds["native"],
            "paired": median([r[case] / r["native"] for r in per_round]),
        }
        for case in ("replay", "unchecked", "record", "off")
    }
    token_check = median(check_seconds)
    # Router forwards plus (replay) context entry, over native's router forwards,
    # as a share of the native step: the overhead without the machine's noise.
    extra = {case: router_seconds[case] - router_seconds["native"] for case in CASES}
    extra["replay"] += entry + token_check
    extra["unchecked"] += entry
    overhead = {
        case: extra[case] / seconds["native"] for case in ("replay", "unchecked", "record", "off")
    }
    settings = {
        "model": "qwen3_moe",
        "layers": args.layers,
        "experts": args.experts,
        "top_k": args.top_k,
        "hidden": args.hidden,
        "moe_intermediate": args.hidden // 2,
        "batch": args.batch,
        "seq": args.tokens // args.batch,
        "tokens": args.tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps_per_case": WARMUP_STEPS,
        "experts_implementation": model.config._experts_implementation,
        "torch": torch.__version__,
    }
    if args.json:
        report = {
            "settings": settings,
            "seconds": seconds,
            "min_seconds": {case: min(values) for case, values in steps.items()},
            "router_forward_seconds": router_seconds,
            "replay_entry_seconds": entry,
            "token_check_seconds": token_check,
            "token_check_share": token_check / seconds["native"],
            "ratios": ratios,
            "router_overhead_share": overhead,
            "replay_disagreement": disagreement,
            "samples": steps,
        }
        print(json.dumps(report, indent=2))
        return
    print(
        f"qwen3_moe training step: {args.layers} layers, {args.experts} experts, "
        f"top-{args.top_k}, hidden {args.hidden}, {args.batch}x{args.tokens // args.batch} "
        f"tokens, {args.threads} thread(s), experts impl "
        f"{settings['experts_implementation']}, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"  {'case':<8} {'step median':>12} {'step min':>10} {'router fwd':>11}")
    for case, values in steps.items():
        print(
            f"  {case:<8} {seconds[case] * 1e3:9.1f} ms {min(values) * 1e3:7.1f} ms "
            f"{router_seconds[case] * 1e3:8.2f} ms"
        )
    print(f"  replay entry (trace re-validation) {entry * 1e3:.2f} ms")
    print(
        f"  token check per step {token_check * 1e3:.3f} ms: "
        f"{token_check / seconds['native'] * 100:.3f}% of the native step"
    )
    for name, ratio in ratios.items():
        case = name.split()[0]
        print(
            f"  {name:<16} {ratio['median']:6.3f}x  (paired {ratio['paired']:6.3f}x; "
            f"router overhead {overhead[case] * 100:+.2f}% of the native step)"
        )
    print(
        f"  replay disagreement rate {disagreement:.3f} (0: the replayed ids are the native ones)"
    )


if __name__ == "__main__":
    main()
