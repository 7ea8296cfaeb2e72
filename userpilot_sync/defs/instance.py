"""Open the Dagster instance of ``$DAGSTER_HOME`` safely when several processes start at once.

Why: on an empty ``DAGSTER_HOME`` (only ``dagster.yaml``) the first ``dg.DagsterInstance.get()``
creates the SQLite storages, and Dagster 1.13's SQLite storages do that without any inter-process
lock (the ``_alembic_lock`` in ``dagster/_core/storage/sql.py`` around ``stamp_alembic_rev`` and
``check_alembic_revision`` is a ``threading.Lock``: one process only). Each storage runs, per
database, "read the alembic revision; if there is none: ``create_all`` the tables, then
``stamp_alembic_rev``", in separate statements:

- ``SqliteRunStorage.from_local`` (``runs/sqlite/sqlite_run_storage.py``, ``history/runs.db``),
  ``SqliteScheduleStorage.from_local`` (``schedules/sqlite/sqlite_schedule_storage.py``,
  ``schedules/schedules.db``) and ``SqliteEventLogStorage._initdb`` (``event_log/sqlite/
  sqlite_event_log.py``, the index shard ``history/runs/index.db``): a process that finds the
  tables already created by another one but no revision yet takes the database for one created by
  an older Dagster and stamps ``LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION`` while the creator
  stamps ``head``. ``alembic_version`` then holds two rows, and every later open of the instance
  fails in ``check_alembic_revision`` ("Version table 'alembic_version' has more than one head
  present") until the database is repaired by hand. Other interleavings crash the racing process
  ("Online migration expected to match one row when updating ...", "table ... already exists";
  only the event log's ``_initdb`` retries a few of these, the run and schedule storages do not).
- ``SqliteEventLogStorage.__init__`` initialises (and reindexes) the index shard only if
  ``index.db`` does not exist yet, so a process that sees the file another one has just created
  skips the initialisation and may query tables that do not exist yet.
- ``SqliteRunStorage.from_local`` / ``SqliteScheduleStorage.from_local`` run their data
  migrations (``migrate()``, ``optimize()``) on a new database in every racing process.

:func:`open_instance` therefore opens the instance, and makes each storage (runs, event log, schedules)
open its database, while holding an OS file lock (``flock``) on ``$DAGSTER_HOME/``
:data:`INIT_LOCK_NAME`: the first process creates and stamps the databases, the others wait and
then find them initialised. The kernel releases the lock when its holder dies. The lock is held
only while the instance opens (a few hundred milliseconds on an initialised instance, a few
seconds for a fresh one), never while runs execute. It covers the processes of this project (the
CLI); Dagster's own processes (``dagster dev``, the daemon, the webserver) do not take it, so
start them after the first CLI run, or before it and give them a few seconds (see
``docs/operations.md``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import dagster as dg

from userpilot_sync.errors import UserpilotSyncError

#: The lock file, in ``$DAGSTER_HOME``.
INIT_LOCK_NAME = ".userpilot_instance_init.lock"
#: Bounded wait for another process that is opening (initialising) the instance (seconds).
INIT_LOCK_WAIT_S = 120.0
#: A wait longer than this is announced on stderr (one line), naming the lock and DAGSTER_HOME.
NOTICE_AFTER_S = 1.0


class InstanceInitTimeout(UserpilotSyncError):
    """Another process held the instance-initialisation lock longer than the bounded wait."""


def _holder(fd: int) -> str:
    """The process id the lock's holder wrote into the lock file, as text ("" if unknown)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f"process {text}" if text.isdigit() else ""


@contextlib.contextmanager
def instance_init_lock(
    home: Path,
    *,
    wait_s: float | None = None,
    notice_after_s: float = NOTICE_AFTER_S,
    poll_s: float = 0.05,
) -> Iterator[Path]:
    """Hold the exclusive ``flock`` on ``home/``:data:`INIT_LOCK_NAME` for the ``with`` block.

    Waits up to ``wait_s`` seconds (default :data:`INIT_LOCK_WAIT_S`) for another holder; a wait
    longer than ``notice_after_s`` is announced on stderr once. Raises :class:`InstanceInitTimeout`
    naming ``DAGSTER_HOME`` and the lock file when the wait runs out. Yields the lock file's path.
    """
    import fcntl

    wait = INIT_LOCK_WAIT_S if wait_s is None else wait_s
    path = Path(home) / INIT_LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        started = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            if not announced and waited >= notice_after_s:
                holder = _holder(fd) or "another process"
                print(f"waiting for {holder} that is opening (initialising) the Dagster instance: lock "
                      f"{path} (DAGSTER_HOME={home}), at most {wait:.0f} s", file=sys.stderr, flush=True)
                announced = True
            if waited >= wait:
                holder = _holder(fd) or "another process"
                raise InstanceInitTimeout(
                    f"the Dagster instance in DAGSTER_HOME={home} could not be opened: {holder} has held its "
                    f"initialisation lock {path} for more than {wait:.0f} s. It is probably hung while "
                    f"opening the instance: stop it (find it with `fuser {path}` or `lsof {path}`), then run again. "
                    f"Nothing was run."
                )
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a waiter never names a process that no longer holds the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _initialise_storages(instance: dg.DagsterInstance) -> None:
    """Make every storage open its database now (creating and stamping it if it is new).

    ``dg.DagsterInstance.get()`` already builds the run, event log and schedule storages (with the
    default SQLite storage each one creates its database in its constructor); the event log opens
    its index shard lazily, on its first connection. One cheap read per storage finishes all of it
    under the lock, and surfaces a broken database here rather than in the middle of a run.
    """
    instance.get_run_ids(limit=1)
    instance.event_log_storage.get_concurrency_keys()
    if instance.schedule_storage is not None:
        instance.all_instigator_state()


@contextlib.contextmanager
def open_instance(wait_s: float | None = None) -> Iterator[dg.DagsterInstance]:
    """The instance of ``$DAGSTER_HOME`` (like ``with dg.DagsterInstance.get() as instance``),
    opened and initialised under the instance-initialisation lock (see the module docstring).

    The lock is released as soon as the storages are open; the instance is disposed when the
    ``with`` block ends. Raises :class:`InstanceInitTimeout` after ``wait_s`` seconds (default
    :data:`INIT_LOCK_WAIT_S`) of waiting for another process. Without a usable ``DAGSTER_HOME``
    (unset, relative, not a directory) Dagster's own error explains what is wrong. A
    ``DAGSTER_HOME`` where the lock file cannot be created (a read-only folder, e.g. with a
    database-backed ``dagster.yaml``) opens the instance without the lock, saying so on stderr.
    """
    raw = os.environ.get("DAGSTER_HOME", "")
    home = Path(os.path.expanduser(raw)) if raw else None
    with contextlib.ExitStack() as stack:
        if home is not None and home.is_absolute() and home.is_dir():
            try:
                stack.enter_context(instance_init_lock(home, wait_s=wait_s))
            except OSError as exc:  # e.g. a read-only DAGSTER_HOME (then nothing is created there anyway)
                print(f"note: cannot create the instance-initialisation lock in DAGSTER_HOME={home} ({exc}); "
                      f"opening the Dagster instance without it", file=sys.stderr)
        instance = dg.DagsterInstance.get()
        try:
            _initialise_storages(instance)
        except BaseException:
            instance.dispose()
            raise
    with instance:
        yield instance


def instance_postgres_url(instance: dg.DagsterInstance) -> str | None:
    """The SQLAlchemy URL of the PostgreSQL database the instance stores its runs in
    (dagster-postgres' ``PostgresRunStorage.postgres_url``), or None for any other storage
    (SQLite: the ``local`` deployment). The ``cluster`` deployment's per-day locks and run
    watchdog use this database (``locks.PostgresLockBackend``)."""
    try:
        storage = instance.run_storage
    except Exception:  # an instance without run storage (never in this project)
        return None
    url = getattr(storage, "postgres_url", None)
    return url if isinstance(url, str) and url.startswith("postgres") else None
