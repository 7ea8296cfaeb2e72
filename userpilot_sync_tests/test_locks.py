"""Per-day locks (core): bounded waits, release at the end of the block, stale holders of this process."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from userpilot_sync_tests.fixtures_core import lock_holder

from userpilot_sync.locks import FileLockBackend, LockTimeout, partition_locks


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
