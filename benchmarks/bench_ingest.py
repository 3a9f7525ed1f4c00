"""From engine payloads to one trainer rank's replay targets: the ingestion path of a step.

Workload (Qwen3-30B-A3B shape): ~1M tokens in 1,000 sequences of 256..1792 tokens, 48
routed layers, top-8 of 128 experts. Each sequence arrives as vLLM's server sends it:
a choice whose `routed_experts` is base64 of a uint8 `.npy` `[tokens - 1, 48, 8]` (the
final sampled token has no row). The destination is one rank of a CP=2 (zigzag) x PP=4
job with 16 token-balanced micro-batches: micro-batch -> the routes of its CP rank 0
tokens over pipeline stage 0's 12 layers, `[tokens, 12, 8]` int8. Side by side in one
run, same payloads, results asserted equal, every path with the same base64 decoder
(pybase64 where routereplay[fast] is installed, else the standard library's; pass
--stdlib-base64 to compare with the latter):

  floor           base64-decode each payload, view it with np.frombuffer, copy this
                  rank's share of it once into its micro-batch's buffer
  verl-style      decode each payload, place it into one zero-filled int16
                  `[sequences, max_len, layers, top_k]` batch, then slice each micro-batch,
                  CP piece and stage from it
  ours            vllm.from_openai_choice (decode + validate) per payload, then
                  ThdPlan.rank_routes from the per-sequence traces; and by stage:
    decode          vllm.decode_npy: base64 -> the array
    validate        the array -> a validated RoutingTrace (trace_from_rows)
    align           one rank's share from the per-sequence traces
    file write      every trace into a trace file (TraceWriter, compact and packed)
    file read       every trace back (TraceFile.trace, checksums verified)
Peak memory is the largest resident-set growth of a case over its inputs, sampled in a
forked child process per case (the parent's own allocations do not count).

ns per id counts the batch's routed ids (tokens x 48 x 8). Ratios are what to read.

    python benchmarks/bench_ingest.py [--sequences 1000] [--rounds 3] [--device cuda]
        [--stdlib-base64] [--json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routereplay import MoELayout, PipelineSplit, RoutingTrace
from routereplay.align import ThdPlan, balanced_micro_batches, padded_lengths, plan_thd
from routereplay.engines import vllm
from routereplay.engines.base64_field import decoder_name, fast_decoder
from routereplay.engines.payload import trace_from_rows
from routereplay.engines.vllm.arrays import decode_npy
from routereplay.store import TraceFile, TraceWriter

ROUNDS = 3
CP, PP, MICRO_BATCHES, RANK = 2, 4, 16, 0  # the rank measured: cp rank 0, pp rank 0


class Workload:
    """The payloads of one step and the rank they are ingested for."""

    def __init__(self, sequences: int, shortest: int, longest: int, seed: int = 0) -> None:
        self.layout = MoELayout.from_dense_pattern([1] * 48, num_experts=128, top_k=8)
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(shortest, longest + 1, sequences)
        self.prompt_lens = np.maximum(1, self.lengths // 4)
        self.payloads = [self._payload(int(n), rng) for n in self.lengths]
        self.multiple = 2 * CP
        padded = padded_lengths(torch.from_numpy(self.lengths), self.multiple)
        budget = -(-int(padded.sum()) // MICRO_BATCHES) + int(padded.max())
        self.groups = balanced_micro_batches(padded, budget, min_micro_batches=MICRO_BATCHES)
        self.stage_layers = self.layout.stage_moe_layers(PipelineSplit(pp_size=PP), RANK)
        self.ids = int(self.lengths.sum()) * 48 * 8

    def _payload(self, tokens: int, rng: np.random.Generator) -> dict[str, Any]:
        """A vLLM choice: distinct random ids per row (random first id, fixed stride)."""
        first = rng.integers(0, 128, (tokens - 1, 48, 1), dtype=np.uint8)
        rows = (first + np.arange(8, dtype=np.uint8) * 16) % 128
        buffer = io.BytesIO()
        np.save(buffer, rows.astype(np.uint8))
        return {"routed_experts": base64.b64encode(buffer.getvalue()).decode("ascii")}

    def plan(self) -> ThdPlan:
        return plan_thd(
            torch.from_numpy(self.lengths), self.groups, multiple=self.multiple, cp_size=CP
        )

    def completion_len(self, index: int) -> int:
        return int(self.lengths[index] - self.prompt_lens[index])


# -- the three paths ------------------------------------------------------------------


def b64decode(text: str) -> bytes:
    """The decoder every path uses: the one `decode_base64` tries first."""
    fast = fast_decoder()
    return fast(text) if fast is not None else base64.b64decode(text, validate=True)


def floor(work: Workload) -> dict[int, np.ndarray[Any, Any]]:
    """Decode, view, and copy this rank's share once: its two zigzag chunks of each
    sequence, over stage 0's layers, straight into the micro-batch's buffer."""
    first, last = work.stage_layers[0], work.stage_layers[-1] + 1
    out = {}
    for micro_batch, group in enumerate(work.groups.groups):
        sizes = [_padded(int(work.lengths[i]), work.multiple) // (2 * CP) for i in group]
        buffer = np.empty((2 * sum(sizes), last - first, 8), dtype=np.int8)
        at = 0
        for index, chunk in zip(group.tolist(), sizes, strict=True):
            rows = npy_view(b64decode(work.payloads[index]["routed_experts"]))
            tokens = rows.shape[0] + 1
            # Chunk 0 (tokens 0 .. chunk - 1) and chunk 2cp-1 (the tail, padding after
            # the final token's -1 row).
            buffer[at : at + chunk] = rows[:chunk, first:last]
            tail = tokens - (2 * CP - 1) * chunk  # real tokens in the last chunk
            end = at + 2 * chunk
            head = at + chunk
            buffer[head : head + tail - 1] = rows[(2 * CP - 1) * chunk :, first:last]
            buffer[head + tail - 1 : end] = -1
            at = end
        out[micro_batch] = buffer
    return out


def verl_style(work: Workload) -> dict[int, np.ndarray[Any, Any]]:
    """One zero-filled int16 batch `[sequences, max_len, layers, top_k]`, then slices."""
    max_len = int(work.lengths.max())
    batch = np.zeros((len(work.payloads), max_len, 48, 8), dtype=np.int16)
    for index, payload in enumerate(work.payloads):
        rows = npy_view(b64decode(payload["routed_experts"]))
        batch[index, : rows.shape[0]] = rows
        batch[index, rows.shape[0] : work.lengths[index]] = -1  # the final token
    first, last = work.stage_layers[0], work.stage_layers[-1] + 1
    out = {}
    for micro_batch, group in enumerate(work.groups.groups):
        pieces = []
        for index in group.tolist():
            tokens = int(work.lengths[index])
            padded = _padded(tokens, work.multiple)
            sequence = np.full((padded, last - first, 8), -1, dtype=np.int16)
            sequence[:tokens] = batch[index, :tokens, first:last]
            chunks = np.split(sequence, 2 * CP)
            pieces += [chunks[0], chunks[2 * CP - 1]]
        out[micro_batch] = np.concatenate(pieces)
    return out


def ours(work: Workload) -> dict[int, np.ndarray[Any, Any]]:
    return rank_share(work, decoded_traces(work))


def decoded(work: Workload) -> list[np.ndarray[Any, Any]]:
    return [decode_npy(p["routed_experts"], "routed_experts", "bench") for p in work.payloads]


def validated(work: Workload, arrays: list[np.ndarray[Any, Any]]) -> list[RoutingTrace]:
    return [
        trace_from_rows(
            rows,
            work.layout,
            prompt_len=int(work.prompt_lens[i]),
            completion_len=work.completion_len(i),
            source="vllm",
        )
        for i, rows in enumerate(arrays)
    ]


def decoded_traces(work: Workload) -> list[RoutingTrace]:
    return [
        vllm.from_openai_choice(
            payload,
            work.layout,
            prompt_len=int(work.prompt_lens[i]),
            completion_len=work.completion_len(i),
            sequence=i,
        )
        for i, payload in enumerate(work.payloads)
    ]


def rank_share(work: Workload, traces: list[RoutingTrace]) -> dict[int, np.ndarray[Any, Any]]:
    routes = work.plan().rank_routes(traces, cp_rank=RANK, layers=work.stage_layers)
    return {micro_batch: trace.experts.numpy() for micro_batch, trace in routes.items()}


def device_share(work: Workload, traces: list[RoutingTrace]) -> dict[int, torch.Tensor]:
    routes = work.plan().rank_routes(traces, cp_rank=RANK, layers=work.stage_layers)
    return {micro_batch: trace.experts for micro_batch, trace in routes.items()}


def synchronized(device: torch.device, body: Callable[[], object]) -> object:
    result = body()
    torch.cuda.synchronize(device)
    return result


def write_file(layout: MoELayout, traces: list[RoutingTrace], path: Path, encoding: Any) -> None:
    with TraceWriter(path, layout, source="vllm", encoding=encoding) as writer:
        for trace in traces:
            writer.append(trace)


def read_file(path: Path) -> list[RoutingTrace]:
    with TraceFile(path) as file:
        return [file.trace(i) for i in range(len(file))]


def npy_view(raw: bytes) -> np.ndarray[Any, Any]:
    """The uint8 `[rows, 48, 8]` ids of `.npy` bytes (version 1 header), not copied."""
    header = 10 + int.from_bytes(raw[8:10], "little")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(-1, 48, 8)


def _padded(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


# -- measuring ------------------------------------------------------------------------


def peak_growth(body: Callable[[], object]) -> int:
    """Bytes of resident-set growth while `body` runs, in a forked child: the child's
    resident set is sampled every millisecond from /proc (its inherited pages count
    from the start, so only what `body` allocates shows as growth)."""
    context = mp.get_context("fork")
    queue: Any = context.Queue()

    def child() -> None:
        start = _resident()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _resident())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        body()
        done.set()
        sampler.join()
        queue.put(max(peak[0], _resident()) - start)

    process = context.Process(target=child)
    process.start()
    growth = int(queue.get())
    process.join()
    return growth


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description="Engine payloads to one rank's replay targets.")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1792)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--device", default="cpu", help="also align on this device (cuda)")
    parser.add_argument(
        "--stdlib-base64", action="store_true", help="decode with base64, not pybase64"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.stdlib_base64:
        sys.modules["pybase64"] = None  # type: ignore[assignment]  # its import now fails
    torch.set_num_threads(1)  # steadier on a shared machine; every case alike
    work = Workload(args.sequences, args.min_len, args.max_len)
    arrays = decoded(work)
    traces = validated(work, arrays)
    folder = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    files = {encoding: folder / f"{encoding}.rrt" for encoding in ("compact", "packed")}
    for encoding, path in files.items():
        write_file(work.layout, traces, path, encoding)

    reference = floor(work)
    for name, result in (("verl-style", verl_style(work)), ("ours", ours(work))):
        check_equal(result, reference, name)
    check_equal(rank_share(work, read_file(files["packed"])), reference, "ours, via a file")

    cases: dict[str, Callable[[], object]] = {
        "floor": lambda: floor(work),
        "verl-style": lambda: verl_style(work),
        "ours": lambda: ours(work),
        "ours: decode": lambda: decoded(work),
        "ours: validate": lambda: validated(work, arrays),
        "ours: align": lambda: rank_share(work, traces),
        "ours: file write, compact": lambda: write_file(
            work.layout, traces, files["compact"], "compact"
        ),
        "ours: file write, packed": lambda: write_file(
            work.layout, traces, files["packed"], "packed"
        ),
        "ours: file read, compact": lambda: read_file(files["compact"]),
        "ours: file read, packed": lambda: read_file(files["packed"]),
    }
    if args.device != "cpu":
        # The rank's share built on the device from traces already there: the plan's
        # runs come from host lengths, so no device-to-host copy is waited for.
        device = torch.device(args.device)
        on_device = [t.derive(t.experts.to(device), t.layers, t.tokens) for t in traces]
        check_equal(
            {k: v.cpu().numpy() for k, v in device_share(work, on_device).items()},
            reference,
            f"ours, on {device}",
        )
        cases[f"ours: align on {device}"] = lambda: synchronized(
            device, lambda: device_share(work, on_device)
        )
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):  # interleaved, so noise hits every case alike
        for case, body in cases.items():
            start = time.perf_counter()
            body()
            samples[case].append(time.perf_counter() - start)
    seconds = {case: sorted(v)[len(v) // 2] for case, v in samples.items()}
    peaks = {case: peak_growth(cases[case]) for case in ("floor", "verl-style", "ours")}
    id_bytes = work.ids  # one byte per id in memory, as traces keep them
    report = {
        "shape": {
            "sequences": len(work.payloads),
            "tokens": int(work.lengths.sum()),
            "layers": 48,
            "top_k": 8,
            "experts": 128,
            "cp": CP,
            "pp": PP,
            "micro_batches": len(work.groups),
            "base64": decoder_name(),
        },
        "seconds": seconds,
        "ns_per_id": {case: s / work.ids * 1e9 for case, s in seconds.items()},
        "mb_per_s": {case: id_bytes / s / 1e6 for case, s in seconds.items()},
        "peak_mb": {case: peak / 1e6 for case, peak in peaks.items()},
        "ratios": {
            "ours / floor": seconds["ours"] / seconds["floor"],
            "verl-style / ours": seconds["verl-style"] / seconds["ours"],
            "ours peak / verl-style peak": peaks["ours"] / max(peaks["verl-style"], 1),
            "file write / read, compact": seconds["ours: file write, compact"]
            / seconds["ours: file read, compact"],
            "file write / read, packed": seconds["ours: file write, packed"]
            / seconds["ours: file read, packed"],
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    shape = report["shape"]
    print(
        f"{shape['tokens']:,} tokens in {shape['sequences']} sequences, 48 layers, top-8 of 128 "
        f"({work.ids / 1e6:.0f}M ids) -> cp rank 0 of CP={CP} zigzag, pp rank 0 of PP={PP}, "
        f"{shape['micro_batches']} micro-batches; base64 by {shape['base64']}"
    )
    print(f"  {'case':<28} {'median ms':>10} {'ns/id':>7} {'MB/s':>8}")
    for case, s in seconds.items():
        ns, mbs = report["ns_per_id"][case], report["mb_per_s"][case]
        print(f"  {case:<28} {s * 1e3:10.1f} {ns:7.2f} {mbs:8.0f}")
    for case, mb in report["peak_mb"].items():
        print(f"  peak growth, {case:<15} {mb:8.0f} MB")
    for name, ratio in report["ratios"].items():
        print(f"  {name:<32} {ratio:6.2f}x")


def check_equal(got: dict[int, np.ndarray[Any, Any]], want: dict[int, Any], name: str) -> None:
    if got.keys() != want.keys():
        raise SystemExit(f"{name}: micro-batches {sorted(got)} differ from {sorted(want)}")
    for key, experts in want.items():
        if not np.array_equal(got[key], experts):
            raise SystemExit(f"{name}: micro-batch {key} differs from the floor's")


if __name__ == "__main__":
    main()
