"""`routereplay demo`: the problem router replay solves, and the fix, in numbers.

A tiny DeepSeek-V3-style MoE (dense first layer, sigmoid routing with expert bias and
group-limited top-k) is warmed up on a small task with a verifiable reward (sort a
few digits), then trained by a minimal GRPO loop three ways from the same weights,
prompts and seeds: the rollout engine samples in bf16 and records its routes, the
trainer learns in fp32, and its routers run

    none   natively: a few percent of (token, layer) pairs pick other experts than the
           engine did, and the log-probs the importance ratio compares drift apart;
    R2     recording in the log-prob pass and replaying in the update passes;
    R3     replaying the engine's routes in every pass: the trainer runs the experts
           the engine ran, and the mismatch that is left is numeric only.

    result = run_demo()            # under a minute on 2 CPU cores
    print(render_table(result))
    plot(result, "demo.png")       # needs matplotlib

Needs transformers (`pip install routereplay[hf]`).

`run_megatron_demo()` runs the same experiment with megatron-core as the trainer (the
seed's scenario: a dense prefix, PP=2 x VPP=2 over 2 gloo processes, full recompute,
routes in vLLM's wire format) and measures verl's pre-fix route mapping next to
routereplay's; needs `routereplay[megatron]` (see `megatron_run`).
"""

from routereplay.demo.grpo import SCHEMES, GRPOSettings, Scheme
from routereplay.demo.megatron_run import run_megatron_demo
from routereplay.demo.model import DEFAULT_MODEL_CONFIG, WarmUp
from routereplay.demo.report import kl_ratios, plot, render_table
from routereplay.demo.run import DEFAULT_STEPS, Progress, run_demo
from routereplay.demo.task import SortDigits

__all__ = [
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_STEPS",
    "SCHEMES",
    "GRPOSettings",
    "Progress",
    "Scheme",
    "SortDigits",
    "WarmUp",
    "kl_ratios",
    "plot",
    "render_table",
    "run_demo",
    "run_megatron_demo",
]
