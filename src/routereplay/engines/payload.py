"""The row contract every rollout engine shares, and multi-turn stitching.

An engine forwards every token of a sequence (prompt + completion) except the final
sampled one, and returns one row of expert ids per forwarded token from a `start`
position on: rows `start .. prompt_len + completion_len - 2`, each
`[width, top_k]`. The width is every decoder layer (dense ones as zeros) or, in
some engine versions, the routed layers only; the layout tells the two apart.

`trace_from_rows` turns such rows into a `RoutingTrace` over all
`prompt_len + completion_len` tokens: rows the engine did not return (before `start`,
and the final token) are -1, "no route". `Conversation` stitches the turns of a
multi-turn rollout into one trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
import torch

from routereplay.checks import exact_int
from routereplay.errors import LayoutError, TraceError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout
from routereplay.trace import NO_ROUTE, RoutingTrace

LayerAxis = Literal["all_layers", "routed_layers"]
SequenceId = int | str
_Ids = np.ndarray[Any, np.dtype[np.signedinteger[Any]]]  # widened engine ids


def layer_axis(width: int, layout: MoELayout) -> LayerAxis:
    """What an engine's layer axis of `width` slots covers (`MoELayout.layer_axis`),
    raising `TraceError` for any other width."""
    try:
        return layout.layer_axis(width)
    except LayoutError as error:
        raise TraceError(f"engine rows: {error}") from None


def trace_from_rows(
    rows: np.ndarray[Any, Any],
    layout: MoELayout,
    *,
    prompt_len: int,
    completion_len: int,
    source: str,
    start: int = 0,
    sequence: SequenceId | None = None,
    out: np.ndarray[Any, Any] | None = None,
) -> RoutingTrace:
    """`RoutingTrace [prompt_len + completion_len, routed layers, top_k]` from engine rows.

    `rows [n, width, top_k]` (any integer dtype; read-only is fine, it is never
    written) hold the routes of tokens `start .. start + n - 1`, where
    `n = prompt_len + completion_len - 1 - start`: the final sampled token was never
    forwarded. `width` is `layout.num_layers` or `len(layout.moe_layers)` (see
    `layer_axis`). Rows before `start` and the final row are -1 in the result.

    Every error names `sequence` (an index or request id) and `source`. `out` is where
    the trace's ids go (see `RoutingTrace.from_all_layers`).
    """
    where = describe(source, sequence)
    return _sequence_trace(rows, layout, prompt_len, completion_len, start, source, where, out)


def describe(source: str, sequence: SequenceId | None) -> str:
    """How errors name a sequence: "vllm sequence 3", "vllm sequence 'cmpl-1/0'", or a
    place in a response as given ("vllm line 2, choice 0"), "sglang payload"."""
    if sequence is None:
        return f"{source} payload"
    if isinstance(sequence, str) and " " in sequence:
        return sequence if sequence.startswith(f"{source} ") else f"{source} {sequence}"
    # Request ids are quoted so that "sequence 'req-7'" never reads as an index.
    name = repr(sequence) if isinstance(sequence, str) else str(sequence)
    return f"{source} sequence {name}"


class Conversation:
    """The routes of one multi-turn conversation, stitched turn by turn.

    Turn k's prompt is the whole conversation so far plus new tokens. The engine
    returns that turn's rows from `start`, usually `next_start`: the row of the
    previous turn's final sampled token, which had no route then and is forwarded now
    as part of this prompt. Rows the new turn sends again must route as before: the
    same prefix routed differently means the turns are not one conversation or the
    engine's prefix changed. Turns are numbered from 0 in error messages.
    """

    def __init__(
        self, layout: MoELayout, source: str, *, sequence: SequenceId | None = None
    ) -> None:
        self.layout = layout
        self.source = source
        self.sequence = sequence
        self.num_turns = 0
        self._trace: RoutingTrace | None = None

    @property
    def trace(self) -> RoutingTrace:
        """`[tokens so far, routed layers, top_k]`; the final sampled token's row is -1."""
        if self._trace is None:
            raise TraceError(
                f"{describe(self.source, self.sequence)}: the conversation has no turns yet; "
                "call add_turn (or add_trace) first."
            )
        return self._trace

    @property
    def next_start(self) -> int:
        """The start to request for the next turn (SGLang `routed_experts_start_len`,
        vLLM `routed_experts_prompt_start`): the previous final token's row."""
        return 0 if self._trace is None else self._trace.num_rows - 1

    def add_turn(
        self,
        rows: np.ndarray[Any, Any],
        *,
        prompt_len: int,
        completion_len: int,
        start: int,
        overwrite: bool = False,
    ) -> RoutingTrace:
        """Add a turn from engine rows `[n, width, top_k]` (as `trace_from_rows`).

        `prompt_len` counts the whole prompt, the conversation so far included.
        Returns the stitched trace.
        """
        where = self._where()
        held = 0 if self._trace is None else self._trace.num_rows
        if prompt_len < held:
            raise TraceError(
                f"{where}: prompt_len={prompt_len} is shorter than the {held} tokens the "
                "conversation already holds; a turn's prompt must contain the whole "
                "conversation so far, token for token."
            )
        turn = _sequence_trace(
            rows, self.layout, prompt_len, completion_len, start, self.source, where
        )
        return self.add_trace(turn, start=start, overwrite=overwrite)

    def add_trace(self, turn: RoutingTrace, *, start: int, overwrite: bool = False) -> RoutingTrace:
        """Add a turn already decoded into a trace over all its tokens (e.g. by
        `vllm.from_openai_choice` or `sglang.from_meta_info`), whose engine rows began
        at `start`. Returns the stitched trace."""
        where = self._where()
        self._check_turn(turn, where)
        new = turn.expert_ids()
        if self._trace is None:
            stitched = new
        else:
            stitched = self._stitch(self._trace.expert_ids(), new, start, overwrite, where)
        self._trace = RoutingTrace(
            stitched, self.layout.moe_layers, self.layout.num_experts, self.source
        )
        self.num_turns += 1
        return self._trace

    def _stitch(
        self,
        held: torch.Tensor,
        new: torch.Tensor,
        start: int,
        overwrite: bool,
        where: str,
    ) -> torch.Tensor:
        """`held [h, L, k]` and the new turn `new [t, L, k]` (both int64) into `[t, L, k]`."""
        h, t = held.shape[0], new.shape[0]
        if t <= h:
            raise TraceError(
                f"{where} covers {t} tokens but the conversation already holds {h}: a turn's "
                "prompt must contain the whole conversation so far, and the turn adds at "
                "least one sampled token."
            )
        if start < 0:
            raise TraceError(f"{where}: start must be at least 0, found {start}.")
        if start > h - 1:
            missing = f"row {h - 1}" if start == h else f"rows {h - 1}..{start - 1}"
            raise TraceError(
                f"{where} starts at row {start}, but the conversation holds routes up to "
                f"row {h - 2} and row {h - 1} (the previous final token) has none yet: "
                f"{missing} would be left without routes. Request the next turn from start "
                f"{h - 1} or earlier (Conversation.next_start)."
            )
        old, fresh = held[start:], new[start:h]
        old_routed = old[..., 0] != NO_ROUTE
        fresh_routed = fresh[..., 0] != NO_ROUTE
        # Only the expert set routes a token; engines may order the columns differently.
        differ = (old.sort(-1).values != fresh.sort(-1).values).any(-1)
        differ &= old_routed & fresh_routed
        if differ.any() and not overwrite:
            row, slot = (int(i) for i in differ.nonzero()[0])
            raise TraceError(
                f"{where} routes row {start + row}, layer {self.layout.moe_layers[slot]} to "
                f"experts {fresh[row, slot].tolist()} but the conversation already holds "
                f"{old[row, slot].tolist()} there ({int(differ.sum())} of "
                f"{int((old_routed & fresh_routed).sum())} re-sent (row, layer) routes "
                "differ). The same prefix routed differently means the turns are not one "
                "conversation or the engine's prefix changed (re-rendered chat template, "
                "new weights, a prefill that is not batch-invariant). Pass overwrite=True "
                "to keep the newer turn's routes."
            )
        stitched = new.clone()
        stitched[:start] = held[:start]
        keep = old_routed & ~(fresh_routed & overwrite)
        stitched[start:h][keep] = old[keep]
        return stitched

    def _check_turn(self, turn: RoutingTrace, where: str) -> None:
        layout = self.layout
        shape = f"[tokens, {len(layout.moe_layers)} routed layers, top_k={layout.top_k}]"
        if len(turn.token_shape) != 1:
            raise TraceError(
                f"{where}: a turn is a trace {shape}; found token axes "
                f"{list(turn.token_shape)}: give one sequence's trace."
            )
        turn.check_compatible(
            layout,
            names=(f"{where}: the turn", f"the conversation's {layout.family} layout"),
            fix=f"a turn is a trace {shape} over the layout's routed layers; decode it "
            "with this conversation's layout.",
        )

    def _where(self) -> str:
        return f"{describe(self.source, self.sequence)}, turn {self.num_turns}"


# -- internals ------------------------------------------------------------------------


def _sequence_trace(
    rows: np.ndarray[Any, Any],
    layout: MoELayout,
    prompt_len: int,
    completion_len: int,
    start: int,
    source: str,
    where: str,
    out: np.ndarray[Any, Any] | None = None,
) -> RoutingTrace:
    """Check engine rows against the contract, then place them at `start` of an all -1
    sequence and convert it with `RoutingTrace.from_all_layers` (dense layers, broken
    captures, ranges, duplicates), whose row numbers are then the sequence's positions."""
    integer = isinstance(rows, np.ndarray) and np.issubdtype(rows.dtype, np.integer)
    if not integer or not np.can_cast(rows.dtype, np.int64):
        found = rows.dtype if isinstance(rows, np.ndarray) else type(rows)
        raise TraceError(
            f"{where}: engine rows must be a numpy array of integers that fit int64 "
            f"(uint8, uint16, int16, int32, ...), found {found}."
        )
    if rows.ndim != 3:
        raise TraceError(
            f"{where}: engine rows are [rows, layers, top_k], found shape {rows.shape}."
        )
    prompt_len = exact_int(prompt_len, f"{where}: prompt_len", TraceError)
    completion_len = exact_int(completion_len, f"{where}: completion_len", TraceError)
    start = exact_int(start, f"{where}: start", TraceError)
    if prompt_len < 1 or completion_len < 1:
        raise TraceError(
            f"{where}: prompt_len and completion_len must be at least 1, found {prompt_len} "
            f"and {completion_len}: an engine request has a prompt and samples at least one "
            "token."
        )
    if not 0 <= start <= prompt_len:
        raise TraceError(
            f"{where}: start={start} must lie in [0, prompt_len={prompt_len}]: engines return "
            "rows from a position inside the prompt (SGLang routed_experts_start_len, vLLM "
            "routed_experts_prompt_start)."
        )
    try:
        layer_axis(rows.shape[1], layout)
    except TraceError as error:
        raise TraceError(f"{where}: {error}") from None
    if rows.shape[2] != layout.top_k:
        raise TraceError(
            f"{where}: rows hold {rows.shape[2]} experts per layer; the {layout.family} layout "
            f"routes every token to top_k={layout.top_k}. Build the layout from the served "
            "model's config (num_experts_per_tok)."
        )
    expected = prompt_len + completion_len - 1 - start
    found = rows.shape[0]
    if found != expected:
        gap = abs(found - expected)
        raise TraceError(
            f"{where}: found {found} rows, {gap} row{'s' if gap > 1 else ''} "
            f"{'more' if found > expected else 'fewer'} than expected. The engine returns "
            "one row per forwarded token (all but the final sampled one) from start: "
            f"prompt_len {prompt_len} + completion_len {completion_len} - 1 - start {start} "
            f"= {expected}. Check that prompt_len and completion_len count the tokens the "
            "engine saw and that start is the request's routed-experts start (vLLM "
            "routed_experts_prompt_start, SGLang routed_experts_start_len: no response "
            "echoes it, so pass the request with the response)."
        )
    # One copy into the trace's compact dtype (the caller's buffer, often read-only, is
    # never written); rows the engine did not return, before start and the final token,
    # are -1.
    try:
        return RoutingTrace.from_all_layers(
            rows, layout, source, start=start, num_tokens=prompt_len + completion_len, out=out
        )
    except TraceError as error:
        raise TraceError(f"{where}: {error}") from error


def require_object(value: Any, where: str) -> Mapping[str, Any]:
    """`value` if it is a JSON object (a mapping), else a `TraceError` naming `where`."""
    if not isinstance(value, Mapping):
        raise TraceError(f"{where}: expected a JSON object, found {type(value).__name__}.")
    return value


def token_ids(value: Any, field: str, where: str, hint: str) -> torch.Tensor:
    """A sequence of token ids (a JSON list, a tuple, a numpy array) as int64 `[n]`;
    `hint` says how to make the engine send them when they are missing."""
    if value is None:
        raise TraceError(f"{where}: {field} is missing: {hint}.")
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise TraceError(
            f"{where}: {field} must be a list of token ids, found {type(value).__name__}."
        )
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise TraceError(f"{where}: {field} must be 1-D token ids, found shape {value.shape}.")
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, Integral) or i < 0]
    if bad:
        found = f"{bad[0]!r} in it"
        raise TraceError(
            f"{where}: {field} must be a list of non-negative integer token ids, found {found}."
        )
    try:
        return torch.tensor([int(i) for i in value], dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):
        raise TraceError(f"{where}: {field} holds a token id beyond int64.") from None


def logprobs(values: Any, completion_len: int | None, where: str) -> torch.Tensor | None:
    """The engine's log-prob of each sampled token as float32 `[completion_len]`; None
    when it sent none. `completion_len` None takes any count (one streamed chunk's)."""
    if values is None:
        return None
    if not isinstance(values, Sequence) or not all(
        isinstance(v, Real) and not isinstance(v, bool) for v in values
    ):
        raise TraceError(
            f"{where}: log-probs must be a list of numbers, one per sampled token, found "
            f"{type(values).__name__}."
        )
    if completion_len is not None and len(values) != completion_len:
        raise TraceError(
            f"{where}: logprobs hold {len(values)} values for {completion_len} sampled tokens."
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def start_position(value: Any, field: str, where: str) -> int:
    """A request's routed-experts start (vLLM `routed_experts_prompt_start`, SGLang
    `routed_experts_start_len`): 0 when not given, else a non-negative integer."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise TraceError(f"{where}: {field} must be a non-negative integer, found {value!r}.")
    return int(value)


def choice_id(request_id: Any, index: Any) -> str | None:
    """The id of choice `index` of request `request_id`: "cmpl-7/0"; None without an id."""
    return None if request_id is None else f"{request_id}/{index}"


def rollout(where: str, **fields: Any) -> Rollout:
    """A `Rollout` of `fields`, its errors naming `where`."""
    try:
        return Rollout(**fields)
    except TraceError as error:
        raise TraceError(f"{where}: {error}") from None
