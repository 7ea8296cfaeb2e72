"""Core fixtures: a sync job built from the demo YAML, temporary folders, a fixed clock."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from userpilot_sync.config.model import SyncJob

#: A fixed "now" used by tests: the partition DAY is inside the 365-day window.
NOW = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc)
DAY = date(2026, 3, 9)
PARTITION = DAY.isoformat()


def make_job(tmp_path: Path, **overrides) -> SyncJob:
    """A demo sync job writing to ``tmp_path/exports`` (small volume, fast)."""
    data = {
        "name": "demo",
        "sync_id": "10001",
        "title": "Demo",
        "app_token": "NX-demo0001",
        "source": {"kind": "demo", "events_per_day": 3000, "seed": 7},
        "destination": {"kind": "local", "path": str(tmp_path / "exports"), "prefix": "userpilot_events"},
    }
    data.update(overrides)
    return SyncJob.model_validate(data)


@pytest.fixture
def demo_job(tmp_path: Path) -> SyncJob:
    return make_job(tmp_path)


@pytest.fixture
def staging_root(tmp_path: Path) -> Path:
    return tmp_path / "staging"


def run_sync(defs, instance, first: str, last: str | None = None, *, job_name: str = "demo_sync", **kwargs):
    """Run a sync job's asset job for one day (``first``) or a range of days (``first``..``last``).

    Makes sure the days exist as partitions first (the partition-window sensor does this in a
    deployment). Returns the execution result (``raise_on_error=False``).
    """
    import dagster as dg

    from userpilot_sync.defs.keys import SyncJobKeys
    from userpilot_sync.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, sync_window_partitions

    job_def = defs.resolve_job_def(job_name)
    sync_job = _sync_job_of(defs, job_name)
    sync_window_partitions(instance, SyncJobKeys(sync_job))
    tags = dict(kwargs.pop("tags", {}) or {})
    if last is None or last == first:
        return job_def.execute_in_process(partition_key=first, instance=instance, raise_on_error=False, tags=tags,
                                          **kwargs)
    tags.update({RANGE_START_TAG: first, RANGE_END_TAG: last})
    return job_def.execute_in_process(instance=instance, raise_on_error=False, tags=tags, **kwargs)


def _sync_job_of(defs, job_name: str):
    """The SyncJob behind ``<name>_sync`` (read from its source resource)."""
    name = job_name.removesuffix("_sync")
    resource = defs.resources[f"userpilot_source_{name}"]
    return resource.job


def cli_env(tmp_path: Path, events_per_day: int = 500) -> dict[str, str]:
    """Environment for running the project's commands in a subprocess: a fresh ``DAGSTER_HOME``
    (``deploy/dagster.yaml``), the shipped demo sync job writing to ``tmp_path/exports`` with
    ``events_per_day`` events, staging under ``tmp_path/staging``."""
    import os

    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((repo / "deploy" / "dagster.yaml").read_text())
    jobs = tmp_path / "sync_jobs"
    jobs.mkdir()
    demo = (repo / "sync_jobs" / "demo.yaml").read_text().replace("path: exports", f"path: {tmp_path / 'exports'}")
    # a few hundred events a day leave some event types empty on some days: normal here, so a WARN
    # (the shipped 5,000 events a day never do)
    (jobs / "demo.yaml").write_text(demo.replace("events_per_day: 5000", f"events_per_day: {events_per_day}")
                                    + "checks: {empty_days: warn}\n")
    return dict(os.environ, DAGSTER_HOME=str(home), USERPILOT_SYNC_JOBS_DIR=str(jobs),
                USERPILOT_SYNC_STAGING_DIR=str(tmp_path / "staging"))


def check_evaluations(instance, key, name: str) -> dict:
    """The newest evaluation of check ``name`` of asset ``key`` per day (planned-but-not-evaluated
    records are skipped): ``{partition: AssetCheckEvaluation}``."""
    import dagster as dg

    records = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, name), limit=100)
    newest = {}
    for record in records:  # newest first
        data = record.event.dagster_event.event_specific_data if record.event else None
        if isinstance(data, dg.AssetCheckEvaluation):
            newest.setdefault(data.partition, data)
    return newest


def lock_holder(path: Path, seconds: int = 120):
    """Another process holding an exclusive ``flock`` on ``path`` (a day lock) until killed.

    Returns the ``subprocess.Popen`` once the lock is held; kill it to release the lock (the kernel
    releases the lock of a dead process).
    """
    import subprocess
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(int(sys.argv[2]))",
         str(path), str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder
