"""`routereplay serve MODEL_DIR`: a stand-in `vllm serve --enable-return-routed-experts`
on CPU, for developing R3 pipelines (TRL's vLLM server mode, a home-grown loop)
without a GPU. See `routereplay.engines.serving`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routereplay.cli.common import EXIT_OK, bad_input

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    command = commands.add_parser(
        "serve",
        help="serve a transformers MoE model like vLLM's /v1/completions, routes and all",
        description=(
            "Sample from a transformers MoE model (a directory with config.json, and its "
            "weights and tokenizer when present) with routereplay's recording engine, and "
            "answer POST /v1/completions in vLLM 0.32's wire format: per-choice "
            "prompt_token_ids, token_ids and routed_experts (base64 .npy, every decoder "
            "layer). Point TRL's vLLM server mode, or any client of vLLM's routes, at it "
            "to develop R3 without a GPU. It is no inference server: one request at a time, "
            "no streaming, no top-k/min-p/penalties (asking for them is a 400)."
        ),
    )
    command.add_argument("model", type=Path, help="a directory with the model's config.json")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on")
    command.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    command.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="the engine's dtype (bf16, like a real engine next to an fp32 trainer)",
    )
    command.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: dir name)"
    )
    command.add_argument("--seed", type=int, default=0, help="random weights (no weights file)")
    command.add_argument("--json", action="store_true", help="print the address as JSON")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from routereplay.engines.hf import RecordingEngine
    from routereplay.engines.serving import CompletionsServer

    if not (args.model / "config.json").is_file():
        return bad_input("serve", f"{args.model} has no config.json: give a model directory.")
    model, weights = _model(args.model, args.seed)
    engine = RecordingEngine(model, dtype=getattr(torch, args.dtype))
    name = args.served_model_name or args.model.name
    server = CompletionsServer(
        engine, model_name=name, tokenizer=_tokenizer(args.model), host=args.host, port=args.port
    )
    where = {"url": server.url, "model": name, "weights": weights}
    if args.json:
        print(json.dumps(where), flush=True)
    else:
        print(f"serving {name} ({weights} weights) at {server.url}, Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return EXIT_OK


def _model(directory: Path, seed: int) -> tuple[Any, str]:
    import torch
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    if any(directory.glob("*.safetensors")):
        return auto.from_pretrained(directory, dtype=torch.float32).eval(), "saved"
    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(directory)
    return auto.from_config(config, dtype=torch.float32).eval(), "random"


def _tokenizer(directory: Path) -> Any:
    if not (directory / "tokenizer.json").is_file():
        return None  # token-id prompts only
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
