"""With SQLite instance storage a run keeps one engine per database file (userpilot_sync/defs/sqlite_engines.py).

Loading the code location installs it; events of many runs, of the index and of several threads
are stored and read back as with Dagster's own code, the engines kept stay bounded, and no
SQLite file is left open between uses (connections are still not pooled).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dagster as dg
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

import userpilot_sync.defs  # noqa: F401  (installs it, as loading the code location does)
from userpilot_sync.defs import sqlite_engines


def test_installed_once_and_only_over_dagsters_per_connection_engine():
    assert getattr(SqliteEventLogStorage._connect, sqlite_engines._FIXED, False)
    assert getattr(SqliteRunStorage.connect, sqlite_engines._FIXED_RUNS, False)
    assert sqlite_engines.apply() is False  # already installed by importing userpilot_sync.defs
    # what it replaced is the code it was written for: an engine created per connection
    originals = sqlite_engines.replaced
    assert set(originals) == {"SqliteEventLogStorage._connect", "SqliteRunStorage.connect"}
    assert sqlite_engines.creates_engine_per_connection(
        type("Dagster", (), {"_connect": originals["SqliteEventLogStorage._connect"]}))
    assert sqlite_engines.creates_run_engine_per_connection(
        type("Dagster", (), {"connect": originals["SqliteRunStorage.connect"]}))

    class Other:  # a Dagster that keeps its engine: left alone
        def _connect(self, shard):
            return self.engine.connect()

        def connect(self):
            return self.engine.connect()

    assert not sqlite_engines.creates_engine_per_connection(Other)
    assert not sqlite_engines.creates_run_engine_per_connection(Other)


@dg.asset
def numbers(context) -> dg.MaterializeResult:
    context.log.info("one log line")
    return dg.MaterializeResult(metadata={"n": 1})


@dg.asset_check(asset=numbers)
def numbers_positive() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


def _open_db_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(".db"):
            out.append(target)
    return out


def test_many_runs_and_threads_store_and_read_back_every_event(tmp_path: Path):
    runs = sqlite_engines.MAX_ENGINES + 6  # more run files than engines kept: some are evicted
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, SqliteEventLogStorage)
        run_ids = []
        for _ in range(runs):
            result = dg.materialize([numbers, numbers_positive], instance=instance)
            assert result.success
            run_ids.append(result.run_id)

        def runless(i: int) -> None:
            for j in range(10):
                instance.report_runless_asset_event(dg.AssetMaterialization("reported", metadata={"i": i, "j": j}))

        threads = [threading.Thread(target=runless, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        engines = storage.__dict__["_userpilot_sync_engines"]
        assert len(engines) == sqlite_engines.MAX_ENGINES
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert "_userpilot_sync_engine" in instance.run_storage.__dict__  # one engine for the runs database
        # every run's events are in its own file and in the index, as Dagster stores them
        for run_id in run_ids:
            logs = instance.all_logs(run_id)
            types = [e.dagster_event_type for e in logs if e.is_dagster_event]
            assert dg.DagsterEventType.ASSET_MATERIALIZATION in types
            assert dg.DagsterEventType.ASSET_CHECK_EVALUATION in types
            assert dg.DagsterEventType.RUN_SUCCESS in types
        assert len(instance.fetch_materializations(dg.AssetKey("numbers"), limit=100).records) == runs
        assert len(instance.fetch_materializations(dg.AssetKey("reported"), limit=100).records) == 40
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("numbers"), "numbers_positive")])
        assert check[dg.AssetCheckKey(dg.AssetKey("numbers"), "numbers_positive")].run_id == run_ids[-1]
        # the runs database: every run, its status and tags, and dynamic partitions, read back
        assert {r.run_id for r in instance.get_runs()} == set(run_ids)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in instance.get_runs())
        instance.add_dynamic_partitions("days", ["2026-01-01", "2026-01-02"])
        instance.add_run_tags(run_ids[0], {"userpilot_sync/test": "1"})
        assert instance.get_dynamic_partitions("days") == ["2026-01-01", "2026-01-02"]
        assert instance.get_run_by_id(run_ids[0]).tags["userpilot_sync/test"] == "1"
        assert _open_db_files() == []  # no connection is held between uses
