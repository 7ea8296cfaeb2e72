"""Moving a local (SQLite) instance to the cluster's PostgreSQL keeps fingerprints and history.

A real PostgreSQL server (``userpilot_sync.cluster.trial.Postgres``) holds the target instance
(``deploy/cluster/dagster.yaml``). The source is a local instance with exports of two days; after
``python -m userpilot_sync.cli move-history`` the target's ledger knows the destination fingerprint,
every day's files and rows, so a changed destination is refused there and a re-export is announced
as ``replacing``, exactly as on the old instance. Moving twice changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from userpilot_sync.cli import failure_messages
from userpilot_sync.cluster.trial import CLUSTER_CONFIG, Postgres
from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.ledger import Ledger
from userpilot_sync.defs.project import build_definitions
from userpilot_sync_tests.fixtures_cluster import postgres_server
from userpilot_sync_tests.fixtures_core import run_sync
from userpilot_sync_tests.fixtures_faults import (
    REPO,
    dagster_home,
    export_in_process,
    local_destination,
    sync_job_data,
    write_sync_jobs,
)

pytestmark = pytest.mark.integration

DAYS = [(date.today() - timedelta(days=i)).isoformat() for i in (4, 3)]


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


def _cluster_home(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "dagster.yaml").write_text(CLUSTER_CONFIG.read_text())
    return folder


def _cluster_env(pg: Postgres, monkeypatch) -> dict[str, str]:
    env = {**pg.env, "USERPILOT_SYNC_CELERY_BROKER": "redis://127.0.0.1:1/0",  # never contacted here
           "USERPILOT_SYNC_CELERY_BACKEND": "redis://127.0.0.1:1/0", "USERPILOT_SYNC_COMPUTE_LOGS_DIR": "/tmp"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_move_history_keeps_fingerprints_files_and_rows(pg, tmp_path, monkeypatch):
    env = _cluster_env(pg, monkeypatch)
    jobs_dir = tmp_path / "sync_jobs"
    (job,) = write_sync_jobs(jobs_dir, [sync_job_data("mover", "mv-1", local_destination(tmp_path / "exports"),
                                                      app_token="NX-move0001", events_per_day=600)])
    old_home = dagster_home(tmp_path / "old_home")
    staging = tmp_path / "staging"
    for pk in DAYS:
        export_in_process(job, old_home, staging, pk, monkeypatch)
    keys = SyncJobKeys(job)
    with dg.DagsterInstance.from_config(str(old_home)) as old:
        old_ledger = Ledger(old, keys)
        fingerprint = old_ledger.recorded_fingerprint()
        old_runs = len(old.get_runs())
        old_files = old_ledger.earlier_paths_by_day(DAYS)
        old_rows = old_ledger.rows_received(DAYS[0])
    assert fingerprint and old_runs >= 2 and all(old_files[pk] for pk in DAYS)

    new_home = _cluster_home(tmp_path / "new_home")
    cli_env = {**os.environ, **env, "DAGSTER_HOME": str(new_home),
               "USERPILOT_SYNC_JOBS_DIR": str(jobs_dir)}
    cmd = [sys.executable, "-m", "userpilot_sync.cli", "move-history", "--from", str(old_home)]
    first = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"{old_runs} run(s) copied" in first.stdout and "0 already there" in first.stdout, first.stdout
    again = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"0 run(s) copied (0 events), {old_runs} already there" in again.stdout, again.stdout

    monkeypatch.setenv("DAGSTER_HOME", str(new_home))
    # the snapshot state moves with the history: here the same folder, named as a shared one
    monkeypatch.setenv("USERPILOT_SYNC_STATE_DIR", str(staging / "_state"))
    with dg.DagsterInstance.get() as new:
        assert type(new.run_storage).__name__ == "PostgresRunStorage"
        ledger = Ledger(new, keys)
        assert len(new.get_runs()) == old_runs
        assert ledger.recorded_fingerprint() == fingerprint
        assert ledger.earlier_paths_by_day(DAYS) == old_files
        assert ledger.rows_received(DAYS[0]) == old_rows
        assert set(DAYS) <= set(new.get_dynamic_partitions(keys.partitions_name))

        # a changed destination is refused on the new instance, as on the old one
        data = job.model_dump(mode="json", exclude={"source_file"})
        data["destination"] = local_destination(tmp_path / "elsewhere")
        moved = SyncJob.model_validate(data)
        result = run_sync(build_definitions([moved], staging), new, DAYS[1], job_name="mover_sync")
        assert not result.success
        cause = " ".join(failure_messages(result))
        assert "destination" in cause and "changed" in cause, cause
        assert not (tmp_path / "elsewhere").exists()
        # the same destination: a re-export of a day exported on the old instance is a replacement
        result = run_sync(build_definitions([job], staging), new, DAYS[1], job_name="mover_sync")
        assert result.success
        logs = [e.message for e in new.all_logs(result.run_id) if e.message]
        assert any(f"partition {DAYS[1]}: manifest set to 'replacing'" in m for m in logs), logs[-20:]
    manifest = json.loads(next((tmp_path / "exports").rglob(f"{DAYS[1]}/_manifest.json")).read_text())
    assert manifest["status"] == "complete"
    assert yaml.safe_load(CLUSTER_CONFIG.read_text())["storage"]["postgres"]


def test_move_history_refuses_while_the_source_has_runs_in_progress(pg, tmp_path, monkeypatch):
    from userpilot_sync.defs.move import MoveError, move_history

    _cluster_env(pg, monkeypatch)
    with dg.DagsterInstance.ephemeral() as source:
        source.add_run(dg.DagsterRun(job_name="demo_sync", run_id="a" * 8 + "-busy", status=dg.DagsterRunStatus.STARTED))
        with dg.DagsterInstance.ephemeral() as target:
            with pytest.raises(MoveError, match=r"1 run\(s\) of the source instance are queued or in progress"):
                move_history(source, target, [])
