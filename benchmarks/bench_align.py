"""Aligning a rollout batch's routes to a Megatron THD layout: plans vs a per-sequence loop.

Workload (Qwen3-30B-A3B shape): ~1M tokens, 48 routed layers, top-8 of 128 experts, int8
ids as RoutingTrace stores them. Each sequence is padded to a multiple of 2 * cp * tp,
sequences are grouped into token-balanced micro-batches, split over CP=2 ranks (zigzag)
and cut into the routed layers of PP=4 stages. Two batches by default: ~1000 sequences
of 256..1792 tokens (the target shape) and ~16000 of 16..112 (short sequences, where
per-sequence overhead rather than memory bandwidth sets the pace). Side by side in one
run, same inputs, outputs asserted equal:

  copy of the ids            batch.experts.clone(): the floor for anything that writes
                             the batch's ids once into fresh memory, as the "all ranks"
                             cases must; loop / copy bounds what any of them can gain
  copy, reused memory        the same copy into a buffer kept from round to round: the
                             floor when the memory is already mapped (no page faults),
                             which glibc gives pieces under 32 MB once it has freed some
  all ranks                  one process lays out every (micro-batch, cp rank, stage)
                             piece, as a single-controller driver would:
    plans, from traces       routereplay.align: concat the per-sequence traces, plan_thd,
                             one row gather per (micro-batch, cp rank), stages as views
    plans, from batch        the same when the batch's trace is already one tensor
                             (collated by the data loader, or read from a trace file)
    per-sequence loop        plain Python: for each micro-batch, pad each sequence with a
                             cat, chunk it, cat rank pieces, slice stages (written below)
  one rank                   what each trainer rank runs every step: its own pieces
                             (cp rank 0) over its own stage's layers (pp rank 0) only
    plans, from traces       ThdPlan.rank_routes(traces, ...): gathered straight from the
                             per-sequence traces into each piece, no join of the batch
    plans, from batch        ThdPlan.rank_routes(batch, cp_rank, layers=...)
    per-sequence loop        the loop above for one rank, taking the stage's layers
                             before it pads, so that it too copies only what it keeps
  plans, restore             the inverse (R2): every rank's routes back to the batch
  plan_thd alone             the index plans, included in every "plans" case above

The micro-batch grouping is computed once (balanced_micro_batches) and given to the
loops, so they are timed on data movement only. Throughput counts the batch's routed id
bytes (tokens x layers x top_k x 1 byte), whatever share a case writes. Ratios are what
to read; absolute numbers depend on the (shared) machine's memory bandwidth.
`--device cuda` runs every case on a GPU (plans are built on the CPU from the lengths,
as a trainer builds them, and their indices copied over).

    python benchmarks/bench_align.py [--sequences N --min-len A --max-len B] [--cp 2]
                                     [--tp 1] [--pp 4] [--threads 1] [--device cpu]
                                     [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from routereplay import MoELayout, PipelineSplit, RoutingTrace
from routereplay.align import (
    ThdPlan,
    balanced_micro_batches,
    concat_traces,
    padded_lengths,
    plan_thd,
    split_traces,
    stage_slice,
)

ROUNDS = 5
# (name, sequences, shortest, longest): each about 1M tokens.
BATCHES = [("long sequences", 1000, 256, 1792), ("short sequences", 16000, 16, 112)]
Key = tuple[int, int, int]  # (micro-batch, cp rank * tp + tp rank, pipeline stage)
# The ratios reported, as (name, slower case, faster case).
RATIOS = [
    ("all ranks: loop / plans, from traces", "all ranks: loop", "all ranks: plans, traces"),
    ("all ranks: loop / plans, from batch", "all ranks: loop", "all ranks: plans, batch"),
    ("all ranks: loop / copy of the ids", "all ranks: loop", "copy of the ids"),
    ("all ranks: loop / copy, reused memory", "all ranks: loop", "copy, reused memory"),
    ("one rank: loop / plans, from traces", "one rank: loop", "one rank: plans, traces"),
    ("one rank: loop / plans, from batch", "one rank: loop", "one rank: plans, batch"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description="Route alignment throughput.")
    parser.add_argument("--sequences", type=int, help="one custom batch instead of the two")
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1792)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="sequence-parallel size")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=65536, help="micro-batch budget")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, all cases")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to run on a GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # 1: steadier on a shared 2-core machine
    batches = BATCHES
    if args.sequences is not None:
        batches = [("custom", args.sequences, args.min_len, args.max_len)]
    reports = [run(args, *batch) for batch in batches]
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    for report in reports:
        shape = report["shape"]
        print(
            f"{report['name']}: {shape['tokens']:,} tokens in {shape['sequences']} sequences, "
            f"{shape['layers']} layers, top-{shape['top_k']} int8 ({shape['id_bytes'] / 1e6:.0f} "
            f"MB of ids) -> {shape['micro_batches']} micro-batches x CP={shape['cp']} zigzag x "
            f"SP={shape['tp']} x PP={shape['pp']}, each sequence padded to a multiple of "
            f"{shape['pad_multiple']}; {shape['device']}, {shape['threads']} thread(s)"
        )
        print(f"  {'case':<28} {'median ms':>10} {'GB/s':>7}")
        for name, seconds in report["seconds"].items():
            print(f"  {name:<28} {seconds * 1e3:10.1f} {report['gb_per_s'][name]:7.2f}")
        for name, ratio in report["ratios"].items():
            print(f"  {name:<38} {ratio:5.2f}x")
        print()


def run(args: argparse.Namespace, name: str, sequences: int, shortest: int, longest: int) -> Any:
    device = torch.device(args.device)
    layout = MoELayout.from_dense_pattern([1] * args.layers, args.experts, args.top_k)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (sequences,), generator=generator)
    batch = on_device(random_trace(int(lengths.sum()), layout, generator), device)
    # One trace per rollout sequence, each in its own memory as engines decode them
    # (select_layers copies, without re-validating what was validated above).
    traces = [trace.select_layers(trace.layers) for trace in split_traces(batch, lengths)]
    multiple = 2 * args.cp * args.tp
    groups = balanced_micro_batches(padded_lengths(lengths, multiple), args.max_tokens)
    split = PipelineSplit(pp_size=args.pp)
    stages = [layout.stage_moe_layers(split, rank) for rank in range(args.pp)]
    slots = [(layers[0], layers[-1] + 1) for layers in stages]
    group_lists = [group.tolist() for group in groups.groups]

    def plan() -> ThdPlan:
        return plan_thd(lengths, groups, multiple=multiple, cp_size=args.cp, sp_size=args.tp)

    def all_ranks(flat: RoutingTrace) -> dict[Key, torch.Tensor]:
        out = {}
        for piece, on_rank in plan().apply_trace(flat).items():
            rank = piece.cp_rank * args.tp + piece.tp_rank
            for stage in range(args.pp):
                out[piece.micro_batch, rank, stage] = stage_slice(
                    on_rank, layout, split, stage
                ).experts
        return out

    def one_rank(flat: RoutingTrace | list[RoutingTrace]) -> dict[int, torch.Tensor]:
        routes = plan().rank_routes(flat, cp_rank=0, tp_rank=0, layers=stages[0])
        return {micro_batch: trace.experts for micro_batch, trace in routes.items()}

    def all_loop() -> dict[Key, torch.Tensor]:
        return per_sequence(traces, group_lists, multiple, args.cp, args.tp, slots)

    def rank_loop() -> dict[int, torch.Tensor]:
        return per_sequence_one_rank(traces, group_lists, multiple, args.cp, slots[0])

    thd = plan()
    on_ranks = thd.apply_trace(batch)
    reused = torch.empty_like(batch.experts)
    cases: dict[str, Callable[[], object]] = {
        "copy of the ids": batch.experts.clone,
        "copy, reused memory": lambda: reused.copy_(batch.experts),
        "all ranks: plans, traces": lambda: all_ranks(concat_traces(traces)[0]),
        "all ranks: plans, batch": lambda: all_ranks(batch),
        "all ranks: loop": all_loop,
        "one rank: plans, traces": lambda: one_rank(traces),
        "one rank: plans, batch": lambda: one_rank(batch),
        "one rank: loop": rank_loop,
        "plans, restore": lambda: thd.restore_trace(on_ranks),
        "plan_thd alone": plan,
    }
    reference = all_loop()
    check_equal(all_ranks(concat_traces(traces)[0]), reference, "all ranks, from traces")
    check_equal(all_ranks(batch), reference, "all ranks, from batch")
    rank_reference = {key[0]: v for key, v in reference.items() if key[1:] == (0, 0)}
    check_equal(rank_loop(), rank_reference, "one rank, loop")
    check_equal(one_rank(traces), rank_reference, "one rank, from traces")
    check_equal(one_rank(batch), rank_reference, "one rank, from batch")
    if not thd.restore_trace(on_ranks).equal(batch):
        raise SystemExit("plans, restore: the batch's trace did not come back")
    del reference, rank_reference

    # Interleave rounds so that machine noise hits every case alike; keep the medians.
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, body in cases.items():
            synchronize(device)
            start = time.perf_counter()
            body()
            synchronize(device)
            samples[case].append(time.perf_counter() - start)
    median = {case: sorted(v)[len(v) // 2] for case, v in samples.items()}
    id_bytes = batch.experts.numel() * batch.experts.element_size()
    return {
        "name": name,
        "shape": {
            "sequences": sequences,
            "tokens": int(lengths.sum()),
            "layers": args.layers,
            "top_k": args.top_k,
            "experts": args.experts,
            "cp": args.cp,
            "tp": args.tp,
            "pp": args.pp,
            "micro_batches": len(groups),
            "pad_multiple": multiple,
            "id_bytes": id_bytes,
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "seconds": median,
        "gb_per_s": {case: id_bytes / seconds / 1e9 for case, seconds in median.items()},
        "ratios": {ratio: median[slow] / median[fast] for ratio, slow, fast in RATIOS},
    }


def random_trace(tokens: int, layout: MoELayout, generator: torch.Generator) -> RoutingTrace:
    """Valid routes `[tokens, layers, top_k]`: a random first id, then a fixed stride."""
    shape = (tokens, len(layout.moe_layers), 1)
    first = torch.randint(0, layout.num_experts, shape, generator=generator, dtype=torch.int16)
    stride = layout.num_experts // layout.top_k
    experts = (first + torch.arange(layout.top_k, dtype=torch.int16) * stride) % layout.num_experts
    return RoutingTrace(experts, layout.moe_layers, layout.num_experts, source="bench")


def on_device(trace: RoutingTrace, device: torch.device) -> RoutingTrace:
    if device.type == "cpu":
        return trace
    return RoutingTrace(trace.experts.to(device), trace.layers, trace.num_experts, trace.source)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_sequence(
    traces: Sequence[RoutingTrace],
    groups: list[list[int]],
    multiple: int,
    cp: int,
    tp: int,
    stage_slots: list[tuple[int, int]],
) -> dict[Key, torch.Tensor]:
    """The plain version: loop over sequences, slice and concatenate."""
    out = {}
    for micro_batch, group in enumerate(groups):
        padded = []
        for index in group:
            experts = traces[index].experts
            pad = -experts.shape[0] % multiple
            filler = experts.new_full((pad, *experts.shape[1:]), -1)
            padded.append(torch.cat([experts, filler]))
        for cp_rank in range(cp):
            pieces = []
            for experts in padded:
                chunks = experts.chunk(2 * cp)
                pieces += [chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]]
            rank = torch.cat(pieces)
            for tp_rank, part in enumerate(rank.chunk(tp)):
                for stage, (first, end) in enumerate(stage_slots):
                    out[micro_batch, cp_rank * tp + tp_rank, stage] = part[:, first:end]
    return out


def per_sequence_one_rank(
    traces: Sequence[RoutingTrace],
    groups: list[list[int]],
    multiple: int,
    cp: int,
    stage_slot: tuple[int, int],
) -> dict[int, torch.Tensor]:
    """The plain version for cp rank 0 (tp rank 0) and one stage: take the stage's layers,
    pad, keep the rank's two chunks."""
    first, end = stage_slot
    out = {}
    for micro_batch, group in enumerate(groups):
        pieces = []
        for index in group:
            experts = traces[index].experts[:, first:end]
            pad = -experts.shape[0] % multiple
            filler = experts.new_full((pad, *experts.shape[1:]), -1)
            chunks = torch.cat([experts, filler]).chunk(2 * cp)
            pieces += [chunks[0], chunks[2 * cp - 1]]
        out[micro_batch] = torch.cat(pieces)
    return out


def check_equal(got: dict[Any, torch.Tensor], want: dict[Any, torch.Tensor], name: str) -> None:
    if got.keys() != want.keys():
        raise SystemExit(f"{name}: pieces {sorted(got)[:4]} differ from {sorted(want)[:4]}")
    for key, experts in want.items():
        if not torch.equal(got[key], experts):
            raise SystemExit(f"{name}: piece {key} differs from the per-sequence loop")


if __name__ == "__main__":
    main()
