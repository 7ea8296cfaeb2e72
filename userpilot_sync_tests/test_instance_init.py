"""Concurrent first use of a new DAGSTER_HOME: the instance is created once, never raced.

Dagster's SQLite storages create and alembic-stamp their databases without an inter-process lock;
CLI commands started together on an empty DAGSTER_HOME used to crash or leave a database with two
alembic heads (``userpilot_sync/defs/instance.py`` has the details). The CLI opens the instance
under ``$DAGSTER_HOME/.userpilot_instance_init.lock``. Here the test holds that lock until four CLI
runs all wait for it (so all four open the new instance at the same moment), then releases it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync import cli
from userpilot_sync.defs import instance as instance_module
from userpilot_sync.defs.instance import INIT_LOCK_NAME, InstanceInitTimeout, instance_init_lock, open_instance
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import cli_env, lock_holder

pytestmark = [pytest.mark.integration, pytest.mark.faults]
REPO = Path(__file__).resolve().parents[1]
SYNC_FOLDER = "userpilot_datasync_10001_NX-demo0001"
EVENTS = 200
WAITING = "that is opening (initialising) the Dagster instance: lock"


def _alembic_rows(home: Path) -> dict[str, list[str]]:
    """``alembic_version`` rows of every instance database (the per-run event shards excluded)."""
    rows = {}
    for db in sorted(home.rglob("*.db")):
        rel = db.relative_to(home).as_posix()
        if rel.startswith("history/runs/") and db.name != "index.db":
            continue
        with sqlite3.connect(db) as conn:
            rows[rel] = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    return rows


def test_four_cli_runs_started_together_on_a_new_dagster_home_all_succeed(tmp_path, monkeypatch):
    env = cli_env(tmp_path, events_per_day=EVENTS)
    home = Path(env["DAGSTER_HOME"])
    days = [d.isoformat() for d in last_complete_days(5)]
    lock = home / INIT_LOCK_NAME
    holder = lock_holder(lock, 300)
    procs = []
    try:
        for i, day in enumerate(days[:4]):
            with (tmp_path / f"cli{i}.err").open("w") as err:  # the child keeps its own copy of the descriptor
                procs.append((subprocess.Popen(
                    [sys.executable, "-m", "userpilot_sync.cli", "sync", "--job", "demo", "--partition", day],
                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True), tmp_path / f"cli{i}.err"))
        # every run reaches the instance while it is still uninitialised, and says what it waits for
        deadline = time.monotonic() + 120
        while not all(WAITING in path.read_text() for _, path in procs):
            assert all(p.poll() is None for p, _ in procs), "a CLI run did not wait for the instance lock"
            assert time.monotonic() < deadline, "the CLI runs never waited for the instance lock"
            time.sleep(0.2)
        assert not any(home.rglob("*.db")), "the instance was opened without the lock"
        holder.kill()
        holder.wait()
        outs = [p.communicate(timeout=240)[0] for p, _ in procs]
    finally:
        holder.kill()
        for p, _ in procs:
            if p.poll() is None:
                p.kill()

    for (p, path), out, day in zip(procs, outs, days):
        err = path.read_text()
        assert p.returncode == 0, err[-3000:]
        assert f"sync job demo: partition {day} ok" in out and "sync job demo: lookups ok" in out
        waits = [line for line in err.splitlines() if WAITING in line]
        assert waits and all(str(lock) in line and f"DAGSTER_HOME={home}" in line for line in waits)
    # each database was created once: one alembic revision row, the same head everywhere
    rows = _alembic_rows(home)
    assert set(rows) == {"history/runs.db", "history/runs/index.db", "schedules/schedules.db"}
    assert all(len(v) == 1 for v in rows.values()), rows
    assert len({v[0] for v in rows.values()}) == 1, rows

    # a fifth command afterwards works on the same instance
    for name in ("DAGSTER_HOME", "USERPILOT_SYNC_JOBS_DIR", "USERPILOT_SYNC_STAGING_DIR"):
        monkeypatch.setenv(name, env[name])
    assert cli.main(["sync", "--job", "demo", "--partition", days[4]]) == 0
    assert _alembic_rows(home) == rows
    root = tmp_path / "exports" / "userpilot_events" / SYNC_FOLDER
    for day in days:
        manifest = json.loads((root / day / "_manifest.json").read_text())
        assert manifest["partition"] == day and sum(rows_by_event_type(manifest).values()) == EVENTS
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        syncs = [r for r in runs if r.job_name == "demo_sync"]
        assert sorted(r.tags["dagster/partition"] for r in syncs) == sorted(days)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert sum(r.job_name == "demo_lookups_refresh" for r in runs) == 5


def test_a_held_instance_lock_is_announced_then_the_wait_ends_with_a_clear_error(tmp_path, monkeypatch, capsys):
    env = cli_env(tmp_path, events_per_day=EVENTS)
    home = Path(env["DAGSTER_HOME"])
    for name in ("DAGSTER_HOME", "USERPILOT_SYNC_JOBS_DIR", "USERPILOT_SYNC_STAGING_DIR"):
        monkeypatch.setenv(name, env[name])
    lock = home / INIT_LOCK_NAME
    holder = lock_holder(lock, 120)
    try:
        started = time.monotonic()
        with pytest.raises(InstanceInitTimeout) as raised:
            with open_instance(wait_s=2.0):
                pytest.fail("the instance was opened while another process held its lock")
        assert 2.0 <= time.monotonic() - started < 10
        message = str(raised.value)
        assert f"DAGSTER_HOME={home}" in message and str(lock) in message and "run again" in message
        err = capsys.readouterr().err.splitlines()
        assert [line for line in err if WAITING in line] == [
            f"waiting for another process {WAITING} {lock} (DAGSTER_HOME={home}), at most 2 s"]
        assert not any(home.rglob("*.db"))  # nothing was created without the lock

        # the CLI: exit 1 with the same sentence, before any run
        monkeypatch.setattr(instance_module, "INIT_LOCK_WAIT_S", 1.0)
        assert cli.main(["sync", "--job", "demo", "--days", "1"]) == 1
        captured = capsys.readouterr()
        assert "could not be opened" in captured.err and f"DAGSTER_HOME={home}" in captured.err
        assert "partition" not in captured.out
    finally:
        holder.kill()
        holder.wait()

    # released (the holder died): the instance opens; the holder's pid is in the file only while held
    with open_instance() as instance:
        assert instance.get_runs() == []
        assert lock.read_text() == ""
    # an initialised instance: taking and releasing the free lock costs well under a millisecond
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        with instance_init_lock(home):
            pass
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[10] < 0.01
