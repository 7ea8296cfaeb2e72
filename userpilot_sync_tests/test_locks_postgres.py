"""Per-day locks in PostgreSQL (the cluster deployment's backend) against a real server.

A PostgreSQL server is started once for the module (``userpilot_sync.cluster.trial.Postgres``, in a
/tmp folder). Holders in other processes are real processes; "a worker died" is kill -9.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from userpilot_sync.cluster.trial import free_port
from userpilot_sync.locks import (
    FileLockBackend,
    LockTimeout,
    PostgresLockBackend,
    lock_key,
    partition_locks,
    psycopg2_dsn,
)
from userpilot_sync_tests.fixtures_cluster import postgres_server

pytestmark = pytest.mark.integration

HOLDER = """
import sys, time
from userpilot_sync.locks import PostgresLockBackend
backend = PostgresLockBackend(sys.argv[1])
backend.serve_run(sys.argv[2])
assert backend.try_acquire("demo", sys.argv[3], sys.argv[2]) is not None
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


def _holder(url: str, run_id: str, day: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, run_id, day], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_key_is_a_stable_signed_64_bit_number():
    key = lock_key("demo", "2026-01-01")
    assert key == lock_key("demo", "2026-01-01") and -(2 ** 63) <= key < 2 ** 63
    assert key != lock_key("demo", "2026-01-02") and key != lock_key("demo2", "2026-01-01")
    assert psycopg2_dsn("postgresql+psycopg2://u@h:5432/d") == "postgresql://u@h:5432/d"


def test_another_process_holds_the_day_until_it_is_killed(pg):
    backend = PostgresLockBackend(pg.url)
    holder = _holder(pg.url, "run-holder", "2026-01-01")
    try:
        assert backend.is_locked("demo", "2026-01-01")
        assert "run-holder" in backend.live_runs()
        waited = []
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="partition 2026-01-01: another run is exporting this partition"):
            with partition_locks(backend, "demo", ["2026-01-02", "2026-01-01"], owner="run-1", wait_s=1.0,
                                 poll_s=0.1, on_wait=waited.append):
                pass
        assert time.monotonic() - started >= 1.0 and waited == ["2026-01-01"]
        assert not backend.is_locked("demo", "2026-01-02")  # taken first (ascending), released again
    finally:
        holder.kill()
        holder.wait()
    # PostgreSQL ends a killed process's session (its socket closes) and drops its locks at once
    deadline = time.monotonic() + 10
    while backend.is_locked("demo", "2026-01-01") and time.monotonic() < deadline:
        time.sleep(0.05)
    freed_after = 10 - (deadline - time.monotonic())
    assert not backend.is_locked("demo", "2026-01-01") and "run-holder" not in backend.live_runs()
    assert freed_after < 2, freed_after
    with partition_locks(backend, "demo", ["2026-01-01"], owner="run-2", wait_s=1):
        assert backend.is_locked("demo", "2026-01-01")
    assert not backend.is_locked("demo", "2026-01-01")


def test_a_stale_lock_of_this_process_is_taken_over_and_its_late_release_is_harmless(pg):
    backend = PostgresLockBackend(pg.url)
    stale = partition_locks(backend, "demo", ["2026-02-01"], owner="run-1", wait_s=1)
    stale.__enter__()  # a step whose generator was never finalised
    with partition_locks(backend, "demo", ["2026-02-01"], owner="run-2", wait_s=1):
        stale.__exit__(None, None, None)  # finalised late, by garbage collection
        assert backend.is_locked("demo", "2026-02-01")
    assert not backend.is_locked("demo", "2026-02-01")


def test_the_session_names_the_run_it_serves(pg):
    backend = PostgresLockBackend(pg.url)
    backend.serve_run("run-a")
    assert "run-a" in backend.live_runs()
    backend.serve_run("run-b")  # the next run of this process: the earlier one has finished
    live = backend.live_runs()
    assert "run-b" in live and "run-a" not in live


def test_an_unreachable_database_is_a_clear_error():
    backend = PostgresLockBackend(f"postgresql://nobody@127.0.0.1:{free_port()}/dagster")
    with pytest.raises(Exception, match=r"the lock database at 127\.0\.0\.1:\d+ cannot be reached .* Nothing was written"):
        backend.try_acquire("demo", "2026-01-01", "run-1")


def test_the_staging_resource_picks_file_locks_on_a_sqlite_instance(tmp_path):
    import dagster as dg

    from userpilot_sync.defs.resources import StagingResource

    with dg.DagsterInstance.ephemeral() as instance:
        assert isinstance(StagingResource(root=str(tmp_path)).lock_backend(instance), FileLockBackend)
        with pytest.raises(ValueError, match="locks is 'postgres' but the Dagster instance does not store its runs"):
            StagingResource(root=str(tmp_path), locks="postgres").lock_backend(instance)
        with pytest.raises(ValueError, match="use auto, file or postgres"):
            StagingResource(root=str(tmp_path), locks="redis").lock_backend(instance)
