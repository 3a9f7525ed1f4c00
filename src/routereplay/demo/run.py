"""`run_demo`: warm the tiny model up once, then run the same GRPO steps per scheme."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from routereplay.demo.grpo import SCHEMES, GRPORun, GRPOSettings, Scheme, train
from routereplay.demo.hf_trainer import HFTrainer
from routereplay.demo.model import DEFAULT_MODEL_CONFIG, WarmUp, build_model, warm_up_model
from routereplay.demo.task import SortDigits
from routereplay.engines.hf import RecordingEngine
from routereplay.layout import MoELayout

Progress = Callable[[str, int, int], None]
"""`progress(phase, done, total)`: phase is "warm-up" or a scheme name; called as each
phase starts (done = 0) and after every step."""

DEFAULT_STEPS = 40


def run_demo(
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    model_config: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    *,
    grpo: GRPOSettings | None = None,
    warm_up: WarmUp | None = None,
    task: SortDigits | None = None,
    schemes: Sequence[Scheme] = SCHEMES,
) -> dict[str, Any]:
    """Warm up a tiny DeepSeek-V3-style model, then run `steps` GRPO steps from it in
    each of `schemes`, all with the same prompts and sampling seeds.

    `model_config` overrides fields of `DEFAULT_MODEL_CONFIG` (any
    `transformers.DeepseekV3Config` field). Returns plain JSON data: "settings",
    "warm_up", and per scheme under "modes" its "steps" (one report each, see
    `grpo.step_report`) and "summary" (means over steps), plus "seconds".
    """
    check_request(steps, schemes)
    grpo = grpo or GRPOSettings()
    warm_up = warm_up or WarmUp()
    task = task or SortDigits()
    start = time.perf_counter()

    def report(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(phase, done, total)

    results: dict[str, Any] = {}
    with _deterministic():
        report("warm-up", 0, warm_up.steps)
        model = build_model(model_config, warm_up, seed)
        warm_up_summary = warm_up_model(
            model, task, warm_up, seed, lambda done: report("warm-up", done, warm_up.steps)
        )
        layout = MoELayout.from_hf_config(model.config)
        for scheme in schemes:
            report(scheme, 0, steps)
            scheme_start = time.perf_counter()

            def on_step(done: int, scheme: str = scheme) -> None:
                report(scheme, done, steps)

            # Both copy `model`, which nothing attaches to: the engine's copy carries
            # none of the trainer's router patches.
            engine = RecordingEngine(model, dtype=torch.bfloat16)
            with HFTrainer(model, grpo.learning_rate) as trainer:
                run = GRPORun(scheme, trainer, engine, task=task, settings=grpo, seed=seed)
                reports = train(run, steps, on_step)
            results[scheme] = {
                "steps": reports,
                "summary": summarise(reports),
                "seconds": time.perf_counter() - scheme_start,
            }

    config = {**DEFAULT_MODEL_CONFIG, **(model_config or {})}
    run_settings = {"steps": steps, "seed": seed, "modes": list(schemes), "model_config": config}
    return demo_result(run_settings, layout, grpo, warm_up, task, warm_up_summary, results, start)


def check_request(steps: int, schemes: Sequence[Scheme]) -> None:
    """Raise `ValueError` unless a demo was asked for at least one step of known schemes."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, found {steps}.")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"Unknown schemes {unknown}; choose from {list(SCHEMES)}.")


def demo_result(
    run_settings: dict[str, Any],
    layout: MoELayout,
    grpo: GRPOSettings,
    warm_up: WarmUp,
    task: SortDigits,
    warm_up_summary: dict[str, Any],
    results: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """The JSON record of a demo run, which `report` renders for either trainer:
    `run_settings` (the trainer's own: steps, seed, modes, model config, ...) first, then
    the settings every demo shares, the warm-up and the per-scheme results."""
    return {
        "settings": {
            **run_settings,
            "moe_layers": list(layout.moe_layers),
            "num_experts": layout.num_experts,
            "top_k": layout.top_k,
            "grpo": dataclasses.asdict(grpo),
            "warm_up": dataclasses.asdict(warm_up),
            "task": {"name": "sort digits", **dataclasses.asdict(task)},
            "engine_dtype": "bfloat16",
            "trainer_dtype": "float32",
            "torch_threads": torch.get_num_threads(),
        },
        "warm_up": warm_up_summary,
        "modes": results,
        "seconds": time.perf_counter() - start,
    }


SUMMARY_FIELDS = (
    "reward",
    "routing_disagreement",
    "completion_routing_disagreement",
    "counterfactual_disagreement",
    "update_counterfactual_disagreement",
    "floor_routing_disagreement",
    "clipped_fraction",
)
MISMATCH_FIELDS = ("mean_abs_delta", "k3_kl", "direct_kl", "extreme_fraction", "chi_squared")


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over steps of each number (None where a scheme has none), and per layer."""
    summary: dict[str, Any] = {key: _mean([r[key] for r in reports]) for key in SUMMARY_FIELDS}
    summary["mismatch"] = {
        key: _mean([r["mismatch"][key] for r in reports]) for key in MISMATCH_FIELDS
    }
    summary["floor_mismatch"] = {
        key: _mean([r["floor_mismatch"][key] for r in reports]) for key in MISMATCH_FIELDS
    }
    for key in ("routing_per_layer", "counterfactual_per_layer"):
        layers = reports[0][key]
        summary[key] = (
            None
            if layers is None
            else {layer: _mean([r[key][layer] for r in reports]) for layer in layers}
        )
    return summary


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


@contextmanager
def _deterministic() -> Iterator[None]:
    """Same seed, same numbers: on CPU the backward of advanced indexing (index_put_
    with accumulate) sums in thread order unless deterministic algorithms are on."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
