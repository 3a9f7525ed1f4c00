"""What the controller adds to one router call, measured next to native selection.

Side by side in one run, for logits `[tokens, experts]`:
  native select    routing.select: scores, top-k, gate weights (what a router does anyway)
  record route     controller.route in record mode (native + keep the ids)
  replay route     controller.route in replay mode (trace ids, native ids for the
                   counterfactual count, gate weights at the replayed ids)
  native/replay fwd+bwd   the same through autograd
  replay entry     entering replay(): re-validating the trace, once per step, not per layer
Ratios are what to read; absolute times depend on the (shared) machine.
`routereplay bench` (`routereplay bench router`) and benchmarks/bench_controller.py run this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from routereplay.controller import ReplayController
from routereplay.layout import MoELayout
from routereplay.routing import RouterSpec, select

CALLS = 40


def router_overhead(
    tokens: int = 2048,
    experts: int = 64,
    top_k: int = 8,
    rounds: int = 7,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Median seconds per case and the ratios against native selection (JSON data).

    On a GPU (`device="cuda"`) the logits live there in `dtype` and every timing ends
    with a synchronize; the routes to replay stay on the host, as a trainer holds
    them, and are copied to the router's device per call.
    """
    torch.manual_seed(0)
    layout = MoELayout.from_dense_pattern([1], experts, top_k)
    spec = RouterSpec(top_k, "softmax", renormalize=True)
    logits = torch.randn(tokens, experts, device=device, dtype=dtype)
    leaf = logits.clone().requires_grad_()
    controller = ReplayController(layout)
    with controller.record() as recording:
        controller.route(0, torch.randn_like(logits), spec)  # other logits: real disagreement
    # One micro-batch key per call, so every call is a first visit, not a recompute.
    routes = dict.fromkeys(range(CALLS), recording.trace)

    def synchronize() -> None:
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)

    def per_call(body: Callable[[], object], mode: str) -> float:
        context = controller.replay(routes) if mode == "replay" else controller.record()
        with context:
            synchronize()
            start = time.perf_counter()
            for micro_batch in range(CALLS):
                controller.set_micro_batch(micro_batch)
                body()
            synchronize()
            return (time.perf_counter() - start) / CALLS

    def plain(body: Callable[[], object]) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            body()
        synchronize()
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
        "native fwd+bwd": lambda: plain(lambda: _backward(select(leaf, spec).weights)),
        "replay fwd+bwd": lambda: per_call(
            lambda: _backward(controller.route(0, leaf, spec).weights), "replay"
        ),
        "replay entry": replay_entry,
    }
    # Interleave rounds so that machine noise hits every case alike; keep the medians.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            samples[name].append(case())
    median = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    ratios = {
        "record / native select": median["record route"] / median["native select"],
        "replay / native select": median["replay route"] / median["native select"],
        "replay / native fwd+bwd": median["replay fwd+bwd"] / median["native fwd+bwd"],
        "replay entry / native select": median["replay entry"] / median["native select"],
    }
    shape = {
        "tokens": tokens,
        "experts": experts,
        "top_k": top_k,
        "device": str(logits.device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return {"shape": shape, "seconds": median, "ratios": ratios}


def _backward(weights: torch.Tensor) -> None:
    torch.autograd.backward(weights.sum())


def render(result: dict[str, Any]) -> str:
    """`router_overhead`'s result for people: microseconds per case, then the ratios."""
    shape = result["shape"]
    lines = [f"router call, logits [{shape['tokens']}, {shape['experts']}], top-{shape['top_k']}"]
    lines += [f"  {name:<16} {sec * 1e6:9.1f} us" for name, sec in result["seconds"].items()]
    lines += [f"  {name:<30} {ratio:5.2f}x" for name, ratio in result["ratios"].items()]
    return "\n".join(lines)
