"""Per-sequence traces in and out of the trainer's layouts, and pipeline-stage layer slices.

Rollouts give one trace `[tokens_i, layers, top_k]` per sequence. `concat_traces` lays
them end to end (the source axis of every plan), `split_traces` cuts them apart again.
The padding and packing helpers are that plus one plan; stage slices cut the layer axis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from routereplay.align.layouts import mask_plan, pack_plan, pad_plan
from routereplay.align.plan import (
    Lengths,
    TokenPlan,
    as_lengths,
    check_fits,
    layer_runs,
    restore,
    token_rows,
)
from routereplay.errors import LayoutError, TraceError
from routereplay.errors import short_ids as _short
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit
from routereplay.trace import NO_ROUTE, RoutingTrace


def concat_traces(
    traces: Sequence[RoutingTrace],
    lengths: Lengths | None = None,
    layers: Iterable[int] | None = None,
) -> tuple[RoutingTrace, torch.Tensor]:
    """Per-sequence traces `[tokens_i, layers, top_k]` -> (`[sum tokens_i, layers, top_k]`,
    int64 lengths `[sequences]`). All must cover the same layers, top_k and expert count;
    `lengths`, when given, must match the traces' token counts. With `layers`, only
    those layers are joined (and copied)."""
    found = check_sequence_traces(traces, None if lengths is None else as_lengths(lengths))
    first = traces[0]
    tokens = (
        torch.cat([trace.tokens for trace in traces if trace.tokens is not None])
        if first.tokens is not None  # then every trace knows its tokens
        else None
    )
    if layers is None:
        experts = torch.cat([trace.experts for trace in traces])
        return first.derive(experts, first.layers, tokens), found
    kept = layer_runs(first, layers)
    experts = kept.join(lambda a, b: torch.cat([trace.experts[:, a:b] for trace in traces]))
    return first.derive(experts, kept.layers, tokens), found


def check_sequence_traces(
    traces: Sequence[RoutingTrace], lengths: torch.Tensor | None = None, whose: str = ""
) -> torch.Tensor:
    """Raise unless `traces` are per-sequence traces `[tokens_i, layers, top_k]` of one
    model (the same layers, top_k and expert count), all knowing their token ids or
    none, with `lengths [sequences]` tokens when given (`whose` names those lengths in
    the error, e.g. "the plan's "). Returns the traces' int64 lengths `[sequences]`."""
    if not traces:
        raise TraceError("No traces were given: a batch needs at least one sequence.")
    first = traces[0]
    layers, top_k, num_experts = first.layers, first.top_k, first.num_experts
    has_tokens = first.tokens is not None
    sizes = []
    # One pass, a few attribute reads a trace: a batch may hold 16,000 short sequences.
    for index, trace in enumerate(traces):
        shape = trace.experts.shape
        if len(shape) != 3:
            raise TraceError(
                f"Sequence {index}'s trace has token axes {list(trace.token_shape)}; a "
                "per-sequence trace is [tokens, layers, top_k]."
            )
        same_layers = trace.layers is layers or trace.layers == layers  # usually one tuple
        if shape[2] != top_k or not same_layers or trace.num_experts != num_experts:
            trace.check_compatible(  # the message's work
                first,
                names=(f"Sequence {index}'s trace", "sequence 0's"),
                fix="convert every trace to the same layers first (RoutingTrace.select_layers).",
            )
        if (trace.tokens is not None) != has_tokens:
            raise TraceError(
                f"Sequence {index}'s trace {'has no' if has_tokens else 'has'} token ids "
                f"and sequence 0's {'has' if has_tokens else 'has none'}: join traces that "
                "all know their tokens (engine traces), or none (RoutingTrace.with_tokens)."
            )
        sizes.append(shape[0])
    found = torch.tensor(sizes, dtype=torch.int64)
    if lengths is not None:
        check_lengths(lengths, found, f"{whose or 'the '}lengths say", whose)
    return found


def split_traces(trace: RoutingTrace, lengths: Lengths) -> list[RoutingTrace]:
    """`[sum(lengths), layers, top_k]` -> one trace `[lengths[i], layers, top_k]` per
    sequence (views, no copy)."""
    lengths = as_lengths(lengths)
    if int(lengths.sum()) != trace.num_rows:
        raise TraceError(
            f"The lengths sum to {int(lengths.sum())} tokens; the {trace.source} trace has "
            f"{trace.num_rows} (token axes {list(trace.token_shape)})."
        )
    rows = trace.experts.reshape(trace.num_rows, *trace.experts.shape[-2:])
    parts = torch.split(rows, lengths.tolist())
    tokens = token_rows(trace)
    if tokens is None:
        return [trace.derive(part, trace.layers, None) for part in parts]
    token_parts = torch.split(tokens, lengths.tolist())
    return [
        trace.derive(part, trace.layers, ids) for part, ids in zip(parts, token_parts, strict=True)
    ]


def pad_traces(
    traces: Sequence[RoutingTrace],
    seq_len: int | None = None,
    *,
    side: Literal["right", "left"] = "right",
    mask: torch.Tensor | None = None,
    layers: Iterable[int] | None = None,
) -> RoutingTrace:
    """Per-sequence traces -> a padded batch `[batch, seq_len, layers, top_k]`, -1 rows
    for padding (see `pad_plan`), or laid out as the attention `mask [batch, seq]` says
    (see `mask_plan`); over `layers` only when given (one pipeline rank's,
    `MoELayout.rank_moe_layers`)."""
    flat, lengths = concat_traces(traces, layers=layers)
    if mask is None:
        return pad_plan(lengths, seq_len, side=side).apply_trace(flat)
    if seq_len is not None:
        raise LayoutError("Give seq_len or mask, not both: the mask sets the row length.")
    plan = mask_plan(mask)
    check_lengths(plan.valid_lengths, lengths, "its mask row marks")
    return plan.apply_trace(flat)


def unpad_traces(
    batch: RoutingTrace,
    lengths: Lengths | None = None,
    *,
    side: Literal["right", "left"] = "right",
    mask: torch.Tensor | None = None,
    routed_padding: bool = False,
) -> list[RoutingTrace]:
    """A padded batch `[batch, seq, layers, top_k]` -> per-sequence traces, dropping the
    padding: `[lengths[i], layers, top_k]` padded on `side`, or the rows where the
    attention `mask [batch, seq]` is true.

    The rows dropped must be padding: no known token id, and (unless `routed_padding`)
    no route. A recording whose routers also routed the padding (megatron-core, or
    transformers without an attention mask) has routes there: say so with
    `routed_padding=True`; its token ids, where known, are still checked."""
    if len(batch.token_shape) != 2:
        raise TraceError(
            f"A padded batch trace is [batch, seq, layers, top_k]; this one has token axes "
            f"{list(batch.token_shape)}."
        )
    if mask is not None and lengths is None:
        plan = mask_plan(mask)
        if plan.token_shape != batch.token_shape:
            raise TraceError(
                f"The mask is {list(plan.token_shape)}; the batch's token axes are "
                f"{list(batch.token_shape)}: give the mask of this batch."
            )
    elif lengths is not None and mask is None:
        plan = _unpadding_plan(batch, lengths, side)
    else:
        raise LayoutError("Give the sequences' lengths or the batch's mask (one of them).")
    return split_traces(_restore_rows(batch, plan, routed_padding, "pad"), plan.valid_lengths)


def _unpadding_plan(
    batch: RoutingTrace, lengths: Lengths, side: Literal["right", "left"]
) -> TokenPlan:
    lengths = as_lengths(lengths)
    rows, seq_len = batch.token_shape
    if lengths.numel() != rows:
        raise TraceError(f"The batch has {rows} rows; {lengths.numel()} lengths were given.")
    check_fits(
        lengths,
        seq_len,
        f"the {seq_len} a batch row holds",
        "the lengths do not belong to this batch.",
        TraceError,
    )
    return pad_plan(lengths, seq_len, side=side)


def pack_traces(
    traces: Sequence[RoutingTrace], multiple: int = 1, layers: Iterable[int] | None = None
) -> tuple[RoutingTrace, TokenPlan]:
    """Per-sequence traces -> THD packed `[sum(padded lengths), layers, top_k]` and its plan
    (`plan.cu_seqlens`: int32 padded boundaries; apply it to token ids alike); over
    `layers` only when given."""
    flat, lengths = concat_traces(traces, layers=layers)
    plan = pack_plan(lengths, multiple)
    return plan.apply_trace(flat), plan


def unpack_traces(
    packed: RoutingTrace, lengths: Lengths, multiple: int = 1, *, routed_padding: bool = False
) -> list[RoutingTrace]:
    """THD packed `[sum(padded lengths), layers, top_k]` -> per-sequence traces, given the
    unpadded `lengths` and the `multiple` the packing padded to (`routed_padding` as
    `unpad_traces`: a recording whose routers routed the packing's padding)."""
    plan = pack_plan(lengths, multiple)
    if packed.num_rows != plan.num_tokens:
        raise TraceError(
            f"Packing these lengths to multiples of {multiple} gives {plan.num_tokens} tokens; "
            f"the packed trace has {packed.num_rows}: the lengths or the multiple differ "
            "from the packing's."
        )
    return split_traces(_restore_rows(packed, plan, routed_padding, "pack"), plan.valid_lengths)


def _restore_rows(
    trace: RoutingTrace, plan: TokenPlan, routed_padding: bool, how: str
) -> RoutingTrace:
    """`trace [*plan.token_shape, layers, top_k]` back on the plan's source axis, padding
    rows dropped."""
    rows = trace.experts.reshape(plan.num_tokens, *trace.experts.shape[-2:])
    tokens = token_rows(trace)
    _check_dropped(None if routed_padding else rows, tokens, plan, how)
    restored = None if tokens is None else restore([tokens], [plan])
    return trace.derive(restore([rows], [plan]), trace.layers, restored)


def _check_dropped(
    rows: torch.Tensor | None, tokens: torch.Tensor | None, plan: TokenPlan, how: str
) -> None:
    """The rows a plan drops as padding must hold no known token id and (`rows` given)
    no route: otherwise the lengths, the padding side or the multiple are not the
    batch's, and real routes would be dropped or shifted."""
    dropped = plan.rows < 0  # [num_tokens]
    routed = None if rows is None else (rows[..., 0] != NO_ROUTE).any(-1) & dropped
    known = None if tokens is None else (tokens >= 0) & dropped
    fix = (
        "the lengths, padding side and multiple the batch was laid out with (or its mask)"
        if how == "pad"
        else "the unpadded lengths and the multiple the packing padded to"
    )
    for bad, what in ((known, "a token id"), (routed, "routes")):
        if bad is not None and bool(bad.any()):
            flat = int(bad.nonzero()[0])
            where = [int(i) for i in torch.unravel_index(torch.tensor(flat), plan.token_shape)]
            position = (
                f"row {where[0]}, position {where[1]}" if len(where) == 2 else f"position {flat}"
            )
            routed_hint = (
                " If the recording routed its padding (megatron-core, or no attention mask), "
                "pass routed_padding=True."
                if what == "routes"
                else ""
            )
            raise TraceError(
                f"{position} holds {what}, but the given lengths and padding make it "
                f"padding ({int(bad.sum())} such rows): real routes would be dropped or "
                f"shifted. Give {fix}.{routed_hint}"
            )


def stage_slice(
    trace: RoutingTrace,
    layout: MoELayout,
    split: PipelineSplit,
    pp_rank: int,
    vp_stage: int = 0,
) -> RoutingTrace:
    """`[..., layers, top_k]` -> `[..., stage layers, top_k]`: the routed layers that
    (pp_rank, vp_stage) of `split` builds (`MoELayout.stage_moe_layers`). A view when
    those layers sit side by side on the trace's layer axis; a stage of dense layers only
    gets an empty layer axis."""
    layers = layout.stage_moe_layers(split, pp_rank, vp_stage)
    missing = [layer for layer in layers if layer not in trace.layers]
    if missing:
        raise TraceError(
            f"Pipeline stage (pp_rank={pp_rank}, vp_stage={vp_stage}) routes layers "
            f"{_short(layers)}; the {trace.source} trace covers {_short(trace.layers)}, missing "
            f"{_short(missing)}."
        )
    if not layers:
        return trace.derive(trace.experts[..., :0, :], (), trace.tokens)
    first = trace.slot(layers[0])
    if trace.layers[first : first + len(layers)] == layers:
        experts = trace.experts[..., first : first + len(layers), :]
        return trace.derive(experts, layers, trace.tokens)
    return trace.select_layers(layers)


def stack_stages(stages: Sequence[RoutingTrace], layout: MoELayout | None = None) -> RoutingTrace:
    """Stage slices `[..., stage layers, top_k]` -> one trace over all their layers, in
    layer order. With `layout`, the slices must cover exactly its routed layers."""
    if not stages:
        raise TraceError("No stage slices were given.")
    first = stages[0]
    owner: dict[int, int] = {}
    for index, stage in enumerate(stages):
        stage.check_compatible(
            first,
            names=(f"Stage slice {index}", "slice 0"),
            fix="stack slices of one piece of one batch.",
            layers=False,
            token_shape=True,
        )
        for layer in stage.layers:
            if layer in owner:
                raise TraceError(
                    f"Layer {layer} is in stage slices {owner[layer]} and {index}: each "
                    "routed layer belongs to one stage."
                )
            owner[layer] = index
    layers = tuple(sorted(owner))
    if layout is not None and layers != layout.moe_layers:
        missing = [layer for layer in layout.moe_layers if layer not in owner]
        extra = [layer for layer in layers if not layout.is_moe(layer)] if layers else []
        raise TraceError(
            f"The stage slices cover layers {_short(layers)}; the {layout.family} layout "
            f"routes {_short(layout.moe_layers)} (missing {_short(missing)}, not routed "
            f"{_short(extra)}): give one slice per pipeline stage."
        )
    tokens = _stage_tokens(stages)
    ordered = sorted((stage for stage in stages if stage.layers), key=lambda t: t.layers[0])
    if not ordered:
        return first.derive(first.experts, (), tokens)
    experts = torch.cat([stage.experts for stage in ordered], dim=-2)
    joined = [layer for stage in ordered for layer in stage.layers]
    if joined != list(layers):  # slices that interleave (not stage ranges): sort the slots
        experts = experts[..., sorted(range(len(joined)), key=joined.__getitem__), :]
    return first.derive(experts, layers, tokens)


def _stage_tokens(stages: Sequence[RoutingTrace]) -> torch.Tensor | None:
    """The token ids the stage slices know, which must agree where two know them."""
    known = [(i, s.tokens) for i, s in enumerate(stages) if s.tokens is not None]
    if not known:
        return None
    first_index, tokens = known[0]
    merged = tokens.clone()
    for index, other in known[1:]:
        both = (merged >= 0) & (other >= 0)
        if bool((both & (merged != other)).any()):
            raise TraceError(
                f"Stage slices {first_index} and {index} were recorded for other token ids: "
                "stack slices of one piece of one batch."
            )
        merged = torch.where(merged >= 0, merged, other)
    return merged


def check_lengths(lengths: torch.Tensor, found: torch.Tensor, said: str, whose: str = "") -> None:
    """Raise unless the traces' lengths `found` are `lengths` (`said`: who gave those,
    e.g. "the plan's lengths say")."""
    if lengths.numel() != found.numel():
        raise TraceError(
            f"{found.numel()} traces were given for {whose}{lengths.numel()} sequences."
        )
    wrong = (lengths != found).nonzero()
    if wrong.numel():
        index = int(wrong[0])
        raise TraceError(
            f"Sequence {index}'s trace has {int(found[index])} tokens; {said} "
            f"{int(lengths[index])}. Traces and layout must describe the same sequences."
        )
