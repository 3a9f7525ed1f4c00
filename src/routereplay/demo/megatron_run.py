"""`run_megatron_demo`: the seed's scenario end to end, on two CPU processes.

A DeepSeek-V3-style megatron-core `GPTModel` (dense prefix, then sigmoid-scored MoE
layers with expert bias and group-limited top-k) is trained by the demo's GRPO loop
split over 2 pipeline ranks (and, by default, 2 virtual stages each) through
megatron's interleaved schedule with full activation recompute. Its rollout engine is
a bf16 single-process copy of the same model that hands routes over in vLLM's wire
format (`megatron_engine`). Schemes none / R2 / R3 as in the transformers demo; under
R3 each step also replays the same routes as verl mapped them before the fix
(`verl_mapping`), to measure what that mapping did.

megatron-core 0.16.1 needs a few CUDA calls patched to run on CPU: the patches live in
`megatron_cpu` and are applied only inside the demo's worker processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from routereplay.demo.grpo import SCHEMES, GRPORun, GRPOSettings, Scheme, train
from routereplay.demo.megatron_model import (
    MegatronModel,
    WeightScales,
    build_chunks,
    init_weights,
    named_weights,
    pipeline_split,
    transformer_config,
)
from routereplay.demo.megatron_ranks import Progress, run_on_ranks
from routereplay.demo.model import WarmUp
from routereplay.demo.run import check_request, demo_result, summarise
from routereplay.demo.task import SortDigits
from routereplay.demo.trainer import TrainerBatch
from routereplay.pipeline_split import PipelineSplit
from routereplay.trace import NO_ROUTE, RoutingTrace

# Sized to finish in under 4 minutes on 2 CPU cores: a pipelined step costs several
# times a single-process one (schedule, p2p, recompute, every chunk's micro-batches).
DEFAULT_MEGATRON_STEPS = 10
DEFAULT_MEGATRON_GRPO = GRPOSettings(prompts_per_step=8, group_size=8)
DEFAULT_MEGATRON_WARM_UP = WarmUp(steps=80)


def run_megatron_demo(
    steps: int = DEFAULT_MEGATRON_STEPS,
    seed: int = 0,
    *,
    pp: int = 2,
    vp: int | None = 2,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    model: MegatronModel | None = None,
    grpo: GRPOSettings | None = None,
    warm_up: WarmUp | None = None,
    task: SortDigits | None = None,
    schemes: Sequence[Scheme] = SCHEMES,
    progress: Progress | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Warm the model up, then `steps` GRPO steps per scheme, on `pp` gloo processes.

    `vp` virtual stages per rank (None or 1: no VPP); `first/last_stage_layers`: an
    uneven split. An impossible split raises `LayoutError` before any process starts.
    Returns the transformers demo's result shape (`run.run_demo`), plus per R3 step
    `audits.verl_mapping` and `summary.verl_mapping`.
    """
    check_request(steps, schemes)
    model = model or MegatronModel()
    split = pipeline_split(model, pp, vp, first_stage_layers, last_stage_layers)
    body = partial(
        _rank_main,
        steps=steps,
        seed=seed,
        model=model,
        grpo=grpo or DEFAULT_MEGATRON_GRPO,
        warm_up=warm_up or DEFAULT_MEGATRON_WARM_UP,
        task=task or SortDigits(),
        schemes=tuple(schemes),
    )
    result: dict[str, Any] = run_on_ranks(body, split, progress=progress, timeout_s=timeout_s)
    return result


def _rank_main(
    rank: int,
    split: PipelineSplit,
    progress: Progress,
    *,
    steps: int,
    seed: int,
    model: MegatronModel,
    grpo: GRPOSettings,
    warm_up: WarmUp,
    task: SortDigits,
    schemes: tuple[Scheme, ...],
) -> dict[str, Any]:
    """One rank's whole demo; every rank returns the same numbers."""
    from routereplay.demo.megatron_engine import MegatronEngine
    from routereplay.demo.megatron_trainer import MegatronTrainer
    from routereplay.demo.verl_mapping import VerlMappingAudit

    # Same seed, same numbers: index_put_ with accumulate sums in thread order otherwise.
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    layout = model.layout
    config = transformer_config(model, split, recompute=True)
    chunks = build_chunks(model, config, rank)
    scales = WeightScales(
        router_std=warm_up.router_init_std, expert_bias_std=warm_up.expert_bias_std
    )
    init_weights(chunks, seed, scales)
    trainer = MegatronTrainer(chunks, layout, split, rank, warm_up.learning_rate)
    progress("warm-up", 0, warm_up.steps)
    warm_up_summary = warm_up_model(trainer, task, warm_up, seed, progress)
    warmed = {name: t.detach().clone() for name, t in named_weights(chunks).items()}
    engine = MegatronEngine(model)
    audit = VerlMappingAudit(layout, split)
    results: dict[str, Any] = {}
    for scheme in schemes:
        progress(scheme, 0, steps)
        scheme_start = time.perf_counter()
        trainer.restore(warmed, grpo.learning_rate)
        run = GRPORun(scheme, trainer, engine, task=task, settings=grpo, seed=seed, audits=(audit,))
        reports = train(run, steps, partial(_step_done, progress, scheme, steps))
        summary = summarise(reports)
        audits = [r["audits"]["verl_mapping"] for r in reports if "audits" in r]
        if audits:
            summary["verl_mapping"] = _mean_audit(audits)
        results[scheme] = {
            "steps": reports,
            "summary": summary,
            "seconds": time.perf_counter() - scheme_start,
        }
    run_settings = {
        "trainer": "megatron",
        "steps": steps,
        "seed": seed,
        "modes": list(schemes),
        "model_config": {
            **dataclasses.asdict(model),
            # The names the transformers demo's table header reads.
            "num_hidden_layers": model.num_layers,
            "n_group": model.num_groups,
            "topk_group": model.group_top_k,
        },
        "pipeline": {
            "pp_size": split.pp_size,
            "vp_size": split.vp_size,
            "first_stage_layers": split.first_stage_layers,
            "last_stage_layers": split.last_stage_layers,
            "chunk_layers": {
                f"pp_rank {r}, vp_stage {v}": list(layout.stage_layers(split, r, v))
                for v in range(split.vp_size)
                for r in range(split.pp_size)
            },
            "recompute": "full",
        },
        "engine": "megatron-core GPTModel, bf16, one process; vLLM 0.32 wire format",
    }
    return demo_result(run_settings, layout, grpo, warm_up, task, warm_up_summary, results, start)


def warm_up_model(
    trainer: Any, task: SortDigits, warm_up: WarmUp, seed: int, progress: Progress
) -> dict[str, float | int]:
    """Cross-entropy on the task's answers through megatron's schedule, with the
    transformers demo's schedule (linear warm-up over 20 steps, linear decay)."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(warm_up.steps):
        input_ids, attention_mask, labels = task.supervised_batch(warm_up.batch_size, generator)
        batch = supervised_batch(input_ids, attention_mask, labels, trainer.layout)
        scale = min(1.0, (step + 1) / 20) * (1 - step / warm_up.steps)
        trainer.set_learning_rate(warm_up.learning_rate * scale)
        loss, _ = trainer.train_step(batch, 1.0, _cross_entropy)
        first = loss if step == 0 else first
        last = loss
        progress("warm-up", step + 1, warm_up.steps)
    return {
        "steps": warm_up.steps,
        "first_loss": first,
        "final_loss": last,
        "seconds": time.perf_counter() - start,
    }


def supervised_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, layout: Any
) -> TrainerBatch:
    """A `TrainerBatch` whose mask marks the answer tokens of `labels [count, seq]`
    (unshifted, -100 elsewhere); no routes (every row -1), no rollout."""
    count, seq = input_ids.shape
    routes = torch.full((count, seq, len(layout.moe_layers), layout.top_k), NO_ROUTE)
    return TrainerBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=labels[:, 1:] >= 0,
        rollout_logprobs=torch.zeros(count, seq - 1),
        routes=RoutingTrace(routes, layout.moe_layers, layout.num_experts, "none"),
        prompt_tokens=labels < 0,
        advantages=torch.zeros(count),
    )


def _cross_entropy(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm-up's objective: negative log-likelihood summed over answer tokens."""
    return -(logprobs * mask).sum(), torch.zeros(())


def _step_done(progress: Progress, scheme: str, steps: int, done: int) -> None:
    progress(scheme, done, steps)


def _mean_audit(audits: list[dict[str, Any]]) -> dict[str, Any]:
    first = audits[0]
    mean = {
        key: sum(a[key] for a in audits) / len(audits)
        for key in ("routing_disagreement", "k3_kl", "mean_abs_delta", "misplaced_share")
    }
    mean["routing_per_layer"] = {
        layer: sum(a["routing_per_layer"][layer] for a in audits) / len(audits)
        for layer in first["routing_per_layer"]
    }
    return {**first, **mean}
