"""Trace file size and speed, next to what the rollout engines put on the wire.

For four real model shapes, the same random routes (distinct ids per row) as:
  sglang int32   SGLang's payload: int32 ids for every decoder layer, dense ones
                 included (4 * num_layers * top_k bytes per token, before base64)
  vllm uint8/16  vLLM's array: uint8 ids (uint16 above 256 experts), every layer
  compact        a trace file, 1/2/4 bytes per routed id + a 1-bit no-route mask
  packed         a trace file, ceil(log2(experts)) bits per routed id + the mask
bytes/token is the whole file (header, index, checksums) over the tokens for the
trace files, the payload size for the engines.

encode: RoutingTrace -> bytes (engines: to_all_layers + the engine dtype; files:
        TraceWriter append + close, through the spill file, to disk)
decode: bytes -> validated RoutingTrace (engines: RoutingTrace.from_all_layers;
        files: TraceFile.trace(i), checksum verified)
MB/s counts the routed ids at their in-memory size (trace.experts.nbytes), so every
format is measured on the same work; all run side by side, interleaved, medians kept.

    python benchmarks/bench_store.py [--tokens 20000] [--seq-len 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routereplay import MoELayout, RoutingTrace
from routereplay.store import Encoding, TraceFile, TraceWriter

ROUNDS = 3


@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    dense_prefix: int
    num_experts: int
    top_k: int

    @property
    def layout(self) -> MoELayout:
        pattern = [0] * self.dense_prefix + [1] * (self.num_layers - self.dense_prefix)
        return MoELayout.from_dense_pattern(pattern, self.num_experts, self.top_k)

    def __str__(self) -> str:
        routed = self.num_layers - self.dense_prefix
        return (
            f"{self.name} ({self.num_layers} layers, {routed} routed, "
            f"{self.num_experts} experts, top-{self.top_k})"
        )


SHAPES = (
    Shape("DeepSeek-V3", 61, 3, 256, 8),
    Shape("Qwen3-30B-A3B", 48, 0, 128, 8),
    Shape("Qwen3-235B-A22B", 94, 0, 128, 8),
    Shape("Mixtral-8x7B", 32, 0, 8, 2),
)
FORMATS = ("sglang int32", "vllm uint8/16", "compact", "packed")


def random_sequences(layout: MoELayout, tokens: int, seq_len: int) -> list[RoutingTrace]:
    """`tokens` tokens of random routes (distinct ids per row), `seq_len` per sequence."""
    generator = torch.Generator().manual_seed(0)
    traces = []
    for start in range(0, tokens, seq_len):
        rows = min(seq_len, tokens - start)
        scores = torch.rand(rows, len(layout.moe_layers), layout.num_experts, generator=generator)
        experts = scores.topk(layout.top_k, dim=-1).indices
        traces.append(RoutingTrace(experts, layout.moe_layers, layout.num_experts, "bench"))
    return traces


Codec = tuple[Callable[[], int], Callable[[], list[RoutingTrace]]]


def engine_codec(
    layout: MoELayout, traces: list[RoutingTrace], dtype: np.dtype[np.integer[Any]]
) -> Codec:
    """(encode, decode) through an engine's all-layer array of `dtype`."""
    payloads: list[bytes] = []

    def encode() -> int:
        payloads.clear()
        for trace in traces:
            payloads.append(trace.to_all_layers(layout).numpy().astype(dtype).tobytes())
        return sum(map(len, payloads))

    def decode() -> list[RoutingTrace]:
        shape = (-1, layout.num_layers, layout.top_k)
        return [
            RoutingTrace.from_all_layers(np.frombuffer(p, dtype).reshape(shape), layout, "engine")
            for p in payloads
        ]

    return encode, decode


def file_codec(
    layout: MoELayout, traces: list[RoutingTrace], path: Path, encoding: Encoding
) -> Codec:
    """(encode, decode) through a trace file on disk."""

    def encode() -> int:
        with TraceWriter(path, layout, source="bench", encoding=encoding) as writer:
            for trace in traces:
                writer.append(trace)
        return path.stat().st_size

    def decode() -> list[RoutingTrace]:
        with TraceFile(path) as read:
            return [read.trace(i) for i in range(len(read))]

    return encode, decode


def timed(body: Callable[[], object]) -> float:
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


def measure(
    shape: Shape, tokens: int, seq_len: int, directory: Path
) -> dict[str, dict[str, float]]:
    layout = shape.layout
    traces = random_sequences(layout, tokens, seq_len)
    megabytes = sum(t.experts.nbytes for t in traces) / 1e6
    vllm_dtype = np.dtype(np.uint8) if shape.num_experts <= 256 else np.dtype(np.uint16)
    codecs = {
        "sglang int32": engine_codec(layout, traces, np.dtype(np.int32)),
        "vllm uint8/16": engine_codec(layout, traces, vllm_dtype),
        "compact": file_codec(layout, traces, directory / "compact.rr", "compact"),
        "packed": file_codec(layout, traces, directory / "packed.rr", "packed"),
    }
    sizes = {name: encode() for name, (encode, _) in codecs.items()}
    for name, (_, decode) in codecs.items():  # every format reads back what it wrote
        assert all(a.equal(b) for a, b in zip(decode(), traces, strict=True)), name
    # Interleave rounds so that machine noise hits every format alike; keep the medians.
    seconds: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in codecs}
    for _ in range(ROUNDS):
        for name, (encode, decode) in codecs.items():
            seconds[name]["encode"].append(timed(encode))
            seconds[name]["decode"].append(timed(decode))
    return {
        name: {
            "bytes_per_token": sizes[name] / tokens,
            "encode_mb_s": megabytes / sorted(seconds[name]["encode"])[ROUNDS // 2],
            "decode_mb_s": megabytes / sorted(seconds[name]["decode"])[ROUNDS // 2],
        }
        for name in codecs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Trace file size and speed vs engine payloads.")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per model shape")
    parser.add_argument("--seq-len", type=int, default=1000, help="tokens per sequence")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine

    results = []
    with tempfile.TemporaryDirectory() as directory:
        for shape in SHAPES:
            formats = measure(shape, args.tokens, args.seq_len, Path(directory))
            results.append({"shape": str(shape), **vars(shape), "formats": formats})
    if args.json:
        print(json.dumps({"tokens": args.tokens, "seq_len": args.seq_len, "shapes": results}))
        return
    print(
        f"{args.tokens} tokens of random routes per shape, {args.seq_len} per sequence; "
        "MB/s of routed ids at their in-memory size"
    )
    print(
        f"  {'format':<14} {'bytes/token':>11} {'vs sglang':>9} "
        f"{'encode MB/s':>11} {'decode MB/s':>11}"
    )
    for result in results:
        print(result["shape"])
        formats = result["formats"]
        sglang = formats["sglang int32"]["bytes_per_token"]
        for name in FORMATS:
            row = formats[name]
            print(
                f"  {name:<14} {row['bytes_per_token']:>11.1f} "
                f"{sglang / row['bytes_per_token']:>8.1f}x "
                f"{row['encode_mb_s']:>11.0f} {row['decode_mb_s']:>11.0f}"
            )


if __name__ == "__main__":
    main()
