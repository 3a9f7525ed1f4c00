"""GRPO with router replay in TRL: the TRL script you have, with one import and one
option changed (`router_replay="off" | "R2" | "R3"`).

    # A tiny random MoE on CPU, sampling with the model itself (no download, ~10 s):
    python examples/trl_grpo_router_replay.py --router-replay R3

    # R3 through TRL's vLLM server mode (a GPU: TRL syncs weights over NCCL), with
    # vllm serve MODEL --enable-return-routed-experts --weight-transfer-config \
    #     '{"backend": "nccl"}' --logprobs-mode processed_logprobs   (VLLM_SERVER_DEV_MODE=1)
    python examples/trl_grpo_router_replay.py --model MODEL --router-replay R3 \
        --vllm-server http://127.0.0.1:8000

The routing metrics land in TRL's logs: router_replay/loss/disagreement (rows the live
router would route elsewhere), router_replay/old_logps/disagreement (R3: the rollout
engine's routing against the trainer's), and the replayed and native row counts.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig

from routereplay.integrations.trl import GRPOTrainer  # was: from trl import GRPOTrainer


def reward_length(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(completion.split())) for completion in completions]


def tiny_moe() -> tuple[Any, Any]:
    """A random Qwen3-MoE and a word-level tokenizer, built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [2, 3, 4]  # stop early now and then
    return model, tokenizer


def main(argv: list[str] | None = None) -> GRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router-replay", choices=("off", "R2", "R3"), default="R3")
    parser.add_argument("--model", default=None, help="a model name or directory (default: tiny)")
    parser.add_argument("--vllm-server", default=None, help="a vLLM server URL: TRL's server mode")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", default="grpo-router-replay")
    args = parser.parse_args(argv)

    if args.model is None:
        model, tokenizer = tiny_moe()
    else:
        from transformers import AutoTokenizer

        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    prompts = [
        " ".join(f"t{5 + (7 * i + 3 * j) % 120}" for j in range(2 + i % 6)) for i in range(32)
    ]
    vllm = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": args.vllm_server}
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        num_iterations=2,
        steps_per_generation=2,
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        **(vllm if args.vllm_server else {}),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_length,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        router_replay=args.router_replay,  # the one new option
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
