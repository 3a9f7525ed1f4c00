"""Engine base64 fields decode to the standard library's bytes and errors, with pybase64
(routereplay[fast]) or without it."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routereplay.engines import base64_field
from routereplay.engines.base64_field import (
    decode_base64,
    decoder_name,
    fast_decoder,
    first_decoder,
    standard_library_only,
)
from routereplay.errors import TraceError

WIRE = "vLLM's server sends base64 of .npy bytes"
# Valid text, and text near it: the alphabet, padding anywhere, whitespace, a stray
# byte, a non-ASCII letter.
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NEAR_BASE64 = st.one_of(
    st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode()),
    st.text(alphabet=ALPHABET + "=", max_size=24),
    st.text(alphabet=ALPHABET + "= \n!é-_", max_size=24),
)


def standard(text: str) -> bytes | str:
    """What the standard library makes of `text`: its bytes, or its error's words."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as error:
        return str(error)


def decoded(text: str) -> bytes | str:
    try:
        return decode_base64(text, "routed_experts", "vllm sequence 3", WIRE)
    except TraceError as error:
        return str(error)


def test_the_fast_decoder_is_installed_with_the_test_extras() -> None:
    # The suite runs with routereplay[fast], so the comparisons below test pybase64.
    assert fast_decoder() is not None
    assert decoder_name().startswith("pybase64 ")


@given(NEAR_BASE64)
def test_pybase64_decodes_exactly_what_the_standard_library_does(text: str) -> None:
    want = standard(text)
    got = decoded(text)
    if isinstance(want, bytes):
        assert got == want
    else:
        assert isinstance(got, str) and f"is not valid base64 ({want})" in got


def test_padding_past_the_last_quantum_reads_as_the_standard_library_reads_it() -> None:
    # pybase64 refuses "QUJD=" and the standard library takes it: the library's verdict
    # stands, so a payload that decoded before still decodes.
    fast = fast_decoder()
    assert fast is not None
    with pytest.raises(binascii.Error):
        fast("QUJD=")
    assert decoded("QUJD=") == b"ABC"


def test_a_refused_text_names_the_field_the_sequence_and_the_standard_library_reason() -> None:
    message = decoded("QUJ")
    assert message == (
        "vllm sequence 3: routed_experts is not valid base64 (Incorrect padding); "
        f"{WIRE}. Pass the response's JSON value unchanged."
    )


def test_without_pybase64_the_standard_library_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base64_field, "fast_decoder", lambda: None)
    assert decoder_name() == "base64"
    assert decoded(base64.b64encode(b"\x00\x01\x02").decode()) == b"\x00\x01\x02"
    assert "Incorrect padding" in str(decoded("QUJ"))


@pytest.mark.parametrize("value", [None, 12, ["QUJD"], {"data": "QUJD"}])
def test_a_field_that_is_not_text_is_reported(value: object) -> None:
    with pytest.raises(TraceError, match=r"routed_experts is a \w+; vLLM's server sends"):
        decode_base64(value, "routed_experts", "vllm sequence 3", WIRE)


def test_within_standard_library_only_pybase64_is_not_used() -> None:
    with standard_library_only():
        assert decoder_name() == "base64"
        assert "Incorrect padding" in str(decoded("QUJ"))
        assert first_decoder()("QUJD") == b"ABC"
    assert decoder_name().startswith("pybase64 ")
