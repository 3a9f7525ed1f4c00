"""Real multi-process torch.distributed (gloo, CPU) for tests, that never hangs.

`spawn_ranks(body, ...)` starts `world_size` processes; each joins a gloo group through
a FileStore, runs `body(rank)` (a module-level function, so it pickles) and writes its
result, or its traceback, to a folder. The parent waits up to a deadline; a rank that
raises or dies stops the others (torch's process context terminates them), a rank past
the deadline is killed, and the test fails with every rank's report.
"""

from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from routereplay.demo.megatron_ranks import supervise


def spawn_ranks(
    body: Callable[[int], Any],
    world_size: int = 2,
    *,
    timeout_s: float = 60.0,
    what: str = "ranks",
) -> list[Any]:
    """`body(rank)` on `world_size` gloo processes; the results in rank order."""
    with tempfile.TemporaryDirectory(prefix="gloo-ranks-") as tmp:
        out_dir = Path(tmp)
        context = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
            _serve_rank,
            args=(body, world_size, str(out_dir)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        failure = supervise(context, out_dir, timeout_s, poll_s=0.5)
        if failure is not None:
            pytest.fail(f"{what} failed: {failure}", pytrace=False)
        return [
            torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
        ]


def _serve_rank(rank: int, body: Callable[[int], Any], world_size: int, out_dir: str) -> None:
    """One process: join the group, run `body`, write `rank<N>.pt`, or `rank<N>.err`."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)  # the ranks share a small machine: no oversubscription
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(str(out / "store"), world_size),  # type: ignore[attr-defined]
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),  # a lost peer fails a collective, never hangs
        )
        try:
            result = body(rank)
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise  # a non-zero exit makes the parent stop the other ranks
