"""Checks of plain values that every module shares: integers that are integers.

`int()` would turn 8.5 into 8, "12" into 12 and True into 1, silently moving routes
onto other layers or experts; these refuse all of them and name what was found.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any

from routereplay.errors import RouteReplayError


def exact_int(value: Any, name: str, error: type[RouteReplayError]) -> int:
    """`value` as an int when it is one (Python or numpy), else `error` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(f"{name} must be an integer, found {value!r} ({type(value).__name__}).")
    return int(value)


def exact_ints(values: Any, name: str, error: type[RouteReplayError]) -> tuple[int, ...]:
    """Every item of `values` as an int (see `exact_int`); a string is not a sequence of
    ids."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise error(f"{name} must be a sequence of integers, found {values!r}.")
    return tuple(exact_int(v, f"{name} item", error) for v in values)
