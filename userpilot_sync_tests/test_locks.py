"""Per-day locks (core): bounded waits, release at the end of the block, stale holders of this process."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from userpilot_sync_tests.fixtures_core import lock_holder

from userpilot_sync.locks import FileLockBackend, LockTimeout, partition_locks, wait_until_free


def _locked_elsewhere(path) -> bool:
    fd = os.open(str(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_locks_are_held_for_the_block_only(tmp_path):
    backend = FileLockBackend(tmp_path)
    days = ["2026-01-02", "2026-01-01"]
    with partition_locks(backend, "demo", days, owner="run-1", wait_s=1):
        assert all(_locked_elsewhere(backend.path("demo", d)) for d in days)
    assert not any(_locked_elsewhere(backend.path("demo", d)) for d in days)


def test_a_stale_lock_of_this_process_is_taken_over_and_its_late_release_is_harmless(tmp_path):
    backend = FileLockBackend(tmp_path)
    stale = partition_locks(backend, "demo", ["2026-01-01"], owner="run-1", wait_s=1)
    stale.__enter__()  # a step whose generator was never finalised
    with partition_locks(backend, "demo", ["2026-01-01"], owner="run-2", wait_s=1):
        stale.__exit__(None, None, None)  # finalised late, by garbage collection
        assert _locked_elsewhere(backend.path("demo", "2026-01-01"))
    assert not _locked_elsewhere(backend.path("demo", "2026-01-01"))


def test_another_process_holding_the_day_makes_the_run_wait_then_refuse(tmp_path):
    backend = FileLockBackend(tmp_path)
    path = backend.path("demo", "2026-01-01")
    path.parent.mkdir(parents=True)
    holder = lock_holder(path, 30)
    try:
        waited_for = []
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="partition 2026-01-01: another run is exporting this partition; waited 1 s"):
            with partition_locks(backend, "demo", ["2026-01-01", "2026-01-02"], owner="run-1", wait_s=1.0,
                                 poll_s=0.1, on_wait=waited_for.append):
                pass
        assert time.monotonic() - started >= 1.0 and waited_for == ["2026-01-01"]
        assert not _locked_elsewhere(backend.path("demo", "2026-01-02")) if backend.path("demo", "2026-01-02").exists() else True
        holder.kill()
        holder.wait()  # the kernel releases a dead process's lock
        with partition_locks(backend, "demo", ["2026-01-01"], owner="run-2", wait_s=1):
            pass
    finally:
        holder.kill()


def test_waiting_until_days_are_free_holds_none_of_them_and_reports_what_stayed_busy(tmp_path):
    backend = FileLockBackend(tmp_path)
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    holder = lock_holder(backend.path("demo", "2026-01-02"), 30)
    try:
        waited_for = []
        started = time.monotonic()
        busy = wait_until_free(backend, "demo", days, owner="run-1:checks", wait_s=1.0, poll_s=0.1,
                               on_wait=waited_for.append)
        assert busy == ["2026-01-02"] and waited_for == ["2026-01-02"] and time.monotonic() - started >= 1.0
        assert not any(_locked_elsewhere(backend.path("demo", d)) for d in ("2026-01-01", "2026-01-03"))
        holder.kill()
        holder.wait()  # the holder's run is gone: nothing to wait for
        assert wait_until_free(backend, "demo", days, owner="run-1:checks", wait_s=1.0) == []
        assert not any(_locked_elsewhere(backend.path("demo", d)) for d in days)
    finally:
        holder.kill()


def test_kept_staging_of_a_day_another_run_still_exports_is_not_removed(tmp_path):
    from userpilot_sync.config.model import SyncJob
    from userpilot_sync.defs.resources import clean_staging

    job = SyncJob.model_validate({"name": "demo", "sync_id": "1", "app_token": "NX-1", "keep_staging_days": 1,
                                  "source": {"kind": "demo"}, "destination": {"kind": "local", "path": str(tmp_path / "out")}})
    backend = FileLockBackend(tmp_path)
    for day in ("2026-01-01", "2026-01-02", "2026-01-05"):
        (tmp_path / "demo" / day).mkdir(parents=True)
    holder = lock_holder(backend.path("demo", "2026-01-01"), 30)  # a run that freed the pool slot, still uploading
    try:
        with partition_locks(backend, "demo", ["2026-01-05"], owner="run-2", wait_s=1):
            clean_staging(tmp_path, job, ["2026-01-05"], backend=backend, owner="run-2")
        # 2026-01-02 was stale and free: removed; 2026-01-01 is still another run's: kept; ours is kept (keep 1)
        assert sorted(p.name for p in (tmp_path / "demo").glob("????-??-??")) == ["2026-01-01", "2026-01-05"]
    finally:
        holder.kill()


def test_a_run_waiting_for_one_day_of_its_range_holds_none_of_the_others(tmp_path):
    import threading

    backend = FileLockBackend(tmp_path)
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    holder = lock_holder(backend.path("demo", "2026-01-02"), 30)
    entered = threading.Event()
    waited_for: list[str] = []

    held_all: list[bool] = []

    def run():
        with partition_locks(backend, "demo", days, owner="run-1", wait_s=20, poll_s=0.1, on_wait=waited_for.append):
            held_all.append(all(_locked_elsewhere(backend.path("demo", d)) for d in days))
            entered.set()

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not waited_for:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(5):  # while it waits, the day before the busy one is free for other runs
            assert not _locked_elsewhere(backend.path("demo", "2026-01-01"))
            time.sleep(0.1)
        assert not entered.is_set() and waited_for == ["2026-01-02"]
    finally:
        holder.kill()
        holder.wait()
    worker.join(20)
    assert entered.is_set() and held_all == [True] and not any(_locked_elsewhere(backend.path("demo", d)) for d in days)
