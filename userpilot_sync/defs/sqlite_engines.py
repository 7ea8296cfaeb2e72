"""Keep one SQLAlchemy engine per SQLite file of Dagster's event log instead of one per connection.

Why: with SQLite instance storage (``make run``, ``make ui``, one machine), Dagster 1.13's
``SqliteEventLogStorage._connect`` creates a new SQLAlchemy ``Engine`` (``NullPool``) for every
connection it hands out and disposes of it afterwards. A new engine has an empty compiled-statement
cache and an uninitialised dialect, so every stored event compiles its INSERT and UPDATE
statements again and re-reads SQLite's settings. A run of a sync job stores ~34 events per UTC day
(materializations, planned materializations, check evaluations), and on a 31-day run of 20,000
events a day that work was ~20 % of the run's CPU in py-spy (docs/performance.md, "The backfill").

:func:`apply` replaces that one method, in the processes that load this code location (run workers,
the CLI), by one that creates the engine of a shard (the index or a run's file) once and keeps it,
the least recently used of more than :data:`MAX_ENGINES` disposed of. Nothing else changes:
connections are still not pooled (``NullPool`` opens and closes a ``sqlite3`` connection per use, as
before), the busy timeout, the storage's lock around each connection and its first-use
initialisation of a shard are Dagster's own code paths. PostgreSQL storage (``deploy/cluster``)
already keeps its engine and is not touched. It first checks that the installed Dagster still
creates an engine per connection (its ``_connect`` calls ``create_engine`` and ``dispose``) and
leaves any other Dagster alone.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from userpilot_sync.defs.pool_wait import replace_method

#: Marker on the replacement, so :func:`apply` is idempotent.
_FIXED = "_userpilot_sync_keeps_engines"
#: Engines kept per storage (shards: the index and the runs this process writes or reads).
MAX_ENGINES = 16
#: Dagster's own ``_connect``, once :func:`apply` replaced it (None before, or when left alone).
replaced = None


def _engine_for(storage, shard: str):
    """The kept engine of ``shard`` (created on first use); called with the storage's lock held."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SQLITE_BUSY_TIMEOUT_SECONDS

    engines: OrderedDict = storage.__dict__.setdefault("_userpilot_sync_engines", OrderedDict())
    engine = engines.get(shard)
    if engine is not None:
        engines.move_to_end(shard)
        return engine
    engine = create_engine(storage.conn_string_for_shard(shard), poolclass=NullPool,
                           connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    engines[shard] = engine
    while len(engines) > MAX_ENGINES:
        engines.popitem(last=False)[1].dispose()
    return engine


@contextmanager
def _connect(self, shard: str) -> Iterator:
    """Dagster's ``SqliteEventLogStorage._connect`` with the shard's engine kept between calls."""
    import dagster._check as check

    with self._db_lock:
        check.str_param(shard, "shard")
        engine = _engine_for(self, shard)
        if shard not in self._initialized_dbs:
            self._initdb(engine)
            self._initialized_dbs.add(shard)
        with engine.connect() as conn:
            with conn.begin():
                yield conn


setattr(_connect, _FIXED, True)


def creates_engine_per_connection(cls=None) -> bool:
    """True when ``cls`` (Dagster's ``SqliteEventLogStorage`` by default) builds and disposes of an
    engine inside ``_connect``, the code this module replaces."""
    if cls is None:
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage as cls
    method = getattr(cls._connect, "__wrapped__", cls._connect)
    names = set(getattr(getattr(method, "__code__", None), "co_names", ()))
    return {"create_engine", "dispose", "_initdb", "_initialized_dbs", "_db_lock"} <= names


def apply() -> bool:
    """Install the kept engines if the installed Dagster creates one per connection. Returns True
    when installed by this call; False when it already was, or Dagster's code is not the one this
    replaces (then nothing is changed)."""
    try:
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import (  # noqa: F401
            SQLITE_BUSY_TIMEOUT_SECONDS,
            SqliteEventLogStorage,
        )
    except ImportError:  # pragma: no cover - a Dagster that reorganised its storage
        return False
    original = SqliteEventLogStorage._connect
    if not replace_method(SqliteEventLogStorage, "_connect", _connect, _FIXED, creates_engine_per_connection):
        return False
    global replaced
    replaced = original
    return True
