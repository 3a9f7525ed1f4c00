"""Engine fields sent as base64 text (vLLM's `.npy` bytes, SGLang's int32 ids), decoded.

Python's `base64` decodes about 0.3 GB/s, most of what ingesting a step of vLLM server
payloads costs (a 1M-token step of Qwen3-30B-A3B routes is 0.4 GB). `pybase64`
(`routereplay[fast]`), where installed, decodes the same text several times faster with
SIMD. It is stricter than the standard library (it refuses, for example, padding past
the last quantum, which `base64` accepts), so a text it refuses goes to `base64`, whose
verdict and words decide: the bytes and the errors are the standard library's either way.
"""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from routereplay.errors import TraceError

Decoder = Callable[[str | bytes], bytearray]
_standard_only = False  # set within standard_library_only()


def decode_base64(payload: Any, field: str, where: str, wire: str) -> bytes | bytearray:
    """The bytes of an engine's base64 string field (a bytearray from pybase64, which the
    caller owns and may resize: `vllm.decode_npy` adds the final token's row to it);
    `wire` says who sends what there (e.g. "SGLang sends base64 of flattened int32
    ids"), for the errors."""
    if not isinstance(payload, str | bytes):
        raise TraceError(
            f"{where}: {field} is a {type(payload).__name__}; {wire} as a string. Pass the "
            "response's JSON value unchanged."
        )
    fast = None if _standard_only else fast_decoder()
    if fast is not None:
        with contextlib.suppress(ValueError):  # the standard library decides, and says why
            return fast(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as error:
        raise TraceError(
            f"{where}: {field} is not valid base64 ({error}); {wire}. Pass the response's "
            "JSON value unchanged."
        ) from error


@functools.cache
def fast_decoder() -> Decoder | None:
    """pybase64's validating decoder (to a bytearray), or None where it is not installed."""
    try:
        import pybase64
    except ImportError:
        return None
    return functools.partial(pybase64.b64decode_as_bytearray, validate=True)


@contextlib.contextmanager
def standard_library_only() -> Iterator[None]:
    """Within: `decode_base64` decodes with Python's base64 even where pybase64 is
    installed (to compare the two; the bytes are the same)."""
    global _standard_only
    before, _standard_only = _standard_only, True
    try:
        yield
    finally:
        _standard_only = before


def first_decoder() -> Callable[[str | bytes], bytes | bytearray]:
    """The decoder `decode_base64` tries first, for a caller timing it bare (raises
    on text it refuses, without `decode_base64`'s words)."""
    fast = None if _standard_only else fast_decoder()
    return fast if fast is not None else functools.partial(base64.b64decode, validate=True)


def decoder_name() -> str:
    """Which decoder `decode_base64` uses first: "pybase64 <version>" or "base64"."""
    if _standard_only or fast_decoder() is None:
        return "base64"
    import pybase64

    return f"pybase64 {pybase64.__version__}"
