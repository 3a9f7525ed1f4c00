"""Plans for the trainer's token layouts: padded batch, THD packing, CP and SP splits.

Each function takes the sequence lengths of its source axis (sequences laid end to end)
and returns `TokenPlan`s; `plan.lengths` is the next step's source, so steps chain with
`TokenPlan.then`. Nothing here loops over sequences: positions come from cumsum,
repeat_interleave and arange over the whole token axis.
"""

from __future__ import annotations

from typing import Literal

import torch

from routereplay.align.plan import (
    PAD,
    Lengths,
    TokenPlan,
    as_lengths,
    check_fits,
    check_size,
    starts,
)
from routereplay.errors import LayoutError


def pad_plan(
    lengths: Lengths, seq_len: int | None = None, *, side: Literal["right", "left"] = "right"
) -> TokenPlan:
    """Sequences `[sum(lengths)]` -> a padded batch `[batch, seq_len]`, one sequence a row.

    lengths: `[batch]` tokens per sequence. seq_len: row length, default the longest.
    side:    "right" puts padding after each sequence, "left" before it (generation
             style). Padding positions read -1 (`plan.rows`), so traces get -1 rows.
    """
    lengths = as_lengths(lengths)
    longest = int(lengths.max()) if lengths.numel() else 0
    seq_len = longest if seq_len is None else seq_len
    if side not in ("right", "left"):
        raise LayoutError(f"side must be 'right' or 'left', found {side!r}.")
    check_fits(
        lengths,
        seq_len,
        f"seq_len={seq_len}",
        "a padded batch row cannot hold it (raise seq_len or truncate the sequence).",
    )
    column = torch.arange(seq_len)
    shift = (seq_len - lengths if side == "left" else torch.zeros_like(lengths))[:, None]
    valid = (column >= shift) & (column < shift + lengths[:, None])
    source = torch.where(valid, starts(lengths)[:, None] + column - shift, PAD)
    batch = lengths.numel()
    rows = torch.full((batch,), seq_len, dtype=torch.int64)
    return TokenPlan(source.flatten(), rows, int(lengths.sum()), (batch, seq_len))


def mask_plan(mask: torch.Tensor) -> TokenPlan:
    """Sequences `[mask.sum()]` -> a padded batch `[batch, seq]` whose real tokens sit
    where `mask` (bool `[batch, seq]`, an attention mask) is true, in order: any padding
    layout, such as verl's left-padded prompt followed by its right-padded response.
    Row i holds sequence i, `mask[i].sum()` tokens; the other positions read -1.
    `restore([batch_values], [plan])` takes them back out (unpadding)."""
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise LayoutError(
            f"The mask must be bool [batch, seq] (true at real tokens), found {mask.dtype} "
            f"{list(mask.shape)}."
        )
    mask = mask.cpu()
    order = mask.flatten().cumsum(0).view(mask.shape) - 1
    source = torch.where(mask, order, PAD).flatten()
    rows = torch.full((mask.shape[0],), mask.shape[1], dtype=torch.int64)
    return TokenPlan(source, rows, int(mask.sum()), tuple(mask.shape))


def padded_lengths(lengths: Lengths, multiple: int) -> torch.Tensor:
    """int64 `[sequences]`: each length rounded up to a multiple of `multiple`."""
    check_size(multiple, "multiple")
    lengths = as_lengths(lengths)
    return (lengths + multiple - 1) // multiple * multiple


def pack_plan(lengths: Lengths, multiple: int = 1) -> TokenPlan:
    """Sequences `[sum(lengths)]` -> THD packed `[sum(padded lengths)]`.

    Each sequence is padded at its end to a multiple of `multiple` (Megatron with CP
    needs `tp_size * cp_size * 2`; FP8 needs 16) with -1 positions. `plan.cu_seqlens` is
    int32 `[0, p0, p0 + p1, ...]` of the padded lengths (`cu_seqlens_padded`);
    `plan.valid_lengths` are the original lengths.
    """
    lengths = as_lengths(lengths)
    padded = padded_lengths(lengths, multiple)
    return rank_plan(lengths, padded, starts(lengths), 0, 1, False, int(lengths.sum()))


def context_parallel_plans(
    lengths: Lengths, cp_size: int, *, zigzag: bool = True
) -> list[TokenPlan]:
    """Split every sequence along its tokens over `cp_size` context-parallel ranks.

    lengths: `[sequences]` of the source axis (padded lengths when it is THD packed, or
             `[seq_len] * batch` for a padded batch, whose rows are split alike).
    zigzag:  each sequence is cut into `2 * cp_size` equal chunks and rank r takes chunks
             r and `2 * cp_size - 1 - r` (Megatron's load-balanced CP for THD and BSHD);
             otherwise rank r takes the r-th of `cp_size` contiguous chunks.
    Returns one plan per rank; rank r's axis is `[sum(lengths) / cp_size]`, its own part of
    every sequence in order (`plan.lengths = lengths / cp_size`).
    """
    check_size(cp_size, "cp_size")
    lengths = as_lengths(lengths)
    zigzag = zigzag and cp_size > 1  # one CP rank takes whole sequences either way
    check_cp_chunks(
        lengths,
        cp_size,
        zigzag,
        "Pad every sequence to a multiple of the chunk count first "
        "(pack_plan(lengths, multiple=...)).",
    )
    return _chunk_plans(lengths, cp_size, zigzag)


def sequence_parallel_plans(num_tokens: int, tp_size: int, *, rows: int = 1) -> list[TokenPlan]:
    """Split one rank's tokens over `tp_size` tensor-parallel ranks, as Megatron's
    sequence-parallel scatter does (contiguous chunks of the sequence axis).

    num_tokens: the rank's token axis: `rows` rows of `num_tokens / rows` tokens laid end to
                end (THD: one row; a padded `[batch, seq]` layout: `rows = batch`).
    Returns one plan per TP rank; rank t holds the t-th chunk of every row,
    `[num_tokens / tp_size]`. Megatron's router sees `[seq, batch]` order: with
    `rows > 1`, transpose the result to match it.
    """
    check_size(tp_size, "tp_size")
    check_size(rows, "rows")
    if num_tokens % rows or (num_tokens // rows) % tp_size:
        raise LayoutError(
            f"The rank's {num_tokens} tokens in {rows} row(s) do not split into tp_size="
            f"{tp_size} equal chunks per row: pad each sequence to a multiple of "
            "tp_size * cp_size * 2 when packing."
        )
    return _chunk_plans(torch.full((rows,), num_tokens // rows), tp_size, zigzag=False)


def check_cp_chunks(
    lengths: torch.Tensor,
    cp_size: int,
    zigzag: bool,
    fix: str,
    padded_from: torch.Tensor | None = None,
) -> None:
    """Every sequence must cut into equal context-parallel chunks (2 * cp_size zigzag)."""
    chunks = 2 * cp_size if zigzag else cp_size
    uneven = (lengths % chunks).nonzero()
    if uneven.numel():
        index = int(uneven[0])
        rule = f"2 * cp_size = {chunks} (zigzag)" if zigzag else f"cp_size = {chunks}"
        found = f"{int(lengths[index])} tokens"
        if padded_from is not None:
            found = f"{int(padded_from[index])} tokens, padded to {int(lengths[index])}"
        raise LayoutError(
            f"Sequence {index} has {found}, not divisible by {rule}: context parallelism "
            f"needs equal chunks. {fix}"
        )


def _chunk_plans(lengths: torch.Tensor, ranks: int, zigzag: bool) -> list[TokenPlan]:
    begin, source_rows = starts(lengths), int(lengths.sum())
    return [
        rank_plan(lengths, lengths, begin, rank, ranks, zigzag, source_rows)
        for rank in range(ranks)
    ]


def rank_plan(
    real: torch.Tensor,
    padded: torch.Tensor,
    begin: torch.Tensor,
    rank: int,
    ranks: int,
    zigzag: bool,
    source_rows: int,
) -> TokenPlan:
    """One rank's share of sequences split along their tokens over `ranks` ranks.

    real:   int64 `[sequences]`, tokens each sequence has on the source axis.
    padded: int64 `[sequences]`, its length once padded at its end (divisible into equal
            chunks); positions past `real` are padding.
    begin:  int64 `[sequences]`, where each sequence starts on the source axis.
    zigzag: rank r takes chunks r and `2 * ranks - 1 - r` of `2 * ranks` (mirrored so that
            causal attention work balances), else the r-th of `ranks` blocks.
    """
    local = padded // ranks
    if zigzag:
        half = local // 2
        at = torch.stack([rank * half, (2 * ranks - 1 - rank) * half], dim=1)
        width = torch.stack([half, half], dim=1)
    else:
        at, width = (rank * local)[:, None], local[:, None]
    valid = torch.minimum((real[:, None] - at).clamp(min=0), width)
    # Per sequence and chunk: a run of source tokens, then a run of padding.
    runs_begin = torch.stack([begin[:, None] + at, torch.full_like(at, PAD)], dim=2)
    runs_count = torch.stack([valid, width - valid], dim=2)
    return TokenPlan.from_runs(runs_begin.flatten(), runs_count.flatten(), local, source_rows)
