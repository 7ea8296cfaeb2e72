"""The app token's pool slot is held only while a run reads the source (defs/assets.py ``_PoolSlot``).

Real CLI processes on one ``DAGSTER_HOME`` with ``deploy/dagster.yaml`` (pool limit 1): a run
paused at the ``staged`` pause point (its days extracted, staged and prepared, nothing uploaded)
has given the slot back, so the app token's next runs export other days while the first still
holds its day: an earlier day to its end, the next day up to its checks, which wait for the day
before to be exported (or its run gone) because they compare with it. The first is then killed with
SIGKILL and its re-run completes the day, byte for byte the clean reference. A sync job that writes the user and company snapshots keeps
the slot until they are computed (they may read the source again and continue the run before).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_faults import (
    REPO,
    cli_sync,
    dagster_home,
    kill_worker,
    local_destination,
    project_env,
    reference_export,
    run_cli,
    sha256,
    sync_job_data,
    view_of,
    wait_for_pause,
    write_sync_jobs,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

EARLIER_DAY, DAY, NEXT_DAY = (d.isoformat() for d in last_complete_days(12)[2:5])


def _claimed(home, pool: str) -> list[str]:
    """Run ids holding a slot of ``pool`` in the instance at ``home`` (read like the UI's pool page)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        return [slot.run_id for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots]


def _freed_lines(home) -> dict[str, list[str]]:
    """Per run of the instance at ``home``: its log lines that say the pool slot was freed."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        return {run.run_id: [e.user_message for e in instance.all_logs(run.run_id)
                             if "done with the source; pool slot" in (e.user_message or "")]
                for run in instance.get_runs()}


def _paused_run(tmp_path, name: str, sync_id: str, **extra):
    """A sync job, a fresh Dagster home and a CLI run of DAY paused at ``staged``: (job, env, home, proc, pid)."""
    [job] = write_sync_jobs(tmp_path / "sync_jobs", [sync_job_data(
        name, sync_id, local_destination(tmp_path / "exports"), app_token="NX-slot0001", **extra)])
    home = dagster_home(tmp_path / "home")
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = project_env(home, tmp_path / "sync_jobs", tmp_path / "staging", pause_at=["staged"], pause_dir=pauses)
    err = tmp_path / "paused.stderr"
    with open(err, "w") as out:
        proc = subprocess.Popen(cli_sync(name, DAY), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True)
    pid = wait_for_pause(pauses, "staged", 240, alive=lambda: proc.poll() is None,
                         describe=lambda: err.read_text()[-3000:])
    assert pid == proc.pid
    return job, env, home, proc, pid


def _kill(proc, pid) -> None:
    try:
        kill_worker(pid)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_the_next_run_of_the_app_token_exports_while_a_run_past_its_extraction_still_writes(tmp_path):
    job, env, home, proc, pid = _paused_run(tmp_path, "slot_free", "31001", userpilot_files=[])
    view = view_of(job)
    follower = None
    try:
        assert _claimed(home, job.pool) == []  # freed after staging, while the run still holds its day
        # an earlier day runs to its end meanwhile; with the slot held until the paused step ended,
        # it would wait for the slot for as long as the paused run lives
        other, _ = run_cli(cli_sync(job.name, EARLIER_DAY), env, timeout=240)
        assert other.returncode == 0, other.stderr[-3000:]
        assert f"partition {EARLIER_DAY} ok" in other.stdout, other.stdout[-2000:]
        # the next day exports its files and manifest too, then waits to evaluate its checks (they
        # compare with the day before, which the paused run still holds) until that run is gone
        err = tmp_path / "next.stderr"
        with open(err, "w") as out:
            follower = subprocess.Popen(cli_sync(job.name, NEXT_DAY), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=out, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while view.check_manifest(NEXT_DAY) != "complete":
                assert follower.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, "the next day's export did not finish while the run paused"
                time.sleep(0.5)
            time.sleep(3)
            assert follower.poll() is None, "the next day's checks did not wait for the day before"
            assert proc.poll() is None, "the paused run ended"
            # the paused run said so in its log before its first upload; so did the earlier day's run
            assert sorted(len(v) for v in _freed_lines(home).values() if v) == [1, 1, 1]
        finally:
            _kill(proc, pid)
        out, _ = follower.communicate(timeout=240)
        assert follower.returncode == 0, err.read_text()[-3000:]
        assert f"partition {NEXT_DAY} ok" in out
    finally:
        _kill(proc, pid) if proc.poll() is None else None
        if follower is not None and follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()

    assert view.manifest(DAY) is None  # killed before its first upload: nothing of DAY written
    again, _ = run_cli(cli_sync(job.name, DAY), env)  # the same command again, no manual step
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recovered from dead runs: marked failed (process gone)" in again.stderr, again.stderr[-2000:]
    for pk in (EARLIER_DAY, DAY, NEXT_DAY):
        reference = reference_export(job, pk, tmp_path / f"reference_{pk}")
        assert view.check_manifest(pk) == "complete"
        assert {name: sha256(data) for name, data in view.day_files(pk).items()} == reference.hashes
    assert _claimed(home, job.pool) == []


def test_a_sync_job_with_snapshots_keeps_the_slot_until_they_are_computed(tmp_path):
    job, env, home, proc, pid = _paused_run(tmp_path, "slot_snapshots", "31002",
                                            userpilot_files=["all_users", "all_companies"])
    try:
        [holder] = _claimed(home, job.pool)  # staged, snapshots not computed yet: the slot is still held
        assert holder and yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["pools"]["default_limit"] == 1
    finally:
        _kill(proc, pid)
    again, _ = run_cli(cli_sync(job.name, DAY), env)
    assert again.returncode == 0, again.stderr[-3000:]
    freed = _freed_lines(home)
    # the killed run held the slot past its staged day (snapshots not computed): only the re-run freed it early
    [[line]] = [v for v in freed.values() if v]
    assert "pool slot of 'userpilot_export_NX_slot0001' freed" in line
    assert view_of(job).check_manifest(DAY) == "complete"
    assert _claimed(home, job.pool) == []
