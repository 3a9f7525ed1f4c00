"""Router replay inside TRL's GRPOTrainer: the step time of R2 and R3 against "off".

A random Qwen3-MoE causal LM built from a config (no downloads, float32), trained by
TRL's real GRPOTrainer on CPU, sampling with the model itself (`use_vllm=False`), with
`num_iterations=2` and `steps_per_generation=2` (so TRL runs its old-log-prob pass in
every mode) and gradient checkpointing on, TRL's default. Side by side in one run:
  off   routereplay's GRPOTrainer with router_replay="off": TRL exactly as it is
  R2    recorded in the old-log-prob pass, replayed in every loss forward and backward
  R3    recorded while model.generate() samples, replayed in the old-log-prob pass and
        every loss forward and backward
Each case trains `--steps` optimizer steps from the same weights, prompts and seeds;
its time per step is the whole of `trainer.train()` (sampling, rewards, log-prob
passes, loss, backward, optimizer) divided by the steps. Rounds are interleaved, the
case order rotating every round, so that machine noise hits every case alike; the
ratios are of the medians over rounds, and `paired` the median of each round's ratio.
Both clocks are reported: the process's CPU time (one thread by default) is the work
done and barely moves when other jobs share the cores; wall time on a shared machine
swings several-fold from round to round, far more than the overhead measured.

    python benchmarks/bench_trl.py [--layers 4] [--experts 16] [--top-k 4]
        [--hidden 128] [--completion 32] [--steps 8] [--rounds 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from typing import Any

import torch
from tiny_moe import random_qwen3_moe

CASES = ("off", "R2", "R3")
VOCAB = 512


def build_model(args: argparse.Namespace) -> Any:
    model = random_qwen3_moe(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        heads=max(1, args.hidden // 32),
        vocab=VOCAB,
        positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    # A few stop tokens: completions of several lengths, so padding on both sides.
    model.generation_config.eos_token_id = [2, 3, 4, 5]
    model.generation_config.pad_token_id = 0
    return model.train()


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def train_seconds(args: argparse.Namespace, mode: str, output_dir: str) -> tuple[float, float]:
    """Wall and CPU seconds per optimizer step of `trainer.train()` in `mode`
    (construction untimed)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from routereplay.integrations.trl import GRPOTrainer

    prompts = [
        " ".join(f"t{10 + (13 * i + 7 * j) % (VOCAB - 10)}" for j in range(4 + i % 12))
        for i in range(64)
    ]
    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        num_generations=4,
        max_completion_length=args.completion,
        num_iterations=2,
        steps_per_generation=2,
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=args.steps,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=build_model(args),
        reward_funcs=lambda completions, **_: [float(len(c.split())) for c in completions],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=build_tokenizer(),
        router_replay=mode,
    )
    trainer.remove_callback(PrinterCallback)  # the logs would fill the report
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return (
        (time.perf_counter() - wall) / args.steps,
        (time.process_time() - cpu) / args.steps,
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description="R2 / R3 step time inside TRL's GRPOTrainer.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    parser.add_argument("--completion", type=int, default=32, help="max_completion_length")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: steadier when shared)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # transformers' deprecation notes, once per trainer
    logging.getLogger("transformers").setLevel(logging.ERROR)

    seconds: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in CASES}
    with tempfile.TemporaryDirectory() as output_dir:
        train_seconds(args, "off", output_dir)  # warm-up: kernels, imports, allocator
        for round_ in range(args.rounds):
            order = CASES[round_ % len(CASES) :] + CASES[: round_ % len(CASES)]
            for case in order:
                wall, cpu = train_seconds(args, case, output_dir)
                seconds[case]["wall"].append(wall)
                seconds[case]["cpu"].append(cpu)
    result: dict[str, Any] = {"setup": vars(args), "cases": {}}
    for case in CASES:
        row: dict[str, Any] = {}
        for clock in ("cpu", "wall"):
            ours, off = seconds[case][clock], seconds["off"][clock]
            row[clock] = {
                "rounds": ours,
                "seconds_per_step": median(ours),
                "ratio_to_off": median(ours) / median(off),
                "paired_ratio": median([s / o for s, o in zip(ours, off, strict=True)]),
            }
        result["cases"][case] = row
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"GRPOTrainer step, {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
        f"{args.batch} sequences x up to {args.completion} new tokens, {args.rounds} rounds"
    )
    print(f"{'case':6} {'cpu s':>7} {'vs off':>7} {'paired':>7} {'wall s':>7} {'vs off':>7}")
    for case, row in result["cases"].items():
        cpu, wall = row["cpu"], row["wall"]
        print(
            f"{case:6} {cpu['seconds_per_step']:7.3f} {cpu['ratio_to_off']:6.3f}x "
            f"{cpu['paired_ratio']:6.3f}x {wall['seconds_per_step']:7.3f} "
            f"{wall['ratio_to_off']:6.3f}x"
        )


if __name__ == "__main__":
    main()
