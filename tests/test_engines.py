"""Engine payloads: vLLM and SGLang routes decoded into traces, and multi-turn stitching."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from engine_payloads import (
    DENSE_PREFIX,
    MANY_EXPERTS,
    all_layers,
    expected_experts,
    npy_base64,
    openai_choice,
    routed_ids,
    sglang_meta_info,
    vllm_dtype,
)
from hypothesis import given
from hypothesis import strategies as st

from routereplay import NO_ROUTE, MoELayout, RoutingTrace, TraceError
from routereplay.engines import Conversation, layer_axis, sglang, trace_from_rows, vllm

# One sequence used throughout: 5 prompt tokens, 3 sampled, so the engine forwards 7.
PROMPT, COMPLETION = 5, 3
ROWS = PROMPT + COMPLETION - 1


def ids(trace: RoutingTrace) -> np.ndarray:
    return trace.expert_ids().numpy()


def vllm_rows(layout: MoELayout = DENSE_PREFIX, rows: int = ROWS, seed: int = 0) -> np.ndarray:
    return all_layers(layout, routed_ids(layout, rows, seed))


def decode_vllm(rows: np.ndarray | None, **kwargs: object) -> RoutingTrace:
    return vllm.from_completion(
        rows, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION, **kwargs
    )


# -- the row contract, through vLLM's offline array -------------------------------------


def test_routed_layers_keep_their_global_ids_after_a_dense_prefix() -> None:
    rows = vllm_rows()
    trace = decode_vllm(rows)
    assert trace.layers == (2, 3, 4, 5) and trace.source == "vllm"
    # Layer 2 is the first routed layer: its ids come from column 2, not column 0.
    assert trace.layer_experts(2)[:ROWS].tolist() == rows[:, 2].tolist()
    assert trace.layer_experts(5)[:ROWS].tolist() == rows[:, 5].tolist()


def test_the_final_sampled_token_has_no_route() -> None:
    trace = decode_vllm(vllm_rows())
    assert trace.token_shape == (PROMPT + COMPLETION,)
    assert trace.routed_mask().all(-1).tolist() == [True] * ROWS + [False]
    assert (ids(trace)[-1] == NO_ROUTE).all()


def test_rows_before_prompt_start_have_no_route() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS - 3)
    trace = decode_vllm(all_layers(DENSE_PREFIX, routed), prompt_start=3)
    assert np.array_equal(
        ids(trace), expected_experts(DENSE_PREFIX, routed, PROMPT + COMPLETION, 3)
    )
    assert trace.routed_mask().all(-1).tolist() == [False] * 3 + [True] * 4 + [False]


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        (DENSE_PREFIX, np.uint8),  # vLLM, up to 256 experts
        (DENSE_PREFIX, np.int16),  # older vLLM
        (DENSE_PREFIX, np.int32),  # SGLang
        (MANY_EXPERTS, np.uint16),  # vLLM, more than 256 experts
    ],
)
def test_every_engine_dtype_decodes_to_the_same_ids(layout: MoELayout, dtype: type) -> None:
    routed = routed_ids(layout, ROWS)
    rows = all_layers(layout, routed, dtype)
    trace = vllm.from_completion(rows, layout, prompt_len=PROMPT, completion_len=COMPLETION)
    assert np.array_equal(ids(trace), expected_experts(layout, routed, PROMPT + COMPLETION, 0))


def test_ids_above_255_survive_uint16() -> None:
    routed = routed_ids(MANY_EXPERTS, ROWS)
    assert routed.max() > 255  # the ids that wrapped in a peer's uint8 storage
    rows = all_layers(MANY_EXPERTS, routed)
    assert rows.dtype == np.uint16
    trace = vllm.from_completion(rows, MANY_EXPERTS, prompt_len=PROMPT, completion_len=COMPLETION)
    assert int(trace.expert_ids().max()) == int(routed.max())


def test_a_routed_only_layer_axis_is_accepted_and_reported() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS)
    routed_only = routed.astype(np.uint8)
    assert layer_axis(routed_only.shape[1], DENSE_PREFIX) == "routed_layers"
    assert layer_axis(DENSE_PREFIX.num_layers, DENSE_PREFIX) == "all_layers"
    assert decode_vllm(routed_only).equal(decode_vllm(all_layers(DENSE_PREFIX, routed)))


def test_read_only_rows_are_decoded_without_being_written() -> None:
    rows = vllm_rows()
    rows.setflags(write=False)  # SGLang's np.frombuffer arrays are read-only
    before = rows.copy()
    trace = decode_vllm(rows)
    assert np.array_equal(rows, before)
    assert ids(trace)[:ROWS].tolist() == rows[:, 2:].tolist()


def test_trace_from_rows_names_its_source() -> None:
    trace = trace_from_rows(
        vllm_rows(), DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION, source="mine"
    )
    assert trace.source == "mine" and trace.num_experts == 16 and trace.top_k == 4


# -- malformed rows -----------------------------------------------------------------------


def test_one_row_too_many_says_by_how_much() -> None:
    with pytest.raises(
        TraceError,
        match=r"^vllm sequence 3: found 8 rows, 1 row more than expected\. .*prompt_len 5 \+ completion_len 3 - 1 - start 0 = 7\.",
    ):
        decode_vllm(vllm_rows(rows=ROWS + 1), sequence=3)


def test_rows_too_few_say_by_how_much() -> None:
    with pytest.raises(TraceError, match=r"found 3 rows, 2 rows fewer than expected.*= 5\."):
        decode_vllm(vllm_rows(rows=3), prompt_start=2)


def test_a_wrong_layer_count_names_both_expected_widths() -> None:
    with pytest.raises(
        TraceError,
        match=r"The layer axis has 5 slots; expected 6 \(every decoder layer, dense ones as zeros\) or 4 \(the routed layers \[2, 3, 4, 5\] only\)",
    ):
        decode_vllm(vllm_rows()[:, :5])


def test_a_wrong_top_k_is_reported() -> None:
    with pytest.raises(
        TraceError,
        match=r"rows hold 2 experts per layer; the custom layout routes every token to top_k=4",
    ):
        decode_vllm(vllm_rows()[..., :2])


def test_an_id_out_of_range_names_the_sequence_row_and_layer() -> None:
    rows = vllm_rows(rows=ROWS - 2)
    rows[3, 4, 1] = 16
    # Row 3 of what the engine returned from start 2 is token 5 of the sequence.
    with pytest.raises(
        TraceError,
        match=r"^vllm sequence 'req-9': Row \(token 5\), layer 4, holds expert id 16; ids must lie in \[0, 16\)",
    ):
        decode_vllm(rows, prompt_start=2, sequence="req-9")


def test_a_duplicate_id_in_a_row_names_the_row_and_layer() -> None:
    rows = vllm_rows()
    rows[1, 3] = [7, 7, 1, 2]
    with pytest.raises(
        TraceError,
        match=r"^vllm payload: Row \(token 1\), layer 3, routes to the same expert twice: \[7, 7, 1, 2\]",
    ):
        decode_vllm(rows)


def test_ids_on_a_dense_layer_mean_the_layout_is_wrong() -> None:
    rows = vllm_rows()
    rows[4, 1] = [1, 2, 3, 4]
    with pytest.raises(
        TraceError,
        match=r"Row \(token 4\), layer 1, holds expert ids \[1, 2, 3, 4\] but is dense in the custom layout: the layout does not match",
    ):
        decode_vllm(rows)


def test_a_routed_layer_all_zeros_is_a_broken_capture() -> None:
    rows = vllm_rows()
    rows[:, 3] = 0
    with pytest.raises(
        TraceError,
        match=r"Layer 3 is all zeros in every routed row of the vllm array: that is a broken capture",
    ):
        decode_vllm(rows, sequence=0)


def test_a_start_outside_the_prompt_is_refused() -> None:
    with pytest.raises(TraceError, match=r"start=6 must lie in \[0, prompt_len=5\]"):
        decode_vllm(vllm_rows(rows=1), prompt_start=6)


def test_rows_that_are_not_integers_are_refused() -> None:
    with pytest.raises(TraceError, match=r"must be a numpy array of integers .*found float32"):
        decode_vllm(vllm_rows().astype(np.float32))


def test_uint64_rows_that_could_wrap_are_refused() -> None:
    with pytest.raises(TraceError, match=r"integers that fit int64 .*found uint64"):
        decode_vllm(vllm_rows().astype(np.uint64))


def test_rows_without_a_layer_and_top_k_axis_are_refused() -> None:
    with pytest.raises(TraceError, match=r"are \[rows, layers, top_k\], found shape \(7, 24\)"):
        decode_vllm(vllm_rows().reshape(ROWS, -1))


def test_an_offline_completion_without_routes_says_how_to_capture() -> None:
    with pytest.raises(
        TraceError, match=r"routed_experts is None: .*enable_return_routed_experts=True"
    ):
        decode_vllm(None)


# -- vLLM's OpenAI-compatible server -------------------------------------------------------


@pytest.mark.parametrize("layout", [DENSE_PREFIX, MANY_EXPERTS], ids=["uint8", "uint16"])
def test_an_openai_choice_decodes_npy_base64(layout: MoELayout) -> None:
    routed = routed_ids(layout, ROWS)
    choice = openai_choice(all_layers(layout, routed))
    trace = vllm.from_openai_choice(choice, layout, prompt_len=PROMPT, completion_len=COMPLETION)
    assert np.array_equal(ids(trace), expected_experts(layout, routed, PROMPT + COMPLETION, 0))


def test_prompt_start_may_be_passed_from_the_request() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS - 3)
    choice = openai_choice(all_layers(DENSE_PREFIX, routed))
    trace = vllm.from_openai_choice(
        choice, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION, prompt_start=3
    )
    assert np.array_equal(
        ids(trace), expected_experts(DENSE_PREFIX, routed, PROMPT + COMPLETION, 3)
    )


def test_a_choice_without_routes_says_how_to_enable_capture() -> None:
    with pytest.raises(
        TraceError,
        match=r"^vllm sequence 1: the choice has no routed_experts: start the server with routed-experts capture enabled .*--enable-return-routed-experts",
    ):
        vllm.from_openai_choice(
            {"index": 0, "message": {}},
            DENSE_PREFIX,
            prompt_len=PROMPT,
            completion_len=COMPLETION,
            sequence=1,
        )


def test_a_whole_response_in_place_of_a_choice_is_recognised() -> None:
    response = {"choices": [openai_choice(vllm_rows())]}
    with pytest.raises(
        TraceError, match=r"this is a whole response: pass one of response\['choices'\]"
    ):
        vllm.from_openai_choice(
            response, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION
        )


def test_routes_that_are_not_base64_are_reported() -> None:
    choice = {"routed_experts": "not base64!"}
    with pytest.raises(TraceError, match=r"routed_experts is not valid base64"):
        vllm.from_openai_choice(choice, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION)


def test_base64_that_is_not_npy_is_reported() -> None:
    choice = {"routed_experts": base64.b64encode(b"\x01\x02\x03\x04").decode()}
    with pytest.raises(
        TraceError, match=r"routed_experts decodes from base64 but is not a \.npy array"
    ):
        vllm.from_openai_choice(choice, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION)


def test_a_pickled_npy_is_never_loaded() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"experts": 1}], dtype=object), allow_pickle=True)
    choice = {"routed_experts": base64.b64encode(buffer.getvalue()).decode()}
    with pytest.raises(
        TraceError, match=r"routed_experts is a \.npy array of object, not of integer expert ids"
    ):
        vllm.from_openai_choice(choice, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION)


# -- SGLang ------------------------------------------------------------------------------


def decode_sglang(meta_info: dict[str, object], **kwargs: object) -> RoutingTrace:
    return sglang.from_meta_info(
        meta_info, DENSE_PREFIX, prompt_len=PROMPT, completion_len=COMPLETION, **kwargs
    )


def test_sglang_flat_int32_is_reshaped_with_the_layout() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS)
    trace = decode_sglang(sglang_meta_info(all_layers(DENSE_PREFIX, routed, np.int32)))
    assert trace.source == "sglang" and trace.layers == (2, 3, 4, 5)
    assert np.array_equal(
        ids(trace), expected_experts(DENSE_PREFIX, routed, PROMPT + COMPLETION, 0)
    )


def test_sglang_rows_before_start_len_have_no_route() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS - 4)
    trace = decode_sglang(sglang_meta_info(all_layers(DENSE_PREFIX, routed)), start_len=4)
    assert np.array_equal(
        ids(trace), expected_experts(DENSE_PREFIX, routed, PROMPT + COMPLETION, 4)
    )


def test_sglang_a_routed_only_payload_is_refused_not_guessed() -> None:
    routed = routed_ids(DENSE_PREFIX, ROWS)  # 112 ids: 7 rows of the 4 routed layers only
    with pytest.raises(
        TraceError,
        match=r"112 ids are not whole rows of 6 decoder layers x top_k 4 = 24 \(SGLang sends every decoder layer",
    ):
        decode_sglang(sglang_meta_info(routed))


def test_sglang_top_1_routes_that_fit_another_width_are_never_reinterpreted() -> None:
    # 4 layers, layers 1 and 3 route, top-1: 6 routed-only rows are 12 ids, which is also
    # 3 whole all-layer rows. Read either way it would be wrong; it is a row-count error.
    layout = MoELayout.from_dense_pattern([0, 1, 0, 1], num_experts=8, top_k=1)
    routed = routed_ids(layout, 6)
    with pytest.raises(TraceError, match=r"found 3 rows, 3 rows fewer than expected"):
        sglang.from_meta_info(sglang_meta_info(routed), layout, prompt_len=4, completion_len=3)


def test_sglang_whole_rows_of_the_wrong_count_say_by_how_much() -> None:
    with pytest.raises(
        TraceError, match=r"^sglang sequence 4: found 8 rows, 1 row more than expected"
    ):
        decode_sglang(sglang_meta_info(vllm_rows(rows=ROWS + 1)), sequence=4)


def test_sglang_a_length_that_is_not_whole_rows_says_so() -> None:
    flat = vllm_rows().reshape(-1)[:-3]
    with pytest.raises(
        TraceError,
        match=r"165 ids are not whole rows of 6 decoder layers x top_k 4 = 24 .*7 rows were expected",
    ):
        decode_sglang(sglang_meta_info(flat))


def test_sglang_missing_routes_say_how_to_enable_capture() -> None:
    with pytest.raises(
        TraceError,
        match=r"meta_info has no routed_experts: launch the server with --enable-return-routed-experts and send return_routed_experts: true",
    ):
        decode_sglang({"id": "req-0", "prompt_tokens": PROMPT})


def test_sglang_a_whole_response_in_place_of_meta_info_is_recognised() -> None:
    with pytest.raises(TraceError, match=r"pass response\['meta_info'\]"):
        decode_sglang({"text": "...", "meta_info": sglang_meta_info(vllm_rows())})


def test_sglang_routes_that_are_not_base64_are_reported() -> None:
    with pytest.raises(TraceError, match=r"meta_info\['routed_experts'\] is not valid base64"):
        decode_sglang({"routed_experts": "@@@@"})


def test_sglang_bytes_that_are_not_whole_int32_ids_are_reported() -> None:
    payload = base64.b64encode(b"\x01\x00\x00\x00\x02").decode()
    with pytest.raises(
        TraceError, match=r"decodes to 5 bytes, not a whole number of 4-byte int32 ids"
    ):
        decode_sglang({"routed_experts": payload})


def test_sglang_routes_given_as_a_list_are_refused() -> None:
    with pytest.raises(
        TraceError,
        match=r"meta_info\['routed_experts'\] is a list; SGLang sends base64 of flattened int32 ids as a string",
    ):
        decode_sglang({"routed_experts": [1, 2, 3]})


# -- multi-turn conversations ---------------------------------------------------------------

# Three turns over one token sequence: (prompt_len, completion_len, start). Each prompt
# is the conversation so far plus new tokens; each turn starts at the previous turn's
# final token, which it forwards as part of its prompt.
TURNS = [(4, 3, 0), (10, 2, 6), (14, 3, 11)]
TOKENS = 17
ROUTES = routed_ids(DENSE_PREFIX, TOKENS - 1, seed=7)  # rows 0..15; token 16 is final


def turn_rows(start: int, tokens: int, routes: np.ndarray = ROUTES) -> np.ndarray:
    """What the engine returns for a turn: the conversation's rows start..tokens-2."""
    return all_layers(DENSE_PREFIX, routes[start : tokens - 1])


def conversation(turns: int) -> Conversation:
    talk = Conversation(DENSE_PREFIX, "sglang", sequence=2)
    for prompt_len, completion_len, start in TURNS[:turns]:
        talk.add_turn(
            turn_rows(start, prompt_len + completion_len),
            prompt_len=prompt_len,
            completion_len=completion_len,
            start=start,
        )
    return talk


def test_turns_stitch_into_one_trace_of_the_whole_conversation() -> None:
    talk = conversation(3)
    assert talk.num_turns == 3 and talk.next_start == TOKENS - 1
    assert np.array_equal(ids(talk.trace), expected_experts(DENSE_PREFIX, ROUTES, TOKENS, 0))


def test_a_turn_routes_the_previous_final_token() -> None:
    talk = conversation(1)
    assert talk.next_start == 6 and (ids(talk.trace)[6] == NO_ROUTE).all()
    conversation_so_far = conversation(2).trace
    assert ids(conversation_so_far)[6].tolist() == ROUTES[6].tolist()
    assert (ids(conversation_so_far)[11] == NO_ROUTE).all()


def test_a_turn_may_send_held_rows_again_when_they_agree() -> None:
    talk = conversation(1)
    talk.add_turn(turn_rows(0, 12), prompt_len=10, completion_len=2, start=0)
    assert np.array_equal(ids(talk.trace), expected_experts(DENSE_PREFIX, ROUTES[:11], 12, 0))


def test_the_same_experts_in_another_column_order_agree() -> None:
    talk = conversation(1)
    reordered = ROUTES.copy()
    reordered[:6] = reordered[:6, :, ::-1]
    talk.add_turn(turn_rows(2, 12, reordered), prompt_len=10, completion_len=2, start=2)
    # The conversation keeps the order it saw first.
    assert ids(talk.trace)[:11].tolist() == ROUTES[:11].tolist()


def test_a_turn_starting_after_the_held_rows_leaves_a_gap() -> None:
    talk = conversation(1)
    with pytest.raises(
        TraceError,
        match=r"^sglang sequence 2, turn 1 starts at row 7, but the conversation holds routes up to row 5 and row 6 \(the previous final token\) has none yet: row 6 would be left without routes\. .*from start 6 or earlier",
    ):
        talk.add_turn(turn_rows(7, 12), prompt_len=10, completion_len=2, start=7)


def test_a_resent_row_routed_differently_is_refused() -> None:
    talk = conversation(1)
    changed = ROUTES.copy()
    changed[4, 1] = [15, 14, 13, 12]  # routed layer 3 is slot 1
    with pytest.raises(
        TraceError,
        match=r"turn 1 routes row 4, layer 3 to experts \[15, 14, 13, 12\] but the conversation already holds \[.*\] there \(1 of 16 re-sent \(row, layer\) routes differ\).*overwrite=True",
    ):
        talk.add_turn(turn_rows(2, 12, changed), prompt_len=10, completion_len=2, start=2)


def test_overwrite_keeps_the_newer_turns_routes() -> None:
    talk = conversation(1)
    changed = ROUTES.copy()
    changed[4, 1] = [15, 14, 13, 12]
    talk.add_turn(
        turn_rows(2, 12, changed), prompt_len=10, completion_len=2, start=2, overwrite=True
    )
    assert ids(talk.trace)[4, 1].tolist() == [15, 14, 13, 12]
    assert ids(talk.trace)[5].tolist() == ROUTES[5].tolist()


def test_a_prompt_shorter_than_the_conversation_is_refused() -> None:
    talk = conversation(1)
    with pytest.raises(
        TraceError,
        match=r"turn 1: prompt_len=6 is shorter than the 7 tokens the conversation already holds",
    ):
        talk.add_turn(turn_rows(5, 8), prompt_len=6, completion_len=2, start=5)


def test_decoded_turns_stitch_through_add_trace() -> None:
    talk = Conversation(DENSE_PREFIX, "sglang")
    for prompt_len, completion_len, start in TURNS:
        meta_info = sglang_meta_info(turn_rows(start, prompt_len + completion_len))
        turn = sglang.from_meta_info(
            meta_info,
            DENSE_PREFIX,
            prompt_len=prompt_len,
            completion_len=completion_len,
            start_len=talk.next_start,
        )
        talk.add_trace(turn, start=start)
    assert talk.trace.equal(conversation(3).trace)


def test_a_turn_decoded_for_another_layout_is_refused() -> None:
    talk = conversation(1)
    other = vllm.from_completion(
        vllm_rows(MANY_EXPERTS), MANY_EXPERTS, prompt_len=PROMPT, completion_len=COMPLETION
    )
    with pytest.raises(TraceError, match=r"a turn is a trace \[tokens, 4 routed layers, top_k=4\]"):
        talk.add_trace(other, start=6)


def test_an_empty_conversation_has_no_trace() -> None:
    with pytest.raises(TraceError, match="the conversation has no turns yet"):
        Conversation(DENSE_PREFIX, "vllm").trace  # noqa: B018


# -- round trips ------------------------------------------------------------------------


@st.composite
def sequences(draw: st.DrawFn) -> tuple[MoELayout, RoutingTrace, int, int, int]:
    """A layout, the true trace of one sequence, prompt_len, completion_len and start."""
    layout = draw(st.sampled_from([DENSE_PREFIX, MANY_EXPERTS]))
    prompt_len = draw(st.integers(1, 12))
    completion_len = draw(st.integers(1, 12))
    start = draw(st.integers(0, prompt_len))
    tokens = prompt_len + completion_len
    routed = routed_ids(layout, tokens - 1 - start, seed=draw(st.integers(0, 2**16)))
    trace = RoutingTrace(
        expected_experts(layout, routed, tokens, start), layout.moe_layers, layout.num_experts
    )
    return layout, trace, prompt_len, completion_len, start


def engine_rows(layout: MoELayout, trace: RoutingTrace, start: int) -> np.ndarray:
    """encode: the rows an engine returns for `trace`, all layers, in vLLM's dtype."""
    full = trace.to_all_layers(layout).numpy()
    return full[start : trace.num_rows - 1].astype(vllm_dtype(layout))


@given(sequences())
def test_vllm_offline_round_trip(case: tuple[MoELayout, RoutingTrace, int, int, int]) -> None:
    layout, trace, prompt_len, completion_len, start = case
    decoded = vllm.from_completion(
        engine_rows(layout, trace, start),
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        prompt_start=start,
    )
    assert decoded.equal(trace)


@given(sequences(), st.booleans())
def test_vllm_openai_round_trip(
    case: tuple[MoELayout, RoutingTrace, int, int, int], split: bool
) -> None:
    layout, trace, prompt_len, completion_len, start = case
    rows = engine_rows(layout, trace, start)
    prompt_rows = prompt_len - start
    if split and start == 0:  # vLLM 0.21.0: the prompt's rows at the response level
        choice = {"routed_experts": rows[prompt_rows:].tolist() or None}
        prompt_routed_experts = rows[:prompt_rows].tolist()
    else:
        choice, prompt_routed_experts = {"routed_experts": npy_base64(rows)}, None
    decoded = vllm.from_openai_choice(
        choice,
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        prompt_start=start,
        prompt_routed_experts=prompt_routed_experts,
    )
    assert decoded.equal(trace)


@given(sequences())
def test_sglang_round_trip(case: tuple[MoELayout, RoutingTrace, int, int, int]) -> None:
    layout, trace, prompt_len, completion_len, start = case
    decoded = sglang.from_meta_info(
        sglang_meta_info(engine_rows(layout, trace, start)),
        layout,
        prompt_len=prompt_len,
        completion_len=completion_len,
        start_len=start,
    )
    assert decoded.equal(trace)


@given(st.data())
def test_stitched_turns_equal_the_whole_conversation(data: st.DataObject) -> None:
    """Turns with any new-token counts and any overlap rebuild the one-shot trace."""
    shapes = data.draw(
        st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5)), min_size=1, max_size=3)
    )
    tokens = sum(new + completion for new, completion in shapes) + 1
    routes = routed_ids(DENSE_PREFIX, tokens, seed=data.draw(st.integers(0, 2**16)))
    talk = Conversation(DENSE_PREFIX, "vllm")
    held = 0
    for new, completion in shapes:
        prompt_len = held + max(new, 1 if held == 0 else 0)
        start = 0 if held == 0 else data.draw(st.integers(0, talk.next_start))
        talk.add_turn(
            turn_rows(start, prompt_len + completion, routes),
            prompt_len=prompt_len,
            completion_len=completion,
            start=start,
        )
        held = prompt_len + completion
    expected = expected_experts(DENSE_PREFIX, routes[: held - 1], held, 0)
    assert np.array_equal(ids(talk.trace), expected)
