"""Crash recovery: a run killed with kill -9 never blocks its app token's pool slot.

The CLI run is killed while it holds the ``userpilot_export_<app token>`` slot (it waits for a
day lock another process holds, so the moment is deterministic); the next CLI run finds the dead
run, marks it failed, frees its slot and exports the day.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync.defs.recovery import WORKER_TAG, process_alive, recover_dead_runs, worker_tags
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import cli_env, lock_holder

pytestmark = [pytest.mark.integration, pytest.mark.faults]
REPO = Path(__file__).resolve().parents[1]
PK = last_complete_days(2)[0].isoformat()
POOL = "userpilot_export_NX_demo0001"


def _cli(env: dict):
    return [sys.executable, "-m", "userpilot_sync.cli", "sync", "--job", "demo", "--partition", PK]


def test_a_killed_cli_run_frees_its_pool_slot_for_the_next_run(tmp_path, monkeypatch):
    env = cli_env(tmp_path, events_per_day=400)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    lock = tmp_path / "staging" / "demo" / ".locks" / f"{PK}.lock"
    lock.parent.mkdir(parents=True)
    holder = lock_holder(lock, 120)
    victim = None
    try:
        victim = subprocess.Popen(_cli(env), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 120
        run = None
        with dg.DagsterInstance.get() as instance:
            while run is None:
                assert victim.poll() is None, "the CLI run ended before it could be killed"
                runs = [r for r in instance.get_runs() if WORKER_TAG in r.tags]
                run = runs[0] if runs else None
                assert time.monotonic() < deadline, "the run never reached its export step"
                time.sleep(0.2)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            holder.kill()
            holder.wait()
            assert not process_alive(victim.pid)
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
            assert run.run_id in instance.event_log_storage.get_concurrency_info(POOL).active_run_ids

        started = time.monotonic()
        again = subprocess.run(_cli(env), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        took = time.monotonic() - started
        assert again.returncode == 0, again.stderr[-3000:]
        assert "recovered from dead runs" in again.stderr and run.run_id in again.stderr
        assert took < 120
        with dg.DagsterInstance.get() as instance:
            dead = instance.get_run_by_id(run.run_id)
            assert dead.status == dg.DagsterRunStatus.FAILURE
            assert not instance.event_log_storage.get_concurrency_info(POOL).active_run_ids
            assert recover_dead_runs(instance).summary() == "no dead runs, no stale pool slots"
        manifest = tmp_path / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001" / PK / "_manifest.json"
        doc = json.loads(manifest.read_text())
        assert sum(rows_by_event_type(doc).values()) == 400 and doc["run_id"] != run.run_id
    finally:
        holder.kill()
        if victim is not None and victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)


def test_slots_of_runs_marked_failed_by_hand_are_freed(tmp_path):
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(POOL, 1)
        run = instance.create_run_for_job(dg.GraphDefinition(name="noop").to_job(), run_id=None)
        assert storage.claim_concurrency_slot(POOL, run.run_id, "demo_day").is_claimed
        instance.report_run_failed(run, message="marked failed in the UI")
        recovery = recover_dead_runs(instance, pools=[POOL])
        assert recovery.freed_slots_of == [run.run_id] and not recovery.failed_runs
        assert not storage.get_concurrency_info(POOL).active_run_ids


def test_a_re_executed_run_with_its_parents_worker_tag_is_not_failed(tmp_path):
    """Re-execution copies the parent's tags: a worker tag naming another run is never trusted."""
    with dg.instance_for_test() as instance:
        job = dg.GraphDefinition(name="noop").to_job()
        parent = instance.create_run_for_job(job)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        inherited = worker_tags(parent.run_id)[WORKER_TAG].rsplit("|", 2)[0] + f"|{dead.pid}|"
        child = instance.create_run_for_job(job, tags={WORKER_TAG: inherited})
        instance.handle_run_event(child.run_id, dg.DagsterEvent(
            event_type_value="PIPELINE_START", job_name="noop", message="started"))
        assert instance.get_run_by_id(child.run_id).status == dg.DagsterRunStatus.STARTED
        assert recover_dead_runs(instance, pools=[]).failed_runs == []
        own = instance.create_run_for_job(job)
        own_tag = worker_tags(own.run_id)[WORKER_TAG].rsplit("|", 2)[0] + f"|{dead.pid}|"
        instance.add_run_tags(own.run_id, {WORKER_TAG: own_tag})
        instance.handle_run_event(own.run_id, dg.DagsterEvent(
            event_type_value="PIPELINE_START", job_name="noop", message="started"))
        assert recover_dead_runs(instance, pools=[]).failed_runs == [own.run_id]


def test_staging_left_by_crashed_runs_is_removed_by_the_next_run(tmp_path):
    """Temp folders of dead processes and staged days no run holds go; live ones and held days stay."""
    from userpilot_sync.defs.project import build_definitions
    from userpilot_sync_tests.fixtures_core import make_job, run_sync

    staging = tmp_path / "staging" / "demo"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".staging-{dead.pid}-aaaa", f".work-{dead.pid}-bbbb", "2026-01-05", f".staging-{os.getpid()}-live",
                 "2026-01-06", ".staging-legacynopid"):
        (staging / name / "raw").mkdir(parents=True)
        (staging / name / "raw" / "00000.arrow").write_bytes(b"x" * 1000)
    held = tmp_path / "staging" / "demo" / ".locks" / "2026-01-06.lock"
    held.parent.mkdir(parents=True)
    holder = lock_holder(held, 60)
    try:
        job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 200, "seed": 1})
        defs = build_definitions([job], tmp_path / "staging")
        with dg.instance_for_test() as instance:
            result = run_sync(defs, instance, PK)
            assert result.success
            warnings = [e.user_message for e in instance.all_logs(result.run_id)
                        if "crashed run left behind" in e.user_message]
        left = sorted(p.name for p in staging.iterdir())
        assert left == sorted([".locks", ".uploads", f".staging-{os.getpid()}-live", "2026-01-06", ".staging-legacynopid"])
        assert list((staging / ".uploads").iterdir()) == []  # the upload journal: no pending write left
        assert len(warnings) == 3 and all("1,000 bytes" in w for w in warnings)
    finally:
        holder.kill()
