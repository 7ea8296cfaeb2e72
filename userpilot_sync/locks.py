"""Per-day locks: runs of one sync job and partition never interleave.

Two runs of the same (sync job, partition) share the day's staging folder and replace the same
objects, so they must not overlap, however they were launched (UI, backfill, schedule, sensor,
CLI). The lock is taken inside the run and held only while the run exports the day
(:func:`partition_locks` is a context manager), so a run never keeps a day locked after its step
ends, and two runs can never wait on each other in a cycle: every holder is inside its export
step, and days of a range are always locked in ascending order.

Backend: an OS file lock (``flock``) on ``<root>/<sync job>/.locks/<day>.lock``. The kernel
releases it when the holding process dies (kill -9 included), so a crashed run never blocks the
day. The backend is one small class (:class:`FileLockBackend`); a database-backed backend for runs
spread over several machines implements the same two methods.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from userpilot_sync.errors import UserpilotSyncError

#: Default bounded wait for another run of the same sync job and partition (seconds).
PARTITION_LOCK_WAIT_S = 1800.0


class LockTimeout(UserpilotSyncError):
    """Another run kept a (sync job, partition) lock longer than the bounded wait."""


class LockBackend(Protocol):
    def try_acquire(self, sync_job: str, partition: str, owner: str = "") -> object | None:
        """A handle if the lock was free (now held by ``owner``, a run id), else None. Never blocks."""

    def release(self, handle: object) -> None:
        """Release a lock returned by :meth:`try_acquire`."""


class FileLockBackend:
    """``flock`` locks under ``root`` (released by the kernel when the holding process exits).

    Locks are held per run (``owner``). A lock this process still holds for another run is stale
    and is taken over: runs in one process execute one after another, and a step that failed in
    Dagster's output handling may leave its generator (and the lock it holds) unfinalised until
    garbage collection.
    """

    #: Locks held by this process: lock file path -> (owner, file descriptor).
    _held: dict[str, tuple[str, int]] = {}

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sync_job: str, partition: str) -> Path:
        return self.root / sync_job / ".locks" / f"{partition}.lock"

    def try_acquire(self, sync_job: str, partition: str, owner: str = "") -> tuple[str, str] | None:
        import fcntl

        path = self.path(sync_job, partition)
        key = str(path)
        stale = self._held.pop(key, None)
        if stale is not None:
            self._unlock(stale[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._held[key] = (owner, fd)
        return key, owner

    def release(self, handle: object) -> None:
        key, owner = handle  # type: ignore[misc]
        held = self._held.get(key)
        if held is not None and held[0] == owner:  # not taken over by a later run since
            del self._held[key]
            self._unlock(held[1])

    @staticmethod
    def _unlock(fd: int) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def partition_locks(
    backend: LockBackend,
    sync_job: str,
    partitions: Iterable[str],
    *,
    owner: str = "",
    wait_s: float | None = None,
    poll_s: float = 0.5,
    on_wait=None,
) -> Iterator[None]:
    """Hold the locks of ``partitions`` (ascending order) for the ``with`` block, for ``owner``.

    Waits up to ``wait_s`` seconds in all (default :data:`PARTITION_LOCK_WAIT_S`) for runs that
    hold one of them; ``on_wait(partition)`` is called once when a wait starts (to log what the
    run waits for). Raises :class:`LockTimeout` naming the sync job and partition when the wait
    runs out; locks already taken are released again.
    """
    wait = PARTITION_LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    held: list[object] = []
    try:
        for partition in sorted(set(partitions)):
            announced = False
            while True:
                handle = backend.try_acquire(sync_job, partition, owner)
                if handle is not None:
                    held.append(handle)
                    break
                if not announced and on_wait is not None:
                    on_wait(partition)
                    announced = True
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"sync job {sync_job!r}, partition {partition}: another run is exporting this partition; "
                        f"waited {wait:.0f} s for it. Retry when that run has finished (runs of one partition never "
                        f"interleave). Nothing was written."
                    )
                time.sleep(poll_s)
        yield
    finally:
        for handle in reversed(held):
            backend.release(handle)
