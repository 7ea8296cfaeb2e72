"""One partition end to end without Dagster: stage -> prepare each export -> write -> manifest.

The Dagster assets (``defs/``) run the same steps as separate assets; this function chains them
for tests, benchmarks and scripts. Order of writes: every data file, then the manifest.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.manifest import FileRecord, build_manifest
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.writer import write_export, write_manifest
from userpilot_sync.export import PreparedExport, prepare_export
from userpilot_sync.partitions import check_in_window, day_window, parse_partition
from userpilot_sync.source.base import EventSource, ExtractRequest
from userpilot_sync.source.factory import build_source
from userpilot_sync.staging import StagedDay, stage_days


@dataclass
class PartitionResult:
    """Outcome of :func:`sync_partition`: the manifest written and its object key."""

    manifest: dict
    manifest_key: str
    files: list[FileRecord]


def extract_and_stage(job: SyncJob, days: list[date], staging_root: Path, source: EventSource | None = None) -> dict[str, StagedDay]:
    """Extract [first day, last day + 1) from the job's source and stage it per day."""
    source = source or build_source(job)
    start, _ = day_window(days[0])
    _, end = day_window(days[-1])
    work = Path(staging_root) / job.name / f".work-{uuid.uuid4().hex}"
    try:
        extraction = source.extract(
            ExtractRequest(sync_job=job.name, app_token=job.app_token, start=start, end=end,
                           event_types=job.event_types, work_dir=work)
        )
        return stage_days(extraction, sync_job=job.name, days=days, root=staging_root,
                          exclude_columns=job.filters.exclude_columns)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def manifest_for(job: SyncJob, staged: StagedDay, prepared: list[PreparedExport], files: list[FileRecord],
                 run_id: str, superseded: list[str] = (), deleted: list[str] = ()) -> dict:
    """Build the manifest of a partition from its staging record and written exports."""
    start, end = day_window(parse_partition(staged.partition))
    source = dict(staged.source)
    source.update(
        source_rows=staged.rows_received,
        rows_outside_window=staged.rows_outside_window,
        duplicates_dropped=sum(p.duplicates_dropped for p in prepared),
        filtered_out=sum(p.filtered_out for p in prepared),
        unknown_columns=staged.unknown_columns,
    )
    return build_manifest(
        sync_job=job.name, sync_id=job.sync_id, app_token=job.app_token, title=job.title,
        partition=staged.partition, window_from=start, window_to=end, run_id=run_id,
        settings=job.settings_summary(), source=source,
        event_types={p.event_type: p.rows for p in prepared}, files=files,
        superseded=superseded, deleted=deleted,
    )


def sync_partition(
    job: SyncJob,
    partition: str,
    staging_root: Path,
    *,
    storage: Storage | None = None,
    source: EventSource | None = None,
    run_id: str = "local",
    now: datetime | None = None,
) -> PartitionResult:
    """Export one partition of ``job``: every selected event type, then the manifest.

    Raises WindowError (outside the 365-day window), SourceError, ValidationError or
    DestinationError; on any error no manifest is written for the partition.
    """
    day = parse_partition(partition)
    check_in_window(job.name, day, now)
    storage = storage or build_storage(job)
    staged = extract_and_stage(job, [day], staging_root, source)[partition]
    prepared: list[PreparedExport] = []
    for event_type in job.event_types:
        prepared.append(prepare_export(staged, job, event_type, staged.root / "prepared" / event_type))
    files: list[FileRecord] = []
    for p in prepared:
        files.extend(write_export(p, job, storage, staged.root / "write" / p.event_type).files)
    manifest = manifest_for(job, staged, prepared, files, run_id)
    key = write_manifest(manifest, job, storage)
    return PartitionResult(manifest=manifest, manifest_key=key, files=files)
