"""Keep one SQLAlchemy engine per SQLite file of Dagster's instance storage instead of one per connection.

Why: with SQLite instance storage (``make run``, ``make ui``, one machine), Dagster 1.13's
``SqliteEventLogStorage._connect`` creates a new SQLAlchemy ``Engine`` (``NullPool``) for every
connection it hands out and disposes of it afterwards. A new engine has an empty compiled-statement
cache and an uninitialised dialect, so every stored event compiles its INSERT and UPDATE
statements again and re-reads SQLite's settings. A run of a sync job stores ~34 events per UTC day
(materializations, planned materializations, check evaluations), and on a 31-day run of 20,000
events a day that work was ~20 % of the run's CPU in py-spy (docs/performance.md, "The backfill").

``SqliteRunStorage.connect`` does the same for the runs database (run status, tags, the dynamic
partitions every ``add_asset_metadata`` call of a partitioned asset looks up).

:func:`apply` replaces those two methods, in the processes that load this code location (run
workers, the CLI), by ones that create the engine of a file (the event log's index, a run's event
log, the runs database) once and keep it; of the event log's, the least recently used beyond
:data:`MAX_ENGINES` are disposed of. Nothing else changes:
connections are still not pooled (``NullPool`` opens and closes a ``sqlite3`` connection per use, as
before), the busy timeout, the storage's lock around each connection and its first-use
initialisation of a shard are Dagster's own code paths. PostgreSQL storage (``deploy/cluster``)
already keeps its engine and is not touched. Each is replaced only if the installed Dagster's
method still creates an engine per connection (it calls ``create_engine``); any other Dagster is
left alone.
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
#: Dagster's own methods that :func:`apply` replaced, by name (``SqliteEventLogStorage._connect``,
#: ``SqliteRunStorage.connect``).
replaced: dict[str, object] = {}
#: Marker on the run storage's replacement.
_FIXED_RUNS = "_userpilot_sync_keeps_run_engine"


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


@contextmanager
def _run_connect(self) -> Iterator:
    """Dagster's ``SqliteRunStorage.connect`` with the runs database's engine kept between calls
    (an Engine is thread-safe; ``NullPool`` gives every use its own ``sqlite3`` connection)."""
    engine = self.__dict__.get("_userpilot_sync_engine")
    if engine is None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        engine = self.__dict__.setdefault("_userpilot_sync_engine", create_engine(self._conn_string, poolclass=NullPool))
    with engine.connect() as conn:
        with conn.begin():
            yield conn


setattr(_run_connect, _FIXED_RUNS, True)


def _names(method) -> set[str]:
    method = getattr(method, "__wrapped__", method)
    return set(getattr(getattr(method, "__code__", None), "co_names", ()))


def creates_engine_per_connection(cls=None) -> bool:
    """True when ``cls`` (Dagster's ``SqliteEventLogStorage`` by default) builds and disposes of an
    engine inside ``_connect``, the code this module replaces."""
    if cls is None:
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage as cls
    return {"create_engine", "dispose", "_initdb", "_initialized_dbs", "_db_lock"} <= _names(cls._connect)


def creates_run_engine_per_connection(cls=None) -> bool:
    """True when ``cls`` (Dagster's ``SqliteRunStorage`` by default) builds an engine inside
    ``connect`` from ``_conn_string``, the code this module replaces."""
    if cls is None:
        from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage as cls
    return {"create_engine", "_conn_string"} <= _names(cls.connect)


def apply() -> bool:
    """Install the kept engines where the installed Dagster creates one per connection. Returns
    True when anything was installed by this call; False when it already was, or Dagster's code is
    not the one this replaces (then that method is left alone)."""
    try:
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
        from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
    except ImportError:  # pragma: no cover - a Dagster that reorganised its storage
        return False
    installed = False
    for cls, method, replacement, marker, needed in (
        (SqliteEventLogStorage, "_connect", _connect, _FIXED, creates_engine_per_connection),
        (SqliteRunStorage, "connect", _run_connect, _FIXED_RUNS, creates_run_engine_per_connection),
    ):
        original = getattr(cls, method, None)
        if replace_method(cls, method, replacement, marker, needed):
            replaced[f"{cls.__name__}.{method}"] = original
            installed = True
    return installed
