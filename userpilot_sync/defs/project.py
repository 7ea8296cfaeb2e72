"""Project-wide wiring: every sync job's definitions merged, resources bound, one executor.

Per sync job (``defs/keys.py`` names them): the day multi-asset and the lookups asset
(``assets.py``), the jobs (``jobs.py``), schedules and sensors (``automation.py``), and its
resources: source (API key from ``dg.EnvVar``), destination (dagster-aws / dagster-gcp
credentials) and three IO managers (exports, manifests, lookups). Shared: the staging resource
(``$USERPILOT_SYNC_STAGING_DIR`` or ``.staging/``), the partition-window sensor and the
run-recovery sensor (``recovery.py``); sync jobs that notify ``late`` get a freshness sensor
(``notifications.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.assets import build_day_assets, build_lookups_asset
from userpilot_sync.defs.automation import (
    build_initial_backfill_sensor,
    build_snapshot_sensor,
    build_partition_window_sensor,
    build_schedules,
)
from userpilot_sync.defs.io_managers import DocumentedIOManager, ExportIOManager, LookupsIOManager, ManifestIOManager
from userpilot_sync.defs.jobs import build_check_destination_job, build_lookups_job, build_preview_job, build_sync_job
from userpilot_sync.defs.keys import STAGING_RESOURCE_KEY, SyncJobKeys
from userpilot_sync.defs.partitions import partitions_def
from userpilot_sync.defs.notifications import build_freshness_sensor
from userpilot_sync.defs.recovery import build_run_recovery_sensor
from userpilot_sync.defs.resources import StagingResource, destination_resource, source_resource

ENV_STAGING_DIR = "USERPILOT_SYNC_STAGING_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def staging_root() -> Path:
    """``$USERPILOT_SYNC_STAGING_DIR`` if set, else ``.staging/`` in the project folder (git-ignored)."""
    return Path(os.environ.get(ENV_STAGING_DIR) or PROJECT_ROOT / ".staging")


def build_sync_job_definitions(job: SyncJob, staging: Path) -> dg.Definitions:
    """Every Dagster object of one sync job."""
    keys = SyncJobKeys(job)
    assets = [build_day_assets(keys, partitions_def(keys))]
    sync_job = build_sync_job(keys)
    jobs = [sync_job, build_check_destination_job(keys), build_preview_job(keys)]
    lookups_job = None
    if job.source.kind in ("demo", "export_api"):
        assets.append(build_lookups_asset(keys))
        lookups_job = build_lookups_job(keys)
        jobs.append(lookups_job)
    sensors = [build_initial_backfill_sensor(keys, sync_job)] if job.backfill_days > 0 else []
    if set(job.userpilot_files) & {"all_users", "all_companies"}:
        sensors.append(build_snapshot_sensor(keys, sync_job, staging))
    if any("late" in entry.on for entry in job.notifications):
        sensors.append(build_freshness_sensor(keys))
    destination = destination_resource(job)
    work_dir = str(staging)
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        schedules=build_schedules(keys, sync_job, lookups_job),
        sensors=sensors,
        resources={
            keys.source_resource: source_resource(job),
            keys.destination_resource: destination,
            keys.export_io_manager: ExportIOManager(destination=destination, work_dir=work_dir),
            keys.manifest_io_manager: ManifestIOManager(destination=destination, work_dir=work_dir),
            keys.documented_io_manager: DocumentedIOManager(destination=destination, work_dir=work_dir),
            keys.lookups_io_manager: LookupsIOManager(destination=destination, work_dir=work_dir),
        },
    )


def build_definitions(jobs: list[SyncJob], staging: Path | None = None) -> dg.Definitions:
    """Definitions of every sync job (separate groups, key prefixes, schedules and resources).

    In-process execution: a day is one step, and on a small machine a process per run (~2 s of
    imports) is all the parallelism needed; pools still hold one export job per app token.
    """
    staging = Path(staging or staging_root())
    shared = dg.Definitions(
        resources={STAGING_RESOURCE_KEY: StagingResource(root=str(staging))},
        executor=dg.in_process_executor,
        sensors=[build_partition_window_sensor([SyncJobKeys(j) for j in jobs]), build_run_recovery_sensor()] if jobs else [],
    )
    return dg.Definitions.merge(shared, *[build_sync_job_definitions(job, staging) for job in jobs])
