"""The partial file a `TraceWriter` writes into: taken under an exclusive lock, told
apart from a dead writer's leftovers by that lock, and (durably) its rename fsynced."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import IO

from routereplay.errors import TraceFileError


def take_partial(spill_path: Path, path: Path) -> IO[bytes]:
    """Create `PATH.partial` and hold an exclusive lock on it while writing.

    A writer that died (killed, crashed) leaves its partial file behind but not its lock:
    the lock tells a stale file from a live writer's, which is never touched. Where the
    filesystem (or the platform) has no locks, an existing partial file is refused, as
    nothing can tell whether its writer lives.
    """
    if not path.parent.is_dir():
        raise TraceFileError(
            f"Cannot write {path}: the directory {path.parent} does not exist. Create it first."
        )
    for _ in range(3):
        try:
            spill = open(spill_path, "x+b")  # noqa: SIM115 (held until close or discard)
        except FileExistsError:
            _remove_if_stale(spill_path, path)
            continue
        except OSError as error:
            raise TraceFileError(f"Cannot write {path}: {error}.") from None
        try:
            locked = _lock(spill)
        except BlockingIOError:  # a stale-file check holds it this instant: ours is gone
            spill.close()
            continue
        # Locked, but is it still the file at that name? A stale-file check may have
        # removed it between our create and our lock.
        same = os.path.exists(spill_path) and os.path.samestat(
            os.fstat(spill.fileno()), os.stat(spill_path)
        )
        if same or not locked:
            return spill
        spill.close()
    raise TraceFileError(f"Cannot take {spill_path}: other writers keep taking it.")


def _lock(spill: IO[bytes]) -> bool:
    """An exclusive, non-blocking lock on `spill`; False where there are no locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        fcntl.flock(spill.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
        return False
    return True


def _remove_if_stale(spill_path: Path, path: Path) -> None:
    """Remove `spill_path` (and the writer's temporary files) if no writer holds it."""
    try:
        with open(spill_path, "rb") as held:
            try:
                locked = _lock(held)
            except BlockingIOError:
                raise TraceFileError(
                    f"{spill_path} is held by a TraceWriter that is writing {path} now; wait "
                    "for it to finish, or write another file."
                ) from None
            if not locked:
                raise TraceFileError(
                    f"{spill_path} exists, and this filesystem cannot tell whether its "
                    "writer still runs (no file locks): remove it if no TraceWriter is "
                    f"writing {path}."
                )
            # Nobody writes: an interrupted writer's leftovers, its temporary too.
            spill_path.unlink(missing_ok=True)
            for temporary in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                temporary.unlink(missing_ok=True)
    except FileNotFoundError:
        pass  # removed by its writer meanwhile


def sync_directory(directory: Path) -> None:
    """fsync `directory`, so that a rename in it survives a power loss (POSIX only:
    elsewhere a directory cannot be opened for it)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
