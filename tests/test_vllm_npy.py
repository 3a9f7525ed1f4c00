"""vLLM's base64 `.npy` payloads decode without copying their ids: np.save's header read
by one match (numpy's reader for any other), and the trace kept in the decoded buffer,
with room for the final token's row, wherever the ids already sit as a trace keeps them."""

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
)
from hypothesis import given
from hypothesis import strategies as st

from routereplay import MoELayout, RoutingTrace
from routereplay.engines import vllm
from routereplay.engines.vllm import arrays
from routereplay.errors import TraceError

ALL_ROUTED = MoELayout.from_dense_pattern([1, 1, 1], num_experts=16, top_k=4)
PROMPT, COMPLETION = 5, 4
ROWS = PROMPT + COMPLETION - 1


def numpy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    buffer = io.BytesIO(raw)
    assert np.lib.format.read_magic(buffer) == (1, 0)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
    return shape, fortran, dtype, buffer.tell()


@given(
    shape=st.lists(st.integers(0, 70_000), max_size=4).map(tuple),
    dtype=st.sampled_from(["|u1", "|i1", "<u2", ">u2", "<i4", "<i8", ">i8"]),
    fortran=st.booleans(),
)
def test_np_saves_header_reads_as_numpy_reads_it(
    shape: tuple[int, ...], dtype: str, fortran: bool
) -> None:
    # The header np.save writes for such an array, without the array's bytes.
    buffer = io.BytesIO()
    described = {"descr": dtype, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, described)
    raw = buffer.getvalue()
    head = arrays._header_bytes(raw)
    assert arrays._saved_header(head) == numpy_header(raw)


@pytest.mark.parametrize(
    "header",
    [
        "{'fortran_order': False, 'descr': '|u1', 'shape': (2, 3), }",  # other key order
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",  # not integers
        "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3)}",  # no trailing comma
    ],
)
def test_any_other_header_goes_to_numpys_reader(header: str) -> None:
    text = header.encode() + b" " * (-(len(header) + 11) % 64) + b"\n"
    head = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    assert arrays._saved_header(head) is None
    assert arrays._parsed_header(head, "routed_experts", "here")[0] == (2, 3)


@pytest.mark.parametrize(
    ("descr", "shape"),
    [
        ("<i3", "(2, 3)"),  # no such dtype
        ("<u16", "(2, 3)"),
        ("|u1", "(6)"),  # an int, not a tuple
        ("|u1", "(06,)"),  # not a Python literal
    ],
)
def test_a_header_numpy_refuses_is_refused(descr: str, shape: str) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text = header.encode() + b" " * (-(len(header) + 11) % 64) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(6)
    payload = base64.b64encode(raw).decode()
    with pytest.raises(TraceError, match=r"here: routed_experts decodes from base64 but is not"):
        arrays.decode_npy(payload, "routed_experts", "here")


@pytest.mark.parametrize("spare_rows", [0, 1])
def test_a_shape_whose_size_overflows_int64_is_refused(spare_rows: int) -> None:
    # 2**61 * 8 bytes wraps to 0 in int64: it must not match an empty payload.
    buffer = io.BytesIO()
    described = {"descr": "|u1", "fortran_order": False, "shape": (2**61, 8, 1)}
    np.lib.format.write_array_header_1_0(buffer, described)
    payload = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(TraceError, match=r"here: routed_experts's \.npy header describes"):
        arrays.decode_npy(payload, "routed_experts", "here", spare_rows=spare_rows)


def test_spare_rows_follow_the_payloads_rows_writable() -> None:
    rows = all_layers(ALL_ROUTED, routed_ids(ALL_ROUTED, ROWS))
    decoded = arrays.decode_npy(npy_base64(rows), "routed_experts", "here", spare_rows=1)
    assert decoded.shape == (ROWS + 1, *rows.shape[1:]) and decoded.flags.writeable
    assert np.array_equal(decoded[:-1], rows) and not decoded[-1].any()
    fortran = np.asfortranarray(rows)
    copied = arrays.decode_npy(npy_base64(fortran), "routed_experts", "here", spare_rows=1)
    assert np.array_equal(copied[:-1], rows) and copied.shape[0] == ROWS + 1


def test_a_scalar_payload_is_refused_where_rows_are_expected() -> None:
    with pytest.raises(TraceError, match=r"routed_experts is a \.npy scalar; vLLM sends"):
        arrays.decode_npy(npy_base64(np.array(3, np.uint8)), "routed_experts", "here", spare_rows=1)


def choice_trace(layout: MoELayout, rows: np.ndarray, prompt_start: int = 0) -> RoutingTrace:
    return vllm.from_openai_choice(
        openai_choice(rows),
        layout,
        prompt_len=PROMPT,
        completion_len=COMPLETION,
        prompt_start=prompt_start,
    )


@pytest.mark.parametrize(
    ("layout", "prompt_start", "in_place"),
    [
        (ALL_ROUTED, 0, True),  # every slot routed, uint8 ids, rows from token 0
        (ALL_ROUTED, 2, False),  # rows from token 2: the -1 rows go before them
        (DENSE_PREFIX, 0, False),  # dense slots to drop
        (MANY_EXPERTS, 0, False),  # uint16 ids, int16 trace: another width
    ],
)
def test_a_choice_decodes_to_the_same_trace_in_place_or_copied(
    layout: MoELayout, prompt_start: int, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffers = []  # the decoded buffer offered as the trace's ids, or None

    def offered(*args: object) -> np.ndarray | None:
        buffers.append(out := in_place_out(*args))
        return out

    in_place_out = arrays._in_place_out
    monkeypatch.setattr(arrays, "_in_place_out", offered)
    routed = routed_ids(layout, ROWS - prompt_start)
    trace = choice_trace(layout, all_layers(layout, routed), prompt_start)
    want = expected_experts(layout, routed, PROMPT + COMPLETION, prompt_start)
    assert np.array_equal(trace.experts.numpy(), want)
    compact = RoutingTrace(want, layout.moe_layers, layout.num_experts).experts.dtype
    assert trace.experts.dtype == compact
    (buffer,) = buffers
    assert (buffer is not None) == in_place
    if in_place:
        assert np.shares_memory(trace.experts.numpy(), buffer)


def test_an_id_of_255_in_place_is_an_id_out_of_range_not_a_missing_route() -> None:
    # As int8, 255 reads -1: the range is checked on the engine's uint8 ids first.
    rows = all_layers(ALL_ROUTED, routed_ids(ALL_ROUTED, ROWS))
    rows[3, 1] = 255
    with pytest.raises(TraceError, match=r"token 3\), layer 1, holds expert id 255"):
        choice_trace(ALL_ROUTED, rows)


def test_repeated_experts_in_place_are_refused() -> None:
    rows = all_layers(ALL_ROUTED, routed_ids(ALL_ROUTED, ROWS))
    rows[6, 2, 1] = rows[6, 2, 0]
    with pytest.raises(TraceError, match=r"token 6\), layer 2"):
        choice_trace(ALL_ROUTED, rows)


def test_out_of_another_shape_or_dtype_is_refused() -> None:
    rows = routed_ids(ALL_ROUTED, ROWS).astype(np.uint8)
    wrong = (
        np.empty((ROWS, 3, 4), np.int8),
        np.empty((ROWS + 1, 3, 4), np.int16),
        np.empty((ROWS + 1, 3, 4), ">i2"),  # torch takes no foreign byte order
        np.empty((ROWS + 1, 3, 4), np.uint8),
    )
    for out in wrong:
        with pytest.raises(TraceError, match=r"out must be a writable C-contiguous numpy array"):
            RoutingTrace.from_all_layers(rows, ALL_ROUTED, num_tokens=ROWS + 1, out=out)


def test_out_overlapping_the_rows_elsewhere_is_refused() -> None:
    buffer = np.zeros((ROWS + 2, 3, 4), np.int8)
    buffer[1:-1] = routed_ids(ALL_ROUTED, ROWS)
    shifted = buffer[1:-1].view(np.uint8)
    with pytest.raises(TraceError, match=r"out overlaps the engine rows"):
        RoutingTrace.from_all_layers(shifted, ALL_ROUTED, num_tokens=ROWS + 1, out=buffer[:-1])


def test_out_elsewhere_receives_the_rows() -> None:
    rows = routed_ids(ALL_ROUTED, ROWS).astype(np.uint8)
    out = np.full((ROWS + 1, 3, 4), 7, np.int8)
    trace = RoutingTrace.from_all_layers(rows, ALL_ROUTED, num_tokens=ROWS + 1, out=out)
    assert np.shares_memory(trace.experts.numpy(), out)
    assert np.array_equal(out[:-1], rows) and (out[-1] == -1).all()


WIDE_ROUTED = MoELayout.from_dense_pattern([1, 1, 1], num_experts=300, top_k=4)


@given(
    dtype=st.sampled_from(["<u2", ">u2", "<i2", ">i2", "|u1", "|i1"]),
    seed=st.integers(0, 2**16),
)
def test_ids_read_as_their_headers_byte_order_says(dtype: str, seed: int) -> None:
    # A big-endian payload's bytes are not the trace's native int16: copied, not viewed.
    layout = WIDE_ROUTED if np.dtype(dtype).itemsize == 2 else ALL_ROUTED
    routed = routed_ids(layout, ROWS, seed)
    trace = choice_trace(layout, routed.astype(dtype))
    assert np.array_equal(trace.experts.numpy(), expected_experts(layout, routed, ROWS + 1, 0))


def test_out_holding_big_endian_rows_in_place_is_refused() -> None:
    rows = routed_ids(WIDE_ROUTED, ROWS).astype(">u2")
    buffer = np.zeros((ROWS + 1, 3, 4), ">u2")
    buffer[:-1] = rows
    with pytest.raises(TraceError, match=r"out overlaps the engine rows"):
        RoutingTrace.from_all_layers(
            buffer[:-1], WIDE_ROUTED, num_tokens=ROWS + 1, out=buffer.view(np.int16)
        )


@pytest.mark.parametrize("version", [(4, 0), (0, 9)])
def test_a_npy_version_numpy_never_writes_is_refused(version: tuple[int, int]) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 4), np.uint8))
    raw = bytearray(buffer.getvalue())
    raw[6:8] = bytes(version)
    with pytest.raises(
        TraceError, match=rf"not a \.npy array \(it says \.npy version {version[0]}"
    ):
        arrays.decode_npy(base64.b64encode(bytes(raw)).decode(), "routed_experts", "here")
