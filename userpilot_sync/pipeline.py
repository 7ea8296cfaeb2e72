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
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Callable, Iterable

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.manifest import FileRecord, build_manifest, build_replacing_manifest, event_type_entry
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.documented import write_documented
from userpilot_sync.destination.writer import write_export, write_manifest
from userpilot_sync.documented.day import DocumentedFile, compute_day_files, rebuild_deltas, rows_needed
from userpilot_sync.documented.state import SnapshotStore, backend_for
from userpilot_sync.errors import ConfigError, ValidationError
from userpilot_sync.faults import pause_point
from userpilot_sync.guards import DayCounts, check_accounting
from userpilot_sync import export as export_module
from userpilot_sync.export import ExportPreparer, PreparedExport, prepare_export
from userpilot_sync.partitions import check_in_window, day_window, parse_partition
from userpilot_sync.source.base import EventSource, ExtractRequest
from userpilot_sync.source.factory import build_source
from userpilot_sync.staging import StagedDay, stage_days, temp_name, threads_setting, usable_cpus


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


@dataclass
class StagedAndPrepared:
    """What :func:`stage_and_prepare` returns.

    ``staged``: the staged days by partition key (in place under the staging root);
    ``prepared``: per partition, the prepared exports by event type in the sync job's event-type order,
    or the ValidationError that refuses the day (as :func:`prepare_days`); ``early_groups``: groups of
    staged hours prepared while the source was still being read; ``redone``: ``"<day>/<event type>"``
    prepared again after staging because the source delivered rows late, into hours already prepared.
    """

    staged: dict[str, StagedDay]
    prepared: dict[str, dict[str, PreparedExport] | ValidationError]
    early_groups: int = 0
    redone: list[str] = field(default_factory=list)
    #: seconds (wall clock) until the source was read and staged, and from then until every export was prepared
    staging_s: float = 0.0
    after_staging_s: float = 0.0


#: ``1`` turns early preparation on (hours prepared while the source is still read); default ``0``
#: (stage the whole range first, then prepare) until its gain is measured on an idle machine: it
#: keeps an export open while staging runs (about +100 MB of peak memory at 5M events a day).
EARLY_PREPARE_ENV = "USERPILOT_SYNC_EARLY_PREPARE"


def early_prepare_enabled() -> bool:
    """True when :data:`EARLY_PREPARE_ENV` is ``1``/``on``/``true``/``yes`` (default ``0``: off).
    Raises ConfigError for a value that is not one of those or ``0``/``off``/``false``/``no``."""
    value = os.environ.get(EARLY_PREPARE_ENV, "0").strip().lower() or "0"
    if value in {"0", "off", "false", "no"}:
        return False
    if value in {"1", "on", "true", "yes"}:
        return True
    raise ConfigError(f"{EARLY_PREPARE_ENV}={value!r}: expected 1 (prepare while staging runs) or 0 (after staging)")


class _EarlyExport:
    """State of one (day, event type) prepared while staging runs."""

    def __init__(self) -> None:
        self.preparer: ExportPreparer | None = None
        self.queue: deque = deque()  # (raw_dir, group), or None: complete, finish the export
        self.running = False
        self.void = False
        self.error: BaseException | None = None
        self.result: PreparedExport | None = None  # finished (its day was sealed while staging ran)
        self.out_dir: Path | None = None
        self.early = 0  # groups prepared before staging finished
        self.started = False  # counts as open (holds encoders and their pending rows) until done
        self.done = False  # finished, failed or void

    def discard(self) -> None:
        """Close and delete what was prepared (void, cancelled or refused)."""
        if self.preparer is not None:
            self.preparer.abort()
            self.preparer = None
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        self.result = None


class _EarlyPreparation:
    """The :class:`~userpilot_sync.staging.StagingWatch` of :func:`stage_and_prepare`: each handed
    group of staged hours is prepared on the thread pool, the groups of one (day, event type) one
    after the other, in order, by one :class:`~userpilot_sync.export.ExportPreparer`, finished (its
    part files closed) as soon as the (day, event type) is complete, so a long range keeps only the
    days in flight open."""

    def __init__(self, job: SyncJob, keep: set[str], pool: ThreadPoolExecutor, max_open: int):
        self.job = job
        self.keep = keep
        self.pool = pool
        self.max_open = max_open
        self.exclude = sorted(set(job.filters.exclude_columns))
        self.lock = threading.Condition()
        self.exports: dict[tuple[date, str], _EarlyExport] = {}
        self.tmp_roots: set[Path] = set()
        self.cancelled = False
        self.staging_done = False

    def _open(self) -> int:
        return sum(1 for state in self.exports.values() if state.started and not state.done)

    def _start(self, key: tuple[date, str], state: _EarlyExport) -> None:
        """(under the lock) Prepare the queued groups of ``key`` on the pool."""
        state.started = state.running = True
        self.pool.submit(self._drain, *key, state)

    def _start_waiting(self) -> None:
        """(under the lock) Start exports whose groups wait, while fewer than ``max_open`` are open
        (every one once staging finished), the one with most waiting groups first."""
        waiting = sorted(((key, state) for key, state in self.exports.items()
                          if not state.started and state.queue and not state.void and not self.cancelled),
                         key=lambda item: -len(item[1].queue))
        for key, state in waiting:
            if not self.staging_done and self._open() >= self.max_open:
                return
            self._start(key, state)

    def _enqueue(self, day: date, event_type: str, item) -> None:
        with self.lock:
            state = self.exports.setdefault((day, event_type), _EarlyExport())
            if state.void or state.error is not None or self.cancelled:
                return
            state.queue.append(item)
            if state.running:
                return
            if state.started:
                state.running = True
                self.pool.submit(self._drain, day, event_type, state)
            else:
                self._start_waiting()

    def group_ready(self, day: date, event_type: str, raw_dir: Path, group: list) -> None:
        if event_type in self.job.event_types:
            with self.lock:
                self.tmp_roots.add(raw_dir.parents[2])
            self._enqueue(day, event_type, (raw_dir, group))

    def complete(self, day: date, event_type: str) -> None:
        if event_type in self.job.event_types and (day, event_type) in self.exports:
            self._enqueue(day, event_type, None)

    def late(self, day: date, event_type: str) -> None:
        with self.lock:
            state = self.exports.setdefault((day, event_type), _EarlyExport())
            state.void = state.done = True
            state.queue.clear()
            if not state.running:
                state.discard()
            self._start_waiting()

    def staged(self) -> None:
        """Staging finished: every export with waiting groups starts (the pool's threads bound them)."""
        with self.lock:
            self.staging_done = True
            self._start_waiting()

    def _drain(self, day: date, event_type: str, state: _EarlyExport) -> None:
        while True:
            with self.lock:
                if self.cancelled or state.void or not state.queue:
                    if self.cancelled or state.void:
                        state.discard()
                    state.running = False
                    self.lock.notify_all()
                    return
                item = state.queue.popleft()
            try:
                if item is None:  # complete: close the parts now (source_rows is set after staging)
                    if state.preparer is not None:
                        state.result = state.preparer.finish(0)
                        state.preparer = None
                    with self.lock:
                        state.done = True
                        self._start_waiting()
                    continue
                raw_dir, group = item
                if state.preparer is None:
                    state.out_dir = raw_dir.parent.parent / "prepared" / event_type
                    state.preparer = ExportPreparer(self.job, day.isoformat(), event_type, self.exclude, raw_dir,
                                                    state.out_dir, keep_rows=event_type in self.keep)
                state.preparer.add(group)
                if not self.staging_done:
                    state.early += 1
                    pause_point("prepared_early", scope=self.job.name)  # fault-injection suite only
            except BaseException as exc:  # noqa: BLE001 - judged after staging (a late row may void it)
                with self.lock:
                    state.error = exc
                    state.done = True
                    state.preparer = None  # add() and finish() abort on errors
                    state.queue.clear()
                    state.running = False
                    self._start_waiting()
                    self.lock.notify_all()
                return

    def wait(self) -> None:
        """Until no group is being prepared."""
        with self.lock:
            while any(state.running for state in self.exports.values()):
                self.lock.wait()

    def cancel(self) -> None:
        """Stop preparing: wait for the groups in progress, then close and delete every early export."""
        with self.lock:
            self.cancelled = True
        self.wait()
        for state in self.exports.values():
            state.discard()


def stage_and_prepare(job: SyncJob, days: list[date], staging_root: Path, source: EventSource | None = None, *,
                      threads: int | None = None, on_extracted: Callable[[], None] | None = None) -> StagedAndPrepared:
    """Extract and stage ``days`` (:func:`extract_and_stage`) and prepare every event type of every
    day (:func:`prepare_days`), overlapping the two: while the source is still read, the staged hours
    it has moved past are filtered, de-duplicated, ordered, validated and encoded on the thread pool
    (``threads``, default :func:`prepare_threads`), in the same groups of hours and in the same order
    as :func:`prepare_days` — the encoded files are byte for byte the same. A source that delivers
    rows into an hour already prepared (not in time order) costs that (day, event type) a second
    preparation after staging (listed in ``redone``), never a different result.

    ``on_extracted`` is called once, with no arguments, as soon as the source has been read to its end
    and staged (before the exports are prepared): the export step frees the app token's pool slot
    there. It is not called when extraction or staging fails.

    Returns :class:`StagedAndPrepared`; errors as :func:`extract_and_stage` and :func:`prepare_days`.
    Nothing of the days is left in staging when an error is raised. Unless ``USERPILOT_SYNC_EARLY_PREPARE=1``
    (:func:`early_prepare_enabled`) the range is staged first and prepared after.
    """
    t0 = time.perf_counter()
    if not early_prepare_enabled():
        staged = extract_and_stage(job, days, staging_root, source)
        t1 = time.perf_counter()
        if on_extracted is not None:
            on_extracted()
        prepared = prepare_days(job, [staged[d.isoformat()] for d in days], threads=threads)
        return StagedAndPrepared(staged, prepared, staging_s=round(t1 - t0, 3),
                                 after_staging_s=round(time.perf_counter() - t1, 3))
    source = source or build_source(job)
    start, _ = day_window(days[0])
    _, end = day_window(days[-1])
    work = Path(staging_root) / job.name / temp_name(".work")
    keep = rows_needed(job)
    n = max(1, threads or prepare_threads())
    # while staging runs (reading, normalising on staging.stage_threads() threads, writing) at most n - 1 exports are open at once
    # (each holds its encoders' pending rows, up to a row group, and a group being validated): the others'
    # groups wait, as references, until one is complete or staging is done; then every thread prepares
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="userpilot_sync-prepare") as pool:
        early = _EarlyPreparation(job, keep, pool, max_open=max(1, n - 1))
        area = None
        try:
            extraction = source.extract(
                ExtractRequest(sync_job=job.name, app_token=job.app_token, start=start, end=end,
                               event_types=job.extract_event_types, work_dir=work)
            )
            area = stage_days(extraction, sync_job=job.name, days=days, root=staging_root,
                              exclude_columns=job.filters.exclude_columns, watch=early,
                              rows_per_group=export_module.VALIDATION_ROWS, publish=False)
            t1 = time.perf_counter()
            if on_extracted is not None:
                on_extracted()
            early.staged()
            early.wait()
            result = _finish_early(job, area.days, early, keep, pool)
        except BaseException:
            early.cancel()
            if area is not None:
                area.discard()
            for tmp in early.tmp_roots:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    tmp_paths = {pk: Path(day.path) for pk, day in area.days.items()}
    staged = area.publish()
    for pk, prepared in result.prepared.items():
        if isinstance(prepared, dict):
            final = Path(staged[pk].path)
            for et, export in prepared.items():
                export.moved(tmp_paths[pk], final, final / "prepared" / et)
    result.staged = staged
    result.staging_s = round(t1 - t0, 3)
    result.after_staging_s = round(time.perf_counter() - t1, 3)
    return result


def _finish_early(job: SyncJob, staged: dict[str, StagedDay], early: _EarlyPreparation, keep: set[str],
                  pool: ThreadPoolExecutor) -> StagedAndPrepared:
    """After staging: finish the early exports, prepare the rest (none handed early, or voided by late
    rows) from the staged files, and assemble the result as :func:`prepare_days` does."""
    futures: dict[tuple[str, str], object] = {}
    redone: list[str] = []
    early_groups = 0
    for pk, day in staged.items():
        d = parse_partition(pk)
        states = {et: early.exports.get((d, et)) for et in job.event_types}
        if day.error:
            for state in states.values():
                if state is not None:
                    state.discard()
            continue
        for et, state in states.items():
            if state is not None and state.void:
                redone.append(f"{pk}/{et}")
            if state is not None and not state.void and state.error is not None:
                early_groups += state.early
                futures[(pk, et)] = state.error
            elif state is not None and not state.void and state.result is not None:
                early_groups += state.early
                state.result.source_rows = day.rows_received
                futures[(pk, et)] = state.result
            elif state is not None and not state.void and state.preparer is not None:
                early_groups += state.early
                futures[(pk, et)] = pool.submit(state.preparer.finish, day.rows_received)
            else:
                futures[(pk, et)] = pool.submit(prepare_export, day, job, et, day.root / "prepared" / et,
                                                keep_rows=et in keep)
    results: dict[tuple[str, str], object] = {}
    unexpected: BaseException | None = None
    for key, future in futures.items():
        try:
            if isinstance(future, BaseException):
                raise future
            results[key] = future if isinstance(future, PreparedExport) else future.result()  # type: ignore[union-attr]
        except ValidationError as exc:
            results[key] = exc
        except BaseException as exc:  # noqa: BLE001 - raised after every export finished
            unexpected = unexpected or exc
    if unexpected is not None:
        for result in results.values():
            if isinstance(result, PreparedExport):
                shutil.rmtree(Path(staged[result.partition].root) / "prepared" / result.event_type, ignore_errors=True)
        raise unexpected
    out: dict[str, dict[str, PreparedExport] | ValidationError] = {}
    for pk, day in staged.items():
        if day.error:
            out[pk] = ValidationError(day.error)
            continue
        prepared: dict[str, PreparedExport] = {}
        for et in job.event_types:
            result = results[(pk, et)]
            if isinstance(result, ValidationError):
                out[pk] = result
                break
            prepared[et] = result  # type: ignore[assignment]
        else:
            out[pk] = prepared
    return StagedAndPrepared(staged, out, early_groups=early_groups, redone=redone)


#: Threads that prepare event types (and days) at once; default: the CPUs this process may use.
THREADS_ENV = "USERPILOT_SYNC_PREPARE_THREADS"


def prepare_threads() -> int:
    """How many exports are prepared at once: ``$USERPILOT_SYNC_PREPARE_THREADS``, else the CPUs
    this process may run on (``os.sched_getaffinity``). polars and pyarrow release the GIL while
    they filter, sort and encode, so threads use the cores; each thread holds about one group of
    ``export.VALIDATION_ROWS`` rows. Raises ConfigError on a value that is not a positive integer."""
    return threads_setting(THREADS_ENV, usable_cpus())


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
    # One task per large export; small exports (one group of hours each, e.g. the days of a
    # backfill range) of one event type go together, consecutive days until a task holds at least
    # VALIDATION_ROWS staged rows (so under twice that), and are validated with one pandera call
    # (export.prepare_small_exports): the same files and errors as one by one, without ~40 ms of
    # pandera per export and day.
    tasks: list[tuple[int, list[StagedDay], str, bool]] = []  # (staged rows, days, event type, small)
    batches: dict[str, tuple[int, list[StagedDay]]] = {}
    for day in staged:
        if day.error:
            out[day.partition] = ValidationError(day.error)
            continue
        for et in job.event_types:
            rows = day.rows_by_event_type.get(et, 0)
            if not export_module.is_small_export(day, et):
                tasks.append((rows, [day], et, False))
                continue
            total, days = batches.get(et, (0, []))
            total, days = total + rows, days + [day]
            if total >= export_module.VALIDATION_ROWS:
                tasks.append((total, days, et, True))
                total, days = 0, []
            batches[et] = (total, days)
    tasks += [(total, days, et, True) for et, (total, days) in batches.items() if days]
    # largest first: the longest task starts at once and the small ones fill the other threads
    tasks.sort(key=lambda t: -t[0])

    def run(task) -> list:
        _, days, et, small = task
        if not small:
            try:
                return [prepare_export(days[0], job, et, days[0].root / "prepared" / et, keep_rows=et in keep)]
            except ValidationError as exc:
                return [exc]
        return export_module.prepare_small_exports(
            job, et, [(day, day.root / "prepared" / et, et in keep) for day in days])

    n = min(threads or prepare_threads(), max(1, len(tasks)))
    results: dict[tuple[str, str], object] = {}

    def collect(task, outcome: list) -> None:
        for day, result in zip(task[1], outcome):
            results[(day.partition, task[2])] = result

    if n == 1:
        for task in tasks:
            collect(task, run(task))
    else:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="userpilot_sync-prepare") as pool:
            futures = [(task, pool.submit(run, task)) for task in tasks]
            unexpected: BaseException | None = None
            for task, future in futures:
                try:
                    collect(task, future.result())
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
    (wall clock) each stage took: ``extract_stage`` (source read and staged, with preparation of the
    hours it moved past running alongside), ``prepare`` (preparation left after staging: filter, de-duplicate, order,
    validate, encode), ``documented``, ``upload``, ``manifest``.
    """
    clock = _Stages(timings)
    day = parse_partition(partition)
    check_in_window(job.name, day, now)
    storage = storage or build_storage(job)
    both = stage_and_prepare(job, [day], staging_root, source)
    staged = both.staged[partition]
    clock.lap("extract_stage_prepare")
    if timings is not None:
        timings.update(extract_stage=both.staging_s, prepare=both.after_staging_s,
                       early_groups=both.early_groups, redone=len(both.redone))
        timings.pop("extract_stage_prepare", None)
    prepared = both.prepared[partition]
    if isinstance(prepared, ValidationError):
        raise prepared
    check_accounting(day_counts(staged, prepared))
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
