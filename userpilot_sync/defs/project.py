"""Project-wide Dagster wiring: where staging lives, shared resources, all sync jobs merged."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.io_managers import StagingIOManager
from userpilot_sync.defs.sync_job import STAGING_IO_MANAGER_KEY, build_sync_job_definitions

ENV_STAGING_DIR = "USERPILOT_SYNC_STAGING_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def staging_root() -> Path:
    """``$USERPILOT_SYNC_STAGING_DIR`` if set, else ``.staging/`` in the project folder (git-ignored)."""
    return Path(os.environ.get(ENV_STAGING_DIR) or PROJECT_ROOT / ".staging")


def build_definitions(jobs: list[SyncJob], staging: Path | None = None) -> dg.Definitions:
    """Definitions of every sync job (separate groups, key prefixes, schedules and IO managers)."""
    staging = staging or staging_root()
    per_job = [build_sync_job_definitions(job, staging) for job in jobs]
    # In-process execution: on a small machine a process per step (~2 s of imports each) costs
    # more than the parallelism gains; pools are still enforced (one export job per app token).
    # The manifests follow subset materializations through their automation condition; this
    # sensor evaluates it (running by default, every 30 s, with the daemon of `make ui`).
    manifests = dg.AutomationConditionSensorDefinition(
        "userpilot_manifest_automation",
        target=dg.AssetSelection.assets(*[dg.AssetKey([job.name, "manifest"]) for job in jobs]),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Re-writes a partition's manifest after some of its exports were re-materialized without it.",
    )
    shared = dg.Definitions(
        resources={STAGING_IO_MANAGER_KEY: StagingIOManager(staging)},
        executor=dg.in_process_executor,
        sensors=[manifests] if jobs else [],
    )
    return dg.Definitions.merge(shared, *per_job)
