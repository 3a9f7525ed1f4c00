"""Moving routes between the rollout's per-sequence layout and the trainer's layouts.

Every layout step is a `TokenPlan`: an int64 index `source [tokens]` saying which source
token each output position holds (-1 for padding), computed once from sequence lengths
and applied to anything per-token, token ids `[tokens]` and trace experts
`[tokens, layers, top_k]` alike, so that every route stays next to its token.

    lengths ──pad_plan──────────────▶ [batch, seq]             (right or left padding)
    mask    ──mask_plan─────────────▶ [batch, seq]             (any layout: verl's)
            ──pack_plan─────────────▶ THD [sum padded]          (cu_seqlens, int32)
            ──MicroBatches.plans────▶ each micro-batch's sequences (fixed or balanced)
            ──context_parallel_plans▶ each CP rank's chunks     (zigzag or contiguous)
            ──sequence_parallel_plans▶ each TP rank's chunk      (Megatron SP scatter)
    plan_thd: all of the above chained, one plan per (micro-batch, cp rank, tp rank).
    stage_slice / stack_stages: the layer axis for a (pp_rank, vp_stage) and back.

Plans chain with `TokenPlan.then`; `restore` / `restore_trace` undo a set of plans that
holds every source token once (R2: routes recorded per rank back to the batch).
"""

from routereplay.align.batch import Piece, ThdPlan, plan_thd
from routereplay.align.layouts import (
    context_parallel_plans,
    mask_plan,
    pack_plan,
    pad_plan,
    padded_lengths,
    sequence_parallel_plans,
)
from routereplay.align.micro_batches import (
    MicroBatches,
    balanced_micro_batches,
    fixed_micro_batches,
)
from routereplay.align.plan import TokenPlan, check_partition, restore, restore_trace
from routereplay.align.source import SequenceSource
from routereplay.align.traces import (
    concat_traces,
    pack_traces,
    pad_traces,
    split_traces,
    stack_stages,
    stage_slice,
    unpack_traces,
    unpad_traces,
)

__all__ = [
    "MicroBatches",
    "Piece",
    "SequenceSource",
    "ThdPlan",
    "TokenPlan",
    "balanced_micro_batches",
    "check_partition",
    "concat_traces",
    "context_parallel_plans",
    "fixed_micro_batches",
    "mask_plan",
    "pack_plan",
    "pack_traces",
    "pad_plan",
    "pad_traces",
    "padded_lengths",
    "plan_thd",
    "restore",
    "restore_trace",
    "sequence_parallel_plans",
    "split_traces",
    "stack_stages",
    "stage_slice",
    "unpack_traces",
    "unpad_traces",
]
