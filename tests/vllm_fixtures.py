"""The real vLLM 0.32.0 payloads in tests/data/vllm-0.32.0, and what they say, read
here without routereplay: the raw arrays, prompts and log-probs each choice carries."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from routereplay import MoELayout

FIXTURES = Path(__file__).parent / "data" / "vllm-0.32.0"
MODELS = ("qwen3moe_mid_dense", "dsv3_300e")


@cache
def config(model: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "models" / model / "config.json").read_text())


def layout(model: str) -> MoELayout:
    return MoELayout.from_hf_config(config(model))


def server_path(model: str) -> Path:
    return FIXTURES / f"server_{model}.jsonl"


@cache
def server_lines(model: str) -> tuple[dict[str, Any], ...]:
    """Every saved line: `{"case", "endpoint", "request", "response"}`."""
    return tuple(json.loads(line) for line in server_path(model).read_text().splitlines())


def server_case_ids() -> list[tuple[str, int]]:
    return [(m, i) for m in MODELS for i in range(len(server_lines(m)))]


@cache
def offline_samples(model: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads((FIXTURES / f"offline_{model}.json").read_text())["samples"])


def npy(payload: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(payload)), allow_pickle=False)


@dataclass(frozen=True)
class Choice:
    """One choice as the payload holds it: the ids and the raw routed-experts array
    `[rows, num_hidden_layers, top_k]`, and vLLM's sampled-token log-probs if asked."""

    prompt: list[int]
    completion: list[int]
    routed_experts: np.ndarray
    prompt_start: int
    logprobs: list[float] | None


def choices(line: dict[str, Any]) -> list[Choice]:
    """The choices of one saved line, read straight from the JSON."""
    request, response = line["request"], line["response"]
    if isinstance(response, list):  # a stream: gather the chunks per choice
        chunks = [json.loads(x[len("data: ") :]) for x in response if x != "data: [DONE]"]
        final = next(c for c in chunks if c["choices"][0]["finish_reason"] is not None)
        body = {
            **final,
            "choices": [
                {
                    **final["choices"][0],
                    "token_ids": [t for c in chunks for t in c["choices"][0]["token_ids"]],
                }
            ],
        }
    else:
        body = response
    start = request.get("routed_experts_prompt_start", 0)
    out = []
    for choice in body["choices"]:
        prompt = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
        prompt = prompt or request["token_ids"]
        logprobs = choice.get("logprobs")
        if logprobs is None:
            values = None
        elif "token_logprobs" in logprobs:
            values = logprobs["token_logprobs"]
        else:
            values = [entry["logprob"] for entry in logprobs["content"]]
        out.append(
            Choice(prompt, choice["token_ids"], npy(choice["routed_experts"]), start, values)
        )
    return out


def request_outputs(model: str) -> list[SimpleNamespace]:
    """The offline samples as vLLM's `RequestOutput` objects look (duck-typed)."""
    return [
        SimpleNamespace(
            request_id=str(index),
            prompt_token_ids=sample["prompt_token_ids"],
            outputs=[
                SimpleNamespace(
                    index=0,
                    token_ids=sample["token_ids"],
                    routed_experts=npy(sample["routed_experts"]),
                    logprobs=[
                        {token: SimpleNamespace(logprob=value, rank=1)}
                        for token, value in zip(
                            sample["token_ids"], sample["logprobs"], strict=True
                        )
                    ],
                    finish_reason="length",
                )
            ],
        )
        for index, sample in enumerate(offline_samples(model))
    ]
