"""`Attachment`: what framework adapters changed on a model for one controller."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Attachment:
    """The routers adapters attached (by global layer) and the changes to undo.

    Routers stay listed after `undo()`: a strict replay in which none of them asks for
    ids is an error, whether the routers were never run or were detached.
    """

    def __init__(self) -> None:
        self._routers: set[int] = set()
        self._undo: list[Callable[[], None]] = []

    @property
    def routers(self) -> frozenset[int]:
        return frozenset(self._routers)

    @property
    def changed(self) -> bool:
        """Whether a change is in place that `undo()` would undo."""
        return bool(self._undo)

    def add_router(self, layer: int) -> None:
        self._routers.add(layer)

    def limit_routers(self, layers: Iterable[int]) -> None:
        """Only global `layers` of the routers attached run in this process."""
        self._routers &= set(layers)

    def on_undo(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def undo(self) -> None:
        """Undo every change, last first."""
        while self._undo:
            self._undo.pop()()
