"""Two gloo worker processes for the megatron demo, that never hang.

`run_on_ranks(body, ...)` spawns `world_size` processes; each applies the demo's CPU
patches (`megatron_cpu`), joins a gloo group through a FileStore, sets up megatron's
parallel state and runs `body(rank, split)`. Rank 0 sends progress through a queue as
it goes; the parent relays it, waits up to a deadline, and returns rank 0's result. A
rank that raises or dies stops the others, and the parent raises `WorkerError` with
every rank's traceback.
"""

from __future__ import annotations

import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from routereplay.errors import RouteReplayError
from routereplay.pipeline_split import PipelineSplit

Progress = Callable[[str, int, int], None]
RankBody = Callable[[int, PipelineSplit, Progress], Any]


class WorkerError(RouteReplayError):
    """A demo worker process failed or ran past its deadline."""


def run_on_ranks(
    body: RankBody,
    split: PipelineSplit,
    *,
    progress: Progress | None = None,
    timeout_s: float = 1800.0,
    threads: int = 1,
) -> Any:
    """`body(rank, split, progress)` on `split.pp_size` processes; rank 0's result."""
    import torch
    import torch.multiprocessing as mp

    world_size = split.pp_size
    with tempfile.TemporaryDirectory(prefix="routereplay-demo-") as tmp:
        out = Path(tmp)
        events: Any = mp.get_context("spawn").Queue()
        context = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
            _serve_rank,
            args=(body, split, str(out), events, threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        failure = supervise(
            context, out, timeout_s, poll=lambda: _relay(events, progress), what="workers"
        )
        _relay(events, progress)
        if failure is not None:
            raise WorkerError(f"megatron demo workers failed: {failure}")
        return torch.load(out / "rank0.pt", weights_only=False)


def supervise(
    context: Any,
    out: Path,
    timeout_s: float,
    *,
    poll: Callable[[], None] = lambda: None,
    poll_s: float = 0.2,
    what: str = "ranks",
) -> str | None:
    """Wait for the processes of a `torch.multiprocessing` `context` until all finish,
    one raises or dies (torch's context then stops the others), or `timeout_s` passes;
    kill any left. `poll` runs between waits. None when all succeeded, else what failed
    and every rank's report: the traceback it wrote to `out/rank<N>.err`, if any."""
    deadline = time.monotonic() + timeout_s
    failure: str | None = None
    try:
        while True:
            poll()
            try:
                # A failed rank stops the others: SIGTERM, then SIGKILL after 1 s more.
                if context.join(timeout=poll_s, grace_period=1.0):
                    break
            except Exception as error:  # a rank raised or died; join names the first one
                failure = str(error)
                break
            if time.monotonic() > deadline:
                failure = f"the {what} ran past {timeout_s:.0f} s"
                break
    finally:
        for process in context.processes:  # only the processes started here
            if process.is_alive():
                process.kill()
                process.join()
    if failure is None:
        return None
    reports = [
        f"--- rank {rank} ---\n"
        + (
            path.read_text()
            if (path := out / f"rank{rank}.err").exists()
            else "no traceback (stopped while running or waiting on a peer)"
        )
        for rank in range(len(context.processes))
    ]
    return f"{failure}\n" + "\n".join(reports)


def _relay(events: Any, progress: Progress | None) -> None:
    while True:
        try:
            phase, done, total = events.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(phase, done, total)


def _serve_rank(
    rank: int, body: RankBody, split: PipelineSplit, out_dir: str, events: Any, threads: int
) -> None:
    """One worker: CPU patches, gloo, megatron's parallel state, `body`, the result."""
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    from routereplay.demo.megatron_cpu import patch_megatron_for_cpu

    out = Path(out_dir)
    try:
        # megatron-core without Transformer Engine or Apex warns on every layer.
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        torch.set_num_threads(threads)
        patch_megatron_for_cpu()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        dist.init_process_group(
            "gloo",
            store=dist.FileStore(str(out / "store"), split.pp_size),  # type: ignore[attr-defined]
            rank=rank,
            world_size=split.pp_size,
            timeout=timedelta(seconds=120),  # a lost peer fails a collective, never hangs
        )
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=1,
                pipeline_model_parallel_size=split.pp_size,
                virtual_pipeline_model_parallel_size=split.vp_size if split.vp_size > 1 else None,
            )
            model_parallel_cuda_manual_seed(1234)

            def report(phase: str, done: int, total: int) -> None:
                if rank == 0:
                    events.put((phase, done, total))

            result = body(rank, split, report)
        finally:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        if rank == 0:
            torch.save(result, out / "rank0.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise  # a non-zero exit makes the parent stop the other ranks
