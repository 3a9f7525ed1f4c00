"""The demo's result as a plain-text table and as a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LEGEND = """\
routing         (token, routed layer) rows where the trainer's experts differ from the
                engine's (sets; prompt and completion rows, final tokens excluded)
counterfactual  R3: replayed rows where the trainer's own router would have picked
                other experts (controller.totals(): disagreed / replayed)
stale           R2, R3: the same in the update passes, after the first optimizer step
mean|d|, k3 KL  d = logp_trainer - logp_rollout over completion tokens;
                k3 = mean(exp(d) - 1 - d); F(2): share of tokens with exp(d) outside [1/2, 2]
clipped         completion tokens whose importance ratio PPO clips in the first mini-batch
floor           two fp32 trainer passes (whole batch vs per-group micro-batches): k3 KL
                and routing between them, the trainer's own noise"""


def render_table(result: dict[str, Any]) -> str:
    """A summary of `run_demo`'s result: per scheme, means over steps."""
    settings = result["settings"]
    config = settings["model_config"]
    grpo = settings["grpo"]
    header = (
        f"routereplay demo: DeepSeek-V3-style MoE, {config['num_hidden_layers']} layers "
        f"(routed {settings['moe_layers']}), {settings['num_experts']} experts, "
        f"top-{settings['top_k']}, groups {config['n_group']}/{config['topk_group']}; "
        f"engine {settings['engine_dtype']}, trainer {settings['trainer_dtype']}\n"
        f"{settings['steps']} GRPO steps x {grpo['prompts_per_step'] * grpo['group_size']} "
        f"sequences ({grpo['prompts_per_step']} prompts x {grpo['group_size']}), "
        f"seed {settings['seed']}; means over steps"
    )
    pipeline = settings.get("pipeline")
    if pipeline is not None:
        vpp = f" x VPP={pipeline['vp_size']}" if pipeline["vp_size"] > 1 else ""
        header += (
            f"\ntrainer: megatron-core GPTModel, PP={pipeline['pp_size']}{vpp} over "
            f"{pipeline['pp_size']} gloo processes, {pipeline['recompute']} recompute; "
            "engine: a bf16 copy, routes in vLLM's wire format"
        )
    columns = (
        "mode",
        "reward",
        "routing",
        "counterfactual",
        "stale",
        "mean|d|",
        "k3 KL",
        "F(2)",
        "clipped",
        "floor k3",
        "floor routing",
    )
    rows = [columns]
    for scheme, run in result["modes"].items():
        s = run["summary"]
        rows.append(
            (
                scheme,
                _number(s["reward"], "{:.3f}"),
                _percent(s["routing_disagreement"]),
                _percent(s["counterfactual_disagreement"]),
                _percent(s["update_counterfactual_disagreement"]),
                _number(s["mismatch"]["mean_abs_delta"], "{:.2e}"),
                _number(s["mismatch"]["k3_kl"], "{:.2e}"),
                _percent(s["mismatch"]["extreme_fraction"], "{:.3f}%"),
                _percent(s["clipped_fraction"], "{:.3f}%"),
                _number(s["floor_mismatch"]["k3_kl"], "{:.1e}"),
                _percent(s["floor_routing_disagreement"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [header, ""]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = kl_ratios(result)
    if ratios:
        lines += ["", "k3 KL none / " + ", none / ".join(f"{m}: {r}" for m, r in ratios.items())]
    verl = render_verl_mapping(result)
    if verl:
        lines += ["", verl]
    lines += ["", LEGEND, f"\n{result['seconds']:.0f} s in all"]
    return "\n".join(lines)


def render_verl_mapping(result: dict[str, Any]) -> str:
    """What verl's pre-fix mapping (see `verl_mapping`) did with R3's routes, next to
    routereplay's on the same data; "" when the run has no such audit."""
    r3 = result["modes"].get("R3", {}).get("summary", {})
    verl = r3.get("verl_mapping")
    if verl is None:
        return ""
    moe_layers = result["settings"]["moe_layers"]
    misplaced, unplaced = verl["misplaced_layers"], verl["unplaced_layers"]
    columns = ("mapping", "misplaced routers", "routing", "k3 KL")
    rows = [
        columns,
        (
            "verl (i + offset)",
            f"{len(misplaced)}/{len(moe_layers)} ({100 * verl['misplaced_share']:.0f}%)",
            _percent(verl["routing_disagreement"]),
            _number(verl["k3_kl"], "{:.2e}"),
        ),
        (
            "routereplay",
            f"0/{len(moe_layers)} (0%)",
            _percent(r3["routing_disagreement"]),
            _number(r3["mismatch"]["k3_kl"], "{:.2e}"),
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "The same R3 routes mapped to the routers as verl did before the fix (slot i + "
        "offset, the offset counting dense layers), in the log-prob pass:"
    ]
    for index, row in enumerate(rows):
        cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells]))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    slots = ", ".join(
        f"{layer}<-{'none' if slot is None else moe_layers[slot]}"
        for layer, slot in verl["slots"].items()
        if int(layer) in misplaced
    )
    lines.append(
        f"verl's routers got the routes of (layer<-layer): {slots}; "
        f"{len(unplaced)} router{'s' if len(unplaced) != 1 else ''} got none and routed "
        "natively."
    )
    return "\n".join(lines)


def kl_ratios(result: dict[str, Any]) -> dict[str, str]:
    """Mean k3 KL of "none" over that of each replay scheme, as text ("12.3x")."""
    schemes = result["modes"]
    if "none" not in schemes:
        return {}
    baseline = schemes["none"]["summary"]["mismatch"]["k3_kl"]
    ratios = {}
    for scheme in schemes:
        if scheme == "none":
            continue
        k3 = schemes[scheme]["summary"]["mismatch"]["k3_kl"]
        ratios[scheme] = f"{baseline / k3:.1f}x" if k3 else "inf"
    return ratios


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: (a) routing disagreement per routed layer and scheme, (b) k3 KL per
    step and scheme. Needs matplotlib (`pip install routereplay[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot() needs matplotlib: pip install 'routereplay[plot]'.") from error

    schemes = result["modes"]
    layers = [str(layer) for layer in result["settings"]["moe_layers"]]
    figure, (by_layer, by_step) = plt.subplots(1, 2, figsize=(11, 4.2))

    series = []  # (label, percent per layer, hatched)
    for scheme, run in schemes.items():
        summary = run["summary"]
        series.append((f"{scheme}: engine vs trainer", summary["routing_per_layer"], False))
        if summary["counterfactual_per_layer"] is not None:
            label = f"{scheme}: counterfactual (trainer's own router)"
            series.append((label, summary["counterfactual_per_layer"], True))
    width = 0.8 / len(series)
    for index, (label, per_layer, hatched) in enumerate(series):
        offsets = [i + (index - (len(series) - 1) / 2) * width for i in range(len(layers))]
        values = [100 * (per_layer[layer] or 0.0) for layer in layers]
        bars = by_layer.bar(
            offsets, values, width, label=label, fill=not hatched, hatch="//" if hatched else None
        )
        by_layer.bar_label(bars, fmt="%.2f", fontsize=7)
    by_layer.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    by_layer.set_ylabel("rows with another expert set (%)")
    by_layer.set_title("(a) routing disagreement per routed layer")
    by_layer.legend(fontsize=8)

    for scheme, run in schemes.items():
        steps = [r["step"] for r in run["steps"]]
        by_step.plot(
            steps, [r["mismatch"]["k3_kl"] for r in run["steps"]], marker=".", label=scheme
        )
    by_step.set_yscale("log")
    by_step.set_xlabel("GRPO step")
    by_step.set_ylabel("k3 KL, trainer vs rollout log-probs")
    by_step.set_title("(b) training-inference mismatch")
    by_step.legend(fontsize=8)

    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def _percent(value: float | None, form: str = "{:.2f}%") -> str:
    return "-" if value is None else form.format(100 * value)
