"""Pipeline ranks agree on their route checks before a schedule runs.

A rank whose routes fail its checks and raises inside the schedule leaves its peers
blocked in a send or receive until the process group times out, and the failure
report then blames the waiting rank. Checked up front and shared in one collective,
every rank fails at once, each naming the rank and the reason.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from routereplay.errors import ReplayError


def agree_on_checks(failure: Exception | None, group: Any, where: str) -> None:
    """Share this rank's check outcome over `group` (one `all_gather_object`); raise on
    every rank if any failed: this rank's own error first, else the first failed
    rank's, prefixed with `where`. Without an initialised process group, only this
    rank's."""
    if not dist.is_available() or not dist.is_initialized():
        if failure is not None:
            raise failure
        return
    outcomes: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, None if failure is None else str(failure), group=group)
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        raise ReplayError(
            f"{where}: pipeline rank {rank} of this group failed its route checks, so no "
            f"rank runs the schedule: {message}"
        )
