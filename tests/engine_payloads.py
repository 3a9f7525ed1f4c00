"""Payloads built exactly as vLLM and SGLang emit them, for the engine decoder tests."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from routereplay import MoELayout

# DeepSeek-style dense prefix: layers 0 and 1 are dense, 2..5 route, 16 experts, top-4.
DENSE_PREFIX = MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1], num_experts=16, top_k=4)
# More experts than uint8 holds: vLLM switches to uint16.
MANY_EXPERTS = MoELayout.from_dense_pattern([0, 1, 1], num_experts=300, top_k=8)


def routed_ids(layout: MoELayout, rows: int, seed: int = 0) -> np.ndarray:
    """Distinct expert ids per row: `[rows, routed layers, top_k]` int64."""
    rng = np.random.default_rng(seed)
    scores = rng.random((rows, len(layout.moe_layers), layout.num_experts))
    return np.argsort(scores, axis=-1)[..., : layout.top_k]


def vllm_dtype(layout: MoELayout) -> np.dtype:
    return np.dtype(np.uint8 if layout.num_experts <= 256 else np.uint16)


def all_layers(layout: MoELayout, routed: np.ndarray, dtype: Any = None) -> np.ndarray:
    """What vLLM and SGLang return: `[rows, num_layers, top_k]`, dense layers all zeros."""
    full = np.zeros((routed.shape[0], layout.num_layers, layout.top_k), dtype=np.int64)
    full[:, list(layout.moe_layers)] = routed
    return full.astype(dtype or vllm_dtype(layout))


def expected_experts(layout: MoELayout, routed: np.ndarray, tokens: int, start: int) -> np.ndarray:
    """The trace a decoder must produce: routed rows at `start`, -1 everywhere else."""
    expected = np.full((tokens, len(layout.moe_layers), layout.top_k), -1, dtype=np.int64)
    expected[start : start + routed.shape[0]] = routed
    return expected


def npy_base64(rows: np.ndarray) -> str:
    """The OpenAI server's encoding: base64 of the `.npy` bytes (dtype in the header)."""
    buffer = io.BytesIO()
    np.save(buffer, rows)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_choice(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    """One element of a vLLM chat completion's `choices`."""
    return {
        "index": 0,
        "message": {"role": "assistant", "content": "..."},
        "finish_reason": "stop",
        "routed_experts": npy_base64(rows),
        **extra,
    }


def sglang_meta_info(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    """SGLang's `meta_info`: base64 of flattened little-endian int32 ids."""
    flat = np.ascontiguousarray(rows, dtype="<i4").tobytes()
    return {
        "id": "req-0",
        "finish_reason": {"type": "stop"},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "routed_experts": base64.b64encode(flat).decode("ascii"),
        **extra,
    }
