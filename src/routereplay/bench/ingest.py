"""From engine payloads to one trainer rank's replay targets: the ingestion path of a step.

Workload (Qwen3-30B-A3B shape): ~1M tokens in 1,000 sequences of 256..1792 tokens, 48
routed layers, top-8 of 128 experts. Each sequence arrives as vLLM's server sends it:
a choice whose `routed_experts` is base64 of a uint8 `.npy` `[tokens - 1, 48, 8]` (the
final sampled token has no row). The destination is one rank of a CP=2 (zigzag) x PP=4
job with 16 token-balanced micro-batches: micro-batch -> the routes of its CP rank 0
tokens over pipeline stage 0's 12 layers, `[tokens, 12, 8]` int8. Side by side in one
run, same payloads, results asserted equal, every path with the same base64 decoder
(pybase64 where routereplay[fast] is installed, else the standard library's;
`stdlib_base64=True` compares with the latter):

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
    file write      every trace into a new trace file (TraceWriter, compact and packed;
                    durable, and with durable=False: no fsync before the rename)
    file read       every trace back (TraceFile.trace, checksums verified; the file
                    just written, so from the page cache)
    rank's ranges   the rank's share read straight from the file (ThdPlan.rank_routes
                    of a TraceFile): only its CP chunks' blocks, over its stage's layers
Peak memory is the largest resident-set growth of a case over its inputs, sampled in a
forked child process per case (the parent's own allocations do not count).

ns per id counts the batch's routed ids (tokens x 48 x 8). Ratios are what to read.
`routereplay bench ingest` and benchmarks/bench_ingest.py run this: `ingestion` returns
the report (JSON data), `render` the table.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import multiprocessing as mp
import resource
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
from routereplay.engines import trace_from_rows, vllm
from routereplay.engines.base64_field import decoder_name, first_decoder, standard_library_only
from routereplay.engines.vllm.arrays import decode_npy
from routereplay.store import Encoding, TraceFile, TraceWriter

ROUNDS = 3
CP, PP, MICRO_BATCHES, RANK = 2, 4, 16, 0  # the rank measured: cp rank 0, pp rank 0


class PathsDisagree(AssertionError):
    """A path's share of the routes differs from the floor's: that path is wrong, and its
    times mean nothing."""


class Workload:
    """The payloads of one step and the rank they are ingested for."""

    def __init__(self, sequences: int, shortest: int, longest: int, seed: int = 0) -> None:
        if sequences < MICRO_BATCHES:
            raise ValueError(
                f"{sequences} sequences cannot fill the workload's {MICRO_BATCHES} "
                f"micro-batches; ask for at least {MICRO_BATCHES}."
            )
        if shortest < 2:
            raise ValueError(
                f"a sequence of {shortest} token(s) has no routes (the final sampled token "
                "has no row); the shortest must be at least 2 tokens."
            )
        if longest < shortest:
            raise ValueError(
                f"the longest sequence ({longest} tokens) would be shorter than the "
                f"shortest ({shortest}); ask for a longest of at least {shortest}."
            )
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
        """The THD plan of the step: packing, micro-batches and CP=2 zigzag pieces."""
        return plan_thd(
            torch.from_numpy(self.lengths), self.groups, multiple=self.multiple, cp_size=CP
        )

    def completion_len(self, index: int) -> int:
        """Sampled tokens of sequence `index`."""
        return int(self.lengths[index] - self.prompt_lens[index])


# -- the three paths ------------------------------------------------------------------


def b64decode(text: str) -> bytes | bytearray:
    """The decoder every path uses: the one `decode_base64` tries first."""
    return first_decoder()(text)


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
            # Chunk 0 (tokens 0 .. chunk - 1), then chunk 2cp-1 (the tail): its rows
            # that exist, then -1 for the final token and the padding. A short
            # sequence's tail can be all padding.
            buffer[at : at + chunk] = rows[:chunk, first:last]
            tail = (2 * CP - 1) * chunk  # the tail's first token
            head, end = at + chunk, at + 2 * chunk
            real = max(0, rows.shape[0] - tail)
            buffer[head : head + real] = rows[tail:, first:last]
            buffer[head + real : end] = -1
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
    """routereplay's path: a validated trace per payload, then the rank's share of them."""
    return rank_share(work, decoded_traces(work))


def decoded(work: Workload) -> list[np.ndarray[Any, Any]]:
    """Stage 1 of ours: each payload's uint8 rows `[tokens - 1, 48, 8]` (decode_npy)."""
    return [decode_npy(p["routed_experts"], "routed_experts", "bench") for p in work.payloads]


def validated(work: Workload, arrays: list[np.ndarray[Any, Any]]) -> list[RoutingTrace]:
    """Stage 2 of ours: each array of rows as a validated `RoutingTrace [tokens, 48, 8]`."""
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
    """Stages 1 and 2 of ours in one call per payload, as a trainer makes them."""
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
    """Stage 3 of ours: micro-batch -> the rank's ids `[tokens, 12, 8]`, as numpy."""
    routes = work.plan().rank_routes(traces, cp_rank=RANK, layers=work.stage_layers)
    return {micro_batch: trace.experts.numpy() for micro_batch, trace in routes.items()}


def file_share(work: Workload, path: Path) -> dict[int, np.ndarray[Any, Any]]:
    """This rank's share read straight from a trace file: only its token ranges."""
    with TraceFile(path) as file:
        routes = work.plan().rank_routes(file, cp_rank=RANK, layers=work.stage_layers)
    return {micro_batch: trace.experts.numpy() for micro_batch, trace in routes.items()}


def device_share(work: Workload, traces: list[RoutingTrace]) -> dict[int, torch.Tensor]:
    """Stage 3 of ours from traces on a device: the ids stay where the traces are."""
    routes = work.plan().rank_routes(traces, cp_rank=RANK, layers=work.stage_layers)
    return {micro_batch: trace.experts for micro_batch, trace in routes.items()}


def synchronized(device: torch.device, body: Callable[[], object]) -> object:
    """`body()`, returned once the device has finished the work it queued."""
    result = body()
    torch.cuda.synchronize(device)
    return result


def write_file(
    layout: MoELayout,
    traces: list[RoutingTrace],
    path: Path,
    encoding: Encoding,
    durable: bool = True,
) -> None:
    """Every trace into a trace file at `path`."""
    with TraceWriter(path, layout, source="vllm", encoding=encoding, durable=durable) as writer:
        for trace in traces:
            writer.append(trace)


def read_file(path: Path) -> list[RoutingTrace]:
    """Every trace of the file at `path`, checksums verified."""
    with TraceFile(path) as file:
        return [file.trace(i) for i in range(len(file))]


def npy_view(raw: bytes | bytearray) -> np.ndarray[Any, Any]:
    """The uint8 `[rows, 48, 8]` ids of `.npy` bytes (version 1 header), not copied."""
    header = 10 + int.from_bytes(raw[8:10], "little")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(-1, 48, 8)


def _padded(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def check_equal(got: dict[int, np.ndarray[Any, Any]], want: dict[int, Any], name: str) -> None:
    """Raise `PathsDisagree` unless path `name`'s share is the floor's, micro-batch by
    micro-batch."""
    if got.keys() != want.keys():
        raise PathsDisagree(f"{name}: micro-batches {sorted(got)} differ from {sorted(want)}")
    for key, experts in want.items():
        if not np.array_equal(got[key], experts):
            raise PathsDisagree(f"{name}: micro-batch {key} differs from the floor's")


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
    process.join()  # one small int in the queue: the child's exit does not wait on us
    if process.exitcode != 0:
        raise RuntimeError(f"the child measuring peak memory exited with {process.exitcode}")
    return int(queue.get())


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def ingestion(
    sequences: int = 1000,
    min_len: int = 256,
    max_len: int = 1792,
    rounds: int = ROUNDS,
    device: str = "cpu",
    stdlib_base64: bool = False,
) -> dict[str, Any]:
    """Median seconds per case, ns per id, MB/s, the three paths' peak memory growth and
    the ratios (JSON data), once every path has given the floor's share of the routes.

    `sequences` of `min_len .. max_len` tokens; `rounds` interleaved rounds, the median
    kept. A `device` other than "cpu" adds the share built there from traces already on
    it. `stdlib_base64` decodes with Python's base64 even where pybase64 is installed.
    Raises ValueError for a workload that cannot be built, and `PathsDisagree` when a
    path's share differs from the floor's (`equal_to_floor` lists those that matched).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    with (
        standard_library_only() if stdlib_base64 else contextlib.nullcontext(),
        tempfile.TemporaryDirectory(prefix="bench_ingest_") as folder,
    ):
        return _measured(Workload(sequences, min_len, max_len), rounds, device, Path(folder))


def _measured(work: Workload, rounds: int, device_name: str, folder: Path) -> dict[str, Any]:
    arrays = decoded(work)
    traces = validated(work, arrays)
    files: dict[Encoding, Path] = {e: folder / f"{e}.rrt" for e in ("compact", "packed")}
    for encoding, path in files.items():
        write_file(work.layout, traces, path, encoding)

    reference = floor(work)
    checked = {
        "verl-style": verl_style(work),
        "ours": ours(work),
        "ours, via a file": rank_share(work, read_file(files["packed"])),
        "ours, a rank's ranges of a file": file_share(work, files["compact"]),
    }
    for name, result in checked.items():
        check_equal(result, reference, name)
    equal_to_floor = list(checked)

    cases: dict[str, Callable[[], object]] = {
        "floor": lambda: floor(work),
        "verl-style": lambda: verl_style(work),
        "ours": lambda: ours(work),
        "ours: decode": lambda: decoded(work),
        "ours: validate": lambda: validated(work, arrays),
        "ours: align": lambda: rank_share(work, traces),
        **{
            f"ours: file write, {encoding}{'' if durable else ', no fsync'}": functools.partial(
                write_file, work.layout, traces, folder / "written.rrt", encoding, durable
            )
            for encoding in ("compact", "packed")
            for durable in (True, False)
        },
        "ours: file read, compact": lambda: read_file(files["compact"]),
        "ours: rank's ranges of file, compact": lambda: file_share(work, files["compact"]),
        "ours: rank's ranges of file, packed": lambda: file_share(work, files["packed"]),
        "ours: file read, packed": lambda: read_file(files["packed"]),
    }
    if device_name != "cpu":
        # The rank's share built on the device from traces already there: the plan's
        # runs come from host lengths, so no device-to-host copy is waited for.
        device = torch.device(device_name)
        on_device = [t.derive(t.experts.to(device), t.layers, t.tokens) for t in traces]
        check_equal(
            {k: v.cpu().numpy() for k, v in device_share(work, on_device).items()},
            reference,
            f"ours, on {device}",
        )
        equal_to_floor.append(f"ours, on {device}")
        cases[f"ours: align on {device}"] = lambda: synchronized(
            device, lambda: device_share(work, on_device)
        )
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):  # interleaved, so noise hits every case alike
        for case, body in cases.items():
            # A fresh file each write: replacing one costs its deletion (0.3 s for 400
            # MB), which is not the writer's.
            (folder / "written.rrt").unlink(missing_ok=True)
            start = time.perf_counter()
            body()
            samples[case].append(time.perf_counter() - start)
    seconds = {case: sorted(v)[len(v) // 2] for case, v in samples.items()}
    peaks = {case: peak_growth(cases[case]) for case in ("floor", "verl-style", "ours")}
    id_bytes = work.ids  # one byte per id in memory, as traces keep them
    return {
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
        "equal_to_floor": equal_to_floor,
        "seconds": seconds,
        "ns_per_id": {case: s / work.ids * 1e9 for case, s in seconds.items()},
        "mb_per_s": {case: id_bytes / s / 1e6 for case, s in seconds.items()},
        "peak_mb": {case: peak / 1e6 for case, peak in peaks.items()},
        "ratios": {
            "ours / floor": seconds["ours"] / seconds["floor"],
            "verl-style / ours": seconds["verl-style"] / seconds["ours"],
            "ours peak / verl-style peak": peaks["ours"] / max(peaks["verl-style"], 1),
            **{
                f"file write{fsync} / read, {encoding}": seconds[
                    f"ours: file write, {encoding}{fsync}"
                ]
                / seconds[f"ours: file read, {encoding}"]
                for encoding in ("compact", "packed")
                for fsync in ("", ", no fsync")
            },
        },
    }


def render(report: dict[str, Any]) -> str:
    """`ingestion`'s report for people: the workload, then per case its median ms, ns per
    id and MB/s, the three paths' peak memory growth, and the ratios."""
    shape = report["shape"]
    ids = shape["tokens"] * shape["layers"] * shape["top_k"]
    lines = [
        f"{shape['tokens']:,} tokens in {shape['sequences']} sequences, {shape['layers']} "
        f"layers, top-{shape['top_k']} of {shape['experts']} ({ids / 1e6:.0f}M ids) -> cp "
        f"rank 0 of CP={shape['cp']} zigzag, pp rank 0 of PP={shape['pp']}, "
        f"{shape['micro_batches']} micro-batches; base64 by {shape['base64']}",
        f"  {'case':<36} {'median ms':>10} {'ns/id':>7} {'MB/s':>8}",
    ]
    for case, s in report["seconds"].items():
        ns, mbs = report["ns_per_id"][case], report["mb_per_s"][case]
        lines.append(f"  {case:<36} {s * 1e3:10.1f} {ns:7.2f} {mbs:8.0f}")
    for case, mb in report["peak_mb"].items():
        lines.append(f"  peak growth, {case:<23} {mb:8.0f} MB")
    for name, ratio in report["ratios"].items():
        lines.append(f"  {name:<40} {ratio:6.2f}x")
    return "\n".join(lines)
