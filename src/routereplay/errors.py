"""The errors routereplay raises. Each message says what was expected, what was found,
where (layer, micro-batch, row) and, where it can, what to do."""

from collections.abc import Sequence


class RouteReplayError(ValueError):
    """Base class: every routereplay error is a ValueError about its input."""


class LayoutError(RouteReplayError):
    """A model configuration or pipeline split that routereplay cannot place."""


class TraceError(RouteReplayError):
    """A routing trace whose ids, shape or layers are wrong."""


class ReplayError(RouteReplayError):
    """A router in replay mode could not be given the ids it should use."""


class TraceFileError(RouteReplayError):
    """A trace file that cannot be read (damaged, truncated, foreign) or written."""


class SetupError(RouteReplayError):
    """A trainer or engine setup router replay cannot serve: an unknown replay mode, or
    a generation path that returns no routes (R3 needs the rollout's)."""


def short_ids(ids: Sequence[int]) -> str:
    """A list of layer or row ids for a message: in full when short, elided when long."""
    ids = list(ids)
    return str(ids) if len(ids) <= 12 else f"[{ids[0]}, {ids[1]}, ..., {ids[-1]}]"
