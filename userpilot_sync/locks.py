"""Per-day locks: runs of one sync job and partition never interleave.

Two runs of the same (sync job, partition) share the day's staging folder and replace the same
objects, so they must not overlap, however they were launched (UI, backfill, schedule, sensor,
CLI). The lock is taken inside the run and held only while the run exports the day
(:func:`partition_locks` is a context manager), so a run never keeps a day locked after its step
ends, and two runs can never wait on each other in a cycle: every holder is inside its export
step, days of a range are locked all or none (a run that waits for a day holds none of the
others), and the only other wait, before a run's checks (:func:`wait_until_free`), is for earlier
days than the run's own, holding none of them.

Backends (the same two methods, :class:`LockBackend`):

* :class:`FileLockBackend` (one machine, the ``local`` deployment): an OS file lock (``flock``) on
  ``<root>/<sync job>/.locks/<day>.lock``. The kernel releases it when the holding process dies
  (kill -9 included), so a crashed run never blocks the day.
* :class:`PostgresLockBackend` (runs spread over machines, the ``cluster`` deployment): a
  session-level advisory lock (``pg_try_advisory_lock``) in the PostgreSQL database of the Dagster
  instance, held by one connection per run process. PostgreSQL releases it when that connection
  ends — the process exited, was killed, or its machine vanished (after the TCP keepalive time) —
  so a dead worker never blocks a day either. The connection also names its run
  (``application_name``), which is how the run watchdog (``defs/recovery.py``) tells a run whose
  process died on another machine: a run in progress whose session is gone is dead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
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


#: ``application_name`` of the connection of a run's process: this prefix and the run id
#: (PostgreSQL keeps 63 bytes; a Dagster run id is 36).
RUN_SESSION_PREFIX = "userpilot_sync run "


def lock_key(sync_job: str, partition: str) -> int:
    """The advisory-lock key of (sync job, partition): the first 8 bytes of a BLAKE2b hash of
    ``userpilot_sync/<sync job>/<partition>``, as a signed 64-bit integer (PostgreSQL ``bigint``).
    Two different days collide with probability 2**-64 (a collision only serialises them)."""
    digest = hashlib.blake2b(f"userpilot_sync/{sync_job}/{partition}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def psycopg2_dsn(url: str) -> str:
    """A libpq connection URL from an SQLAlchemy one (``postgresql+psycopg2://`` → ``postgresql://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    return f"{scheme.split('+', 1)[0]}://{rest}"


class PostgresLockBackend:
    """Session-level advisory locks in PostgreSQL (``url``: the Dagster instance's database).

    One connection per process and database (autocommit), opened on first use and kept until the
    process exits: every lock of the process lives in that session, and PostgreSQL releases them
    all when the session ends — normally with the process, or when a killed process's socket is
    closed by its kernel, or, for a vanished machine, when TCP keepalives give up (the connection
    asks for probes after 10 s idle, every 5 s, 3 probes: about 25 s). The session's
    ``application_name`` names the run it serves (:meth:`serve_run`), for the run watchdog.

    Like :class:`FileLockBackend`, a lock this process still holds for another owner is stale and
    is taken over (advisory locks are re-entrant within a session, so the key is locked once only).
    Raises :class:`~userpilot_sync.errors.UserpilotSyncError` naming the database host when
    PostgreSQL cannot be reached.
    """

    _connections: dict[tuple[str, int], object] = {}
    #: (url, pid, lock key) -> owner, for locks held by this process (a forked child holds none).
    _held: dict[tuple[str, int, int], str] = {}
    _mutex = threading.Lock()

    def __init__(self, url: str):
        self.url = psycopg2_dsn(url)

    def _connection(self):
        import psycopg2

        key = (self.url, os.getpid())  # a forked child never shares its parent's session
        conn = self._connections.get(key)
        if conn is not None and not conn.closed:
            return conn
        if conn is not None:  # the session ended (database restarted): its locks are gone
            for held in [k for k in self._held if k[:2] == key]:
                del self._held[held]
        try:
            conn = psycopg2.connect(self.url, application_name="userpilot_sync", connect_timeout=10,
                                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        except psycopg2.Error as exc:
            host = self.url.rsplit("@", 1)[-1].split("/", 1)[0]
            raise UserpilotSyncError(
                f"the lock database at {host} cannot be reached ({' '.join(str(exc).split())}); runs of the cluster deployment "
                f"lock their days there (the Dagster instance's PostgreSQL). Check that it is up and that "
                f"this worker can reach it. Nothing was written.") from None
        conn.autocommit = True
        self._connections[key] = conn
        return conn

    def _query(self, sql: str, params: tuple = ()):
        import psycopg2

        with self._mutex:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    with conn.cursor() as cur:
                        cur.execute(sql, params)
                        return cur.fetchone()
                except (psycopg2.OperationalError, psycopg2.InterfaceError):
                    if attempt == 2 or not conn.closed:  # not a lost session: a real error
                        raise
                    # the session was lost (database restarted): its locks are gone; one new session

    def serve_run(self, run_id: str) -> None:
        """Name this process's session after run ``run_id`` (``application_name``), opening it if
        needed: from now until the process exits (or serves the next run) the run counts as alive."""
        self._query("SELECT set_config('application_name', %s, false)", (RUN_SESSION_PREFIX + run_id,))

    def try_acquire(self, sync_job: str, partition: str, owner: str = "") -> tuple[str, int, str] | None:
        key = lock_key(sync_job, partition)
        held = (self.url, os.getpid(), key)
        if held in self._held:  # this process holds it for an earlier run: stale, taken over
            self._held[held] = owner
            return self.url, key, owner
        (acquired,) = self._query("SELECT pg_try_advisory_lock(%s)", (key,))
        if not acquired:
            return None
        self._held[held] = owner
        return self.url, key, owner

    def release(self, handle: object) -> None:
        url, key, owner = handle  # type: ignore[misc]
        held = (url, os.getpid(), key)
        if self._held.get(held) != owner:  # taken over by a later run since, or session lost
            return
        del self._held[held]
        conn = self._connections.get((url, os.getpid()))
        if conn is None or conn.closed:
            return
        with self._mutex, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def is_locked(self, sync_job: str, partition: str) -> bool:
        """True when some session holds the lock of (sync job, partition) (tests, diagnostics)."""
        row = self._query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                          "AND ((classid::bigint << 32) | objid::bigint) = %s", (lock_key(sync_job, partition),))
        return bool(row and row[0])

    def live_runs(self) -> set[str]:
        """Run ids whose process has a session open in the database (:meth:`serve_run`)."""
        with self._mutex, self._connection().cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
                        (RUN_SESSION_PREFIX + "%",))
            return {name[len(RUN_SESSION_PREFIX):] for (name,) in cur.fetchall()}


def wait_until_free(
    backend: LockBackend,
    sync_job: str,
    partitions: Iterable[str],
    *,
    owner: str = "",
    wait_s: float | None = None,
    poll_s: float = 0.5,
    on_wait=None,
) -> list[str]:
    """Wait until no other run holds the lock of any of ``partitions``: each lock is taken and
    released at once, in ascending order, so the caller never holds more than one of them (it can
    never be part of a wait cycle). ``wait_s`` bounds the whole wait (default
    :data:`PARTITION_LOCK_WAIT_S`); ``on_wait(partition)`` is called once per partition waited for.
    Returns the partitions still held by another run when the wait ran out (empty: all were free)."""
    wait = PARTITION_LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    busy: list[str] = []
    for partition in sorted(set(partitions)):
        announced = False
        while True:
            handle = backend.try_acquire(sync_job, partition, owner)
            if handle is not None:
                backend.release(handle)
                break
            if not announced and on_wait is not None:
                on_wait(partition)
                announced = True
            if time.monotonic() >= deadline:
                busy.append(partition)
                break
            time.sleep(poll_s)
    return busy


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

    All or none: when one of them is held by another run, the locks taken so far are released
    again and the run waits holding none of them, then starts over. So a waiting run never holds a
    day another run may wait for (a run past its extraction waits for earlier days before its
    checks, :func:`wait_until_free`; with partial holds, two runs of overlapping ranges could wait
    on each other until a timeout).

    Waits up to ``wait_s`` seconds in all (default :data:`PARTITION_LOCK_WAIT_S`) for runs that
    hold one of them; ``on_wait(partition)`` is called once per partition waited for (to log what
    the run waits for). Raises :class:`LockTimeout` naming the sync job and partition when the wait
    runs out, holding none of the locks.
    """
    wait = PARTITION_LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    held: list[object] = []
    announced: set[str] = set()
    try:
        while True:
            blocked = None
            for partition in sorted(set(partitions)):
                handle = backend.try_acquire(sync_job, partition, owner)
                if handle is None:
                    blocked = partition
                    break
                held.append(handle)
            if blocked is None:
                break
            for handle in reversed(held):
                backend.release(handle)
            held.clear()
            if wait_until_free(backend, sync_job, [blocked], owner=owner, wait_s=max(0.0, deadline - time.monotonic()),
                               poll_s=poll_s, on_wait=None if blocked in announced else on_wait):
                raise LockTimeout(
                    f"sync job {sync_job!r}, partition {blocked}: another run is exporting this partition; "
                    f"waited {wait:.0f} s for it. Retry when that run has finished (runs of one partition never "
                    f"interleave). Nothing was written."
                )
            announced.add(blocked)
        yield
    finally:
        for handle in reversed(held):
            backend.release(handle)
