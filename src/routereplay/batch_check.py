"""What replay checks of a batch before any route is used: that the trace was laid out
for the batch the model sees (token axes, padding) and recorded for its tokens.

Called by the controller once per forward (`ReplayController.set_tokens`) and by
adapters before a pipeline schedule (`ReplayController.check_tokens_of`); and that a
second forward under one micro-batch key runs the same tokens as the first.
"""

from __future__ import annotations

import numpy as np
import torch

from routereplay.errors import ReplayError
from routereplay.recording import Tokens
from routereplay.trace import NO_ROUTE, RoutingTrace


def check_batch(trace: RoutingTrace, tokens: Tokens, where: str) -> None:
    """Raise unless `trace` can be replayed on the forward of `tokens`: the same token
    axes, no route on a padding position, and, where both know them, the same token
    ids position by position. The token ids catch every shifted, swapped or wrongly
    padded row before a route is used."""
    if trace.num_rows != int(np.prod(tokens.token_shape)):
        raise ReplayError(
            f"{where}: the batch has token axes {list(tokens.token_shape)} "
            f"({int(np.prod(tokens.token_shape))} tokens); the trace holds "
            f"{list(trace.token_shape)} ({trace.num_rows}). Align the trace to the "
            "trainer's batch (padding, packing, micro-batch split) before replay."
        )
    if (
        len(trace.token_shape) == len(tokens.token_shape)
        and trace.token_shape != tokens.token_shape
    ):
        raise ReplayError(
            f"{where}: the batch has token axes {list(tokens.token_shape)}; the trace "
            f"{list(trace.token_shape)}: the same count, laid out otherwise (batch-first "
            "vs sequence-first?). Lay the trace out as the batch is."
        )
    shape = trace.token_shape
    # Where the trace knows its tokens, the ids decide (routed padding of a recording
    # made without a mask is harmless); without them, a routed padding position is the
    # only sign of a trace padded on the other side or shifted.
    if tokens.padding is not None and trace.tokens is None:
        padding = tokens.padding.to("cpu").reshape(shape)
        routed = (trace.experts[..., 0] != NO_ROUTE).any(-1)  # [*shape]
        wrong = routed & padding
        if bool(wrong.any()):
            position = _position(wrong)
            raise ReplayError(
                f"{where}: the trace routes {position}, which the attention mask marks "
                f"padding ({int(wrong.sum())} such positions): the trace is padded on the "
                "other side, or shifted. Lay it out with the batch's mask "
                "(align.pad_traces(..., mask=attention_mask))."
            )
    if trace.tokens is None or tokens.ids is None:
        return
    check_token_ids(trace.tokens, tokens.ids.reshape(shape), where)


def check_token_ids(expected: torch.Tensor, batch_ids: torch.Tensor, where: str) -> None:
    """Raise unless the batch's token ids `batch_ids [*axes]` are the trace's `expected
    [*axes]` wherever those are known (>= 0), naming the first position that differs."""
    expected = expected.long()
    batch_ids = batch_ids.detach().to("cpu", torch.int64)
    wrong = (expected >= 0) & (expected != batch_ids)
    if bool(wrong.any()):
        index = tuple(int(i) for i in wrong.nonzero()[0])
        raise ReplayError(
            f"{where}: the trace was recorded for token {int(expected[index])} at "
            f"{_position(wrong)}, but the batch holds token {int(batch_ids[index])} there "
            f"({int(wrong.sum())} of {int((expected >= 0).sum())} known positions differ): "
            "the routes belong to other tokens (a shifted, swapped or wrongly padded row, "
            "or another rollout). Align the rollout's trace to this batch."
        )


def _position(mask: torch.Tensor) -> str:
    """'sequence 1, position 4' (or 'position 4') of the first True in `mask`."""
    index = [int(i) for i in mask.nonzero()[0]]
    if len(index) == 2:
        return f"sequence {index[0]}, position {index[1]}"
    return f"position {', '.join(map(str, index))}"


def check_trace_tokens(
    trace: RoutingTrace, token_ids: torch.Tensor, where: str, sequence_first: bool = False
) -> bool:
    """Raise unless `trace` was recorded for `token_ids [batch, seq]`; False when the
    two cannot be compared (the trace knows no ids, or holds another token count: a
    sequence-parallel piece), True when they were.

    `sequence_first`: the trace is `[seq, batch]`, as Megatron's routers see tokens.
    """
    if trace.tokens is None or token_ids.numel() != trace.num_rows:
        return False
    expected = trace.tokens
    if sequence_first and expected.ndim == 2:
        expected = expected.t()  # compare, and name positions, batch-first
    if expected.ndim > 1 and tuple(expected.shape) != tuple(token_ids.shape):
        order = "sequence-first (rr_megatron.sequence_first)" if sequence_first else "so"
        raise ReplayError(
            f"{where}: the batch's input ids are {list(token_ids.shape)}; the trace's token "
            f"axes are {list(trace.token_shape)}: lay the trace out {order}, as the model "
            "sees the batch."
        )
    check_token_ids(expected, token_ids.reshape(expected.shape), where)
    return True


def check_same_tokens(first: Tokens, tokens: Tokens, where: str, mode: str) -> None:
    """A second forward under one micro-batch key in one `mode` context must run the
    token ids of the `first` (recompute does; a new batch needs its own key)."""
    assert first.ids is not None and tokens.ids is not None
    before, now = first.ids.reshape(-1).to(tokens.ids.device), tokens.ids.reshape(-1)
    if before.numel() != now.numel():
        found = f"{now.numel()} tokens, the first forward's {before.numel()}"
    elif not torch.equal(before, now):
        position = int((before != now).nonzero()[0])
        found = (
            f"token {int(now[position])} at flat position {position}, where the first "
            f"forward had {int(before[position])}"
        )
    else:
        return
    generation = (
        " model.generate() runs a forward per new token: record generation with "
        "routereplay.engines.hf.RecordingEngine."
        if mode == "record"
        else ""
    )
    raise ReplayError(
        f"{where}: a second forward runs other tokens ({found}) under the same micro-batch "
        f"key in one {mode} context: its routers would get the first batch's ids as if "
        "recomputing. Run each batch under its own controller.micro_batch(key), or one "
        f"context per batch.{generation}"
    )
