"""Anything a user can pass the public entry points either works or raises a
`RouteReplayError` subclass: never a raw numpy, torch or Python error.

Values are drawn from what users really pass by mistake: wrong types, floats for
integers, strings, nested lists, negative and huge numbers, tensors of the wrong dtype
or shape.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routereplay import MoELayout, ReplayController, RouteReplayError, RoutingTrace
from routereplay.align import (
    MicroBatches,
    balanced_micro_batches,
    context_parallel_plans,
    fixed_micro_batches,
    pack_plan,
    pad_plan,
    pad_traces,
)
from routereplay.engines import sglang, vllm
from routereplay.store import TraceFile, TraceWriter

LAYOUT = MoELayout(4, (1, 3), 8, 2)
TRACE = RoutingTrace(torch.tensor([[[0, 1], [2, 3]]] * 3), (1, 3), 8)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.sampled_from(["12", "abc", "-1", "1.5"]),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)
tensors = st.one_of(
    st.sampled_from(
        [
            torch.zeros(0),
            torch.zeros((3, 2, 2)),
            torch.zeros((3, 2, 2), dtype=torch.bool),
            torch.full((3, 2, 2), -5),
            torch.full((3, 2, 2), 300),
            torch.zeros((2,), dtype=torch.long),
            torch.arange(6).reshape(3, 2),
            np.zeros((3, 2, 2), dtype=np.uint16),
            np.zeros((3, 2, 2), dtype=np.float32),
        ]
    ),
    json_like,
)


def only_routereplay_errors(call: Callable[[], Any]) -> None:
    try:
        call()
    except RouteReplayError as error:
        assert str(error), "an error must say what is wrong"


@settings(max_examples=150, deadline=None)
@given(tensors, json_like, json_like)
def test_building_a_trace(experts: Any, layers: Any, num_experts: Any) -> None:
    only_routereplay_errors(lambda: RoutingTrace(experts, layers, num_experts))


@settings(max_examples=150, deadline=None)
@given(json_like, json_like, json_like, json_like)
def test_building_a_layout(num_layers: Any, moe_layers: Any, experts: Any, top_k: Any) -> None:
    only_routereplay_errors(lambda: MoELayout(num_layers, moe_layers, experts, top_k))


@settings(max_examples=150, deadline=None)
@given(json_like, json_like)
def test_decoding_engine_responses(response: Any, request: Any) -> None:
    for decode in (vllm.from_response, sglang.from_response):
        only_routereplay_errors(lambda d=decode: d(response, LAYOUT, request=request))
    only_routereplay_errors(lambda: vllm.from_stream(response, LAYOUT, request=request))


@settings(max_examples=150, deadline=None)
@given(json_like, json_like, json_like)
def test_decoding_a_choice(choice: Any, prompt_len: Any, completion_len: Any) -> None:
    only_routereplay_errors(
        lambda: vllm.from_openai_choice(
            choice if isinstance(choice, dict) else {"routed_experts": choice},
            LAYOUT,
            prompt_len=prompt_len,
            completion_len=completion_len,
        )
    )


@settings(max_examples=100, deadline=None)
@given(json_like, json_like, json_like)
def test_planning_alignment(lengths: Any, size: Any, side: Any) -> None:
    only_routereplay_errors(lambda: pad_plan(lengths, size, side=side))
    only_routereplay_errors(lambda: pack_plan(lengths, size))
    only_routereplay_errors(lambda: fixed_micro_batches(lengths, size))
    only_routereplay_errors(lambda: balanced_micro_batches(lengths, size))
    only_routereplay_errors(lambda: context_parallel_plans(lengths, size))
    only_routereplay_errors(lambda: pad_traces([TRACE], size, side=side))


@settings(max_examples=100, deadline=None)
@given(tensors, scalars)
def test_entering_replay(routes: Any, key: Any) -> None:
    controller = ReplayController(LAYOUT)

    def enter() -> None:
        with controller.replay(routes if not isinstance(routes, dict) else {key: routes}):
            pass

    only_routereplay_errors(enter)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tensors, json_like, json_like)
def test_appending_to_a_trace_file(
    tmp_path: Path, trace: Any, tokens: Any, prompt_len: Any
) -> None:
    writer = TraceWriter(tmp_path / "bad.rr", LAYOUT)
    try:
        only_routereplay_errors(lambda: writer.append(trace, tokens, prompt_len=prompt_len))
        only_routereplay_errors(lambda: writer.append(TRACE, tokens, prompt_len=prompt_len))
    finally:
        writer.discard()


@pytest.mark.parametrize(
    "call",
    [
        lambda: MoELayout(4, (1, 3), 8, 0),
        lambda: MoELayout.from_hf_config({"model_type": "qwen3_moe", "num_experts": "8"}),
        lambda: fixed_micro_batches(4.5, 2),  # type: ignore[arg-type]
        lambda: balanced_micro_batches(torch.tensor([1.5, 2.0]), 4),
        lambda: MicroBatches((torch.tensor([0.0, 1.0]),), 2),
    ],
    ids=["top_k 0", "num_experts a string", "a float count", "float lengths", "float groups"],
)
def test_known_mistakes_are_routereplay_errors(call: Callable[[], Any]) -> None:
    with pytest.raises(RouteReplayError):
        call()


@pytest.mark.parametrize("offset", [2**63, 2**70])
def test_a_trace_file_claiming_a_huge_tensor_is_unreadable_not_an_overflow(
    tmp_path: Path, offset: int
) -> None:
    header = {
        "__metadata__": {"format": "routereplay.trace"},
        "offsets": {"dtype": "I64", "shape": [1], "data_offsets": [0, offset]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "huge.rr"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(
        RouteReplayError, match=r"is not a readable trace file: its tensors end at byte"
    ):
        TraceFile(path)
