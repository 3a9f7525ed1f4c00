"""Rollout side: one `Rollout` (token ids, prompt length, routes, log-probs, id) per
sampled sequence from what an engine returns.

`payload` holds the row contract every engine shares (one row per forwarded token, the
final sampled token has none) and multi-turn stitching; `vllm` and `sglang` each hold
their arrays (`arrays`) and where every endpoint puts them and the token ids
(`server`, vLLM's `offline`); `responses` reads saved lines for `routereplay import`.
`engines.hf`, an embedded transformers engine, is imported on its own.
"""

from routereplay.engines import sglang, vllm
from routereplay.engines.payload import Conversation, LayerAxis, layer_axis, trace_from_rows

__all__ = ["Conversation", "LayerAxis", "layer_axis", "sglang", "trace_from_rows", "vllm"]
