"""Rollout side: one `RoutingTrace` per sequence from what an engine returns.

`payload` holds the row contract every engine shares (one row per forwarded token, the
final sampled token has none) and multi-turn stitching; `vllm` and `sglang` only
decode their wire formats into rows. `engines.hf`, an embedded transformers engine,
is imported on its own.
"""

from routereplay.engines import sglang, vllm
from routereplay.engines.payload import Conversation, LayerAxis, layer_axis, trace_from_rows

__all__ = ["Conversation", "LayerAxis", "layer_axis", "sglang", "trace_from_rows", "vllm"]
