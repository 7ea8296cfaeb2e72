"""The steps of exporting one partition, and one partition end to end without Dagster.

Steps (each a function here, used by the Dagster assets in ``defs/`` and by
:func:`sync_partition`): :func:`extract_and_stage` (source -> staged days), :func:`prepare_day`
(every event type of a day filtered, de-duplicated, ordered and validated before anything
uploads), writing (``destination/writer.py``), and :func:`manifest_for` — the one builder of a
day's manifest, whatever path exported the day. Order of writes: every data file, then the
manifest.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Iterable

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.manifest import FileRecord, build_manifest, build_replacing_manifest, event_type_entry
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.documented import write_documented
from userpilot_sync.destination.writer import write_export, write_manifest
from userpilot_sync.documented.day import DocumentedFile, compute_day_files, rebuild_deltas, rows_needed
from userpilot_sync.documented.state import SnapshotStore, backend_for
from userpilot_sync.errors import ConfigError, ValidationError
from userpilot_sync.guards import DayCounts, check_accounting
from userpilot_sync.export import PreparedExport, prepare_export
from userpilot_sync.partitions import check_in_window, day_window, parse_partition
from userpilot_sync.source.base import EventSource, ExtractRequest
from userpilot_sync.source.factory import build_source
from userpilot_sync.staging import StagedDay, stage_days, temp_name


@dataclass
class PartitionResult:
    """Outcome of :func:`sync_partition`: the manifest written and its object key."""

    manifest: dict
    manifest_key: str
    files: list[FileRecord]


def extract_and_stage(job: SyncJob, days: list[date], staging_root: Path,
                      source: EventSource | None = None) -> dict[str, StagedDay]:
    """Extract [first day 00:00, last day + 1 00:00) UTC from the job's source and stage it per day.

    ``days`` are consecutive UTC days. Returns the staged days by partition key (a day that broke
    the schema while staging carries ``error``). Raises SourceError / ValidationError (one-day
    extractions) naming the sync job and partition.
    """
    source = source or build_source(job)
    start, _ = day_window(days[0])
    _, end = day_window(days[-1])
    work = Path(staging_root) / job.name / temp_name(".work")
    try:
        extraction = source.extract(
            ExtractRequest(sync_job=job.name, app_token=job.app_token, start=start, end=end,
                           event_types=job.extract_event_types, work_dir=work)
        )
        return stage_days(extraction, sync_job=job.name, days=days, root=staging_root,
                          exclude_columns=job.filters.exclude_columns)
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: Threads that prepare event types (and days) at once; default: the CPUs this process may use.
THREADS_ENV = "USERPILOT_SYNC_PREPARE_THREADS"


def prepare_threads() -> int:
    """How many exports are prepared at once: ``$USERPILOT_SYNC_PREPARE_THREADS``, else the CPUs
    this process may run on (``os.sched_getaffinity``). polars and pyarrow release the GIL while
    they filter, sort and encode, so threads use the cores; each thread holds about one group of
    ``export.VALIDATION_ROWS`` rows. Raises ConfigError on a value that is not a positive integer."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            n = int(value)
            if n < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{THREADS_ENV}={value!r}: expected a positive integer (threads)") from None
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def prepare_days(job: SyncJob, staged: Iterable[StagedDay], *, threads: int | None = None
                 ) -> dict[str, dict[str, PreparedExport] | ValidationError]:
    """Prepare every event type of each staged day (filters, duplicates, order, pandera validation,
    encoding to local part files), up to ``threads`` exports at once (default :func:`prepare_threads`).

    Returns, per partition, the prepared exports by event type in the sync job's event-type order,
    or the ValidationError that refuses the day (the day failed while staging, or the first event
    type in the sync job's order that broke the Userpilot Event Schema): a day is uploaded only if
    every event type of it prepared. Output is the same whatever the number of threads (each export
    is prepared by one thread, in order). Event types Userpilot's documented files read again keep
    their rows (``documented.day.rows_needed``). Other errors (disk, library) are raised.
    """
    staged = list(staged)
    keep = rows_needed(job)
    out: dict[str, dict[str, PreparedExport] | ValidationError] = {}
    tasks = []
    for day in staged:
        if day.error:
            out[day.partition] = ValidationError(day.error)
            continue
        for et in job.event_types:
            tasks.append((day, et))
    # largest first: the longest export starts at once and the small ones fill the other threads
    tasks.sort(key=lambda t: -t[0].rows_by_event_type.get(t[1], 0))

    def run(task):
        day, et = task
        return prepare_export(day, job, et, day.root / "prepared" / et, keep_rows=et in keep)

    n = min(threads or prepare_threads(), max(1, len(tasks)))
    results: dict[tuple[str, str], object] = {}
    if n == 1:
        for task in tasks:
            try:
                results[(task[0].partition, task[1])] = run(task)
            except ValidationError as exc:
                results[(task[0].partition, task[1])] = exc
    else:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="userpilot_sync-prepare") as pool:
            futures = {(task[0].partition, task[1]): pool.submit(run, task) for task in tasks}
            unexpected: BaseException | None = None
            for key in sorted(futures):
                try:
                    results[key] = futures[key].result()
                except ValidationError as exc:
                    results[key] = exc
                except BaseException as exc:  # noqa: BLE001 - raised after every thread finished
                    unexpected = unexpected or exc
            if unexpected is not None:
                raise unexpected
    for day in staged:
        if day.error:
            out[day.partition] = out.pop(day.partition)  # keep the days' order
            continue
        prepared: dict[str, PreparedExport] = {}
        for et in job.event_types:
            result = results[(day.partition, et)]
            if isinstance(result, ValidationError):
                out[day.partition] = result
                break
            prepared[et] = result  # type: ignore[assignment]
        else:
            out[day.partition] = prepared
    return out


def prepare_day(job: SyncJob, staged: StagedDay) -> dict[str, PreparedExport]:
    """Prepare every event type of one staged day (:func:`prepare_days`).

    Returns the prepared exports by event type, in the sync job's event-type order; each holds the
    encoded part files under ``<staged day>/prepared/<event_type>/``. Raises ValidationError
    (naming sync job, partition, event type, column and samples) when any event type breaks the
    Userpilot Event Schema, or when the day already failed while staging: the whole day is then
    refused before anything of it uploads.
    """
    result = prepare_days(job, [staged])[staged.partition]
    if isinstance(result, ValidationError):
        raise result
    return result


def day_source_facts(staged: StagedDay) -> dict:
    """The source facts of one staged day, with the day's own window.

    When one extraction covered several days (a backfill range), the extraction's window and its
    range-wide counts (``rows_outside_window``: rows the source delivered outside the extraction
    window) move under ``extraction_window``, so no range total reads as the day's figure.
    """
    start, end = day_window(parse_partition(staged.partition))
    source = dict(staged.source)
    if source.get("window_from") not in (None, start.isoformat()) or source.get("window_to") not in (None, end.isoformat()):
        source["extraction_window"] = {"from": source.get("window_from"), "to": source.get("window_to"),
                                       "rows_outside_window": staged.rows_outside_window}
    else:
        source["rows_outside_window"] = staged.rows_outside_window
    source.update(window_from=start.isoformat(), window_to=end.isoformat())
    return source


def day_counts(staged: StagedDay, prepared: dict[str, PreparedExport]) -> DayCounts:
    """What a day's preparation counted, for :func:`~userpilot_sync.guards.check_accounting`."""
    return DayCounts(
        sync_job=staged.sync_job, partition=staged.partition, rows_received=staged.rows_received,
        received_by_type=dict(staged.rows_by_event_type),
        by_event_type={et: (p.rows_staged, p.rows, p.duplicates_dropped, p.filtered_out) for et, p in prepared.items()},
    )


def manifest_for(job: SyncJob, staged: StagedDay, prepared: Iterable[PreparedExport], files: Iterable[FileRecord],
                 run_id: str, superseded: Iterable[str] = (), deleted: Iterable[str] = (),
                 documented: dict[str, DocumentedFile] | None = None) -> dict:
    """The manifest of one partition, from its staging record and its written exports.

    The one builder of manifests (the Dagster assets and :func:`sync_partition` both use it).
    ``source`` carries the source facts of the extraction; when one extraction covered several
    days (a backfill range) its window is kept as ``source.extraction_window`` and
    ``window_from``/``window_to`` are the day's own. See ``destination/manifest.py`` for the fields.
    """
    prepared = list(prepared)
    start, end = day_window(parse_partition(staged.partition))
    source = day_source_facts(staged)
    selected = {p.event_type for p in prepared}
    source.update(
        source_rows=staged.rows_received,
        duplicates_dropped=sum(p.duplicates_dropped for p in prepared),
        filtered_out=sum(p.filtered_out for p in prepared),
        not_selected=sum(n for et, n in staged.rows_by_event_type.items() if et not in selected),
        unknown_columns=staged.unknown_columns,
    )
    filters = job.settings_summary().get("filters") or {}
    entries = {p.event_type: event_type_entry(p.event_type, rows=p.rows, rows_received=p.rows_staged,
                                              duplicates_dropped=p.duplicates_dropped, filtered_out=p.filtered_out,
                                              filters=filters)
               for p in prepared}
    return build_manifest(
        sync_job=job.name, sync_id=job.sync_id, app_token=job.app_token, title=job.title,
        partition=staged.partition, window_from=start, window_to=end, run_id=run_id,
        settings=job.settings_summary(), source=source, event_types=entries, files=files,
        superseded=superseded, deleted=deleted,
        userpilot_files={name: doc.entry() for name, doc in (documented or {}).items()},
    )


def replacing_manifest_for(job: SyncJob, partition: str, run_id: str, replacing: Iterable[str]) -> dict:
    """The ``replacing`` manifest of one partition (``destination/manifest.py``): written before a
    re-export replaces any file; ``replacing`` are the paths earlier exports of the day wrote."""
    start, end = day_window(parse_partition(partition))
    return build_replacing_manifest(sync_job=job.name, sync_id=job.sync_id, app_token=job.app_token, title=job.title,
                                    partition=partition, window_from=start, window_to=end, run_id=run_id,
                                    replacing=replacing)


def sync_partition(
    job: SyncJob,
    partition: str,
    staging_root: Path,
    *,
    storage: Storage | None = None,
    source: EventSource | None = None,
    run_id: str = "local",
    now: datetime | None = None,
    replacing: Iterable[str] | None = None,
    timings: dict[str, float] | None = None,
) -> PartitionResult:
    """Export one partition of ``job``: every selected event type, then the complete manifest.

    ``replacing`` (paths an earlier export of the day wrote, ``[]`` when unknown) makes this a
    re-export: a ``replacing`` manifest is written before the first data file. Raises WindowError
    (outside the 365-day window), SourceError, ValidationError or DestinationError; on any error no
    complete manifest is written for the partition. ``timings``, when given, receives the seconds
    (wall clock) each stage took: ``extract_stage``, ``prepare`` (filter, de-duplicate, order,
    validate, encode), ``documented``, ``upload``, ``manifest``.
    """
    clock = _Stages(timings)
    day = parse_partition(partition)
    check_in_window(job.name, day, now)
    storage = storage or build_storage(job)
    staged = extract_and_stage(job, [day], staging_root, source)[partition]
    clock.lap("extract_stage")
    prepared = prepare_day(job, staged)
    check_accounting(day_counts(staged, prepared))
    clock.lap("prepare")
    documented: dict[str, DocumentedFile] = {}
    if job.userpilot_files:
        from userpilot_sync.source.lookups import lookups_for_job

        features_events = None if job.source.kind == "files" else lookups_for_job(job, ("features_events",))["features_events"]
        store = SnapshotStore(backend_for(job, staging_root), job.name, job.state.checkpoint_every_days)
        documented, _ = compute_day_files(job, staged, prepared, store=store, carried=None,
                                          features_events=features_events,
                                          lookups_note="the sync job's source (local export files) has no lookups",
                                          run_id=run_id)
    clock.lap("documented")
    if replacing is not None:
        write_manifest(replacing_manifest_for(job, partition, run_id, replacing), job, storage)
    files: list[FileRecord] = []
    for p in prepared.values():
        files.extend(write_export(p, job, storage, staged.root / "write" / p.event_type).files)
    for name, doc in documented.items():
        files.extend(write_documented(doc, job, partition, storage, staged.root / "write" / name,
                                      taken={f.path for f in files}))
    clock.lap("upload")
    manifest = manifest_for(job, staged, prepared.values(), files, run_id, documented=documented)
    key = write_manifest(manifest, job, storage)
    clock.lap("manifest")
    return PartitionResult(manifest=manifest, manifest_key=key, files=files)


class _Stages:
    """Seconds per stage of :func:`sync_partition`, into a caller's dict (or nowhere)."""

    def __init__(self, into: dict[str, float] | None):
        self.into = into
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.into is not None:
            self.into[stage] = round(self.into.get(stage, 0.0) + now - self.last, 3)
        self.last = now


def rebuild_snapshot_state(job: SyncJob, first: str, last: str, staging_root: Path, store: SnapshotStore, *,
                           run_id: str, source: EventSource | None = None) -> None:
    """Rebuild a lost snapshot state for the days ``first``..``last`` from the source's identify events.

    One extraction (``event_type[]`` = identify_user/identify_company only; the app token's one
    export job at a time still holds: the caller's step holds its pool slot), staged per day, each
    day's deltas recorded in order (``rebuilt_from_identify_events``: ``last_event_at`` of those
    days counts identify events only). Raises SourceError / ValidationError / StateError.
    """
    from datetime import timedelta

    start, end = parse_partition(first), parse_partition(last)
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    kinds = tuple(n for n in ("all_users", "all_companies") if n in job.userpilot_files)
    only = job.model_copy(update={"userpilot_files": kinds,
                                  "filters": job.filters.model_copy(update={"event_types": tuple(
                                      {"all_users": "identify_user", "all_companies": "identify_company"}[n]
                                      for n in kinds)})})
    root = Path(staging_root) / ".rebuild"
    staged = extract_and_stage(only, days, root, source)
    try:
        rebuild_deltas(only, [staged[d.isoformat()] for d in days], store, run_id=run_id)
    finally:
        shutil.rmtree(root, ignore_errors=True)
