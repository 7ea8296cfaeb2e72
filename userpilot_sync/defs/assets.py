"""The assets of one sync job: a day's export (one step) and the lookups.

Lineage per sync job (key prefix and group = the sync job's name)::

    <job>/raw_events  ->  <job>/<event_type> (one per selected event type)  ->  <job>/manifest

These are the outputs of one multi-asset that cannot be subset: a day is one unit, so whatever
part of a day a user selects, Dagster refuses the selection before a run is created unless it
holds the whole day. The step, for its day or backfill range:

1. refuses what may not be exported (disabled sync job, days outside the 365-day window, a changed
   destination, GCS ``overwrite: refuse``) — nothing written;
2. takes the per-day locks (``locks.py``; ascending days, bounded wait, held for this step only)
   — the step already holds the app token's pool slot, so a run waits for a lock only while it
   holds the slot, and a lock holder that freed the slot waits for nothing more: no two runs can
   wait on each other;
3. extracts the range once and stages it per day, then frees the app token's pool slot (after the
   user and company snapshots when the sync job writes them: :class:`_PoolSlot`), so the app
   token's next run extracts while this one goes on; prepares (filters, de-duplicates, orders,
   validates) every event type of every day before anything uploads;
4. yields ``raw_events`` (records only), each export (the :class:`ExportIOManager` writes it; on a
   re-export of a day it first overwrites the day's manifest with ``status: replacing``) and the
   complete manifests (the :class:`ManifestIOManager` publishes them last), each day with its own
   metadata; then one check evaluation per check and day;
5. fails with a one-line cause per day (``dg.Failure``) when a day could not be exported; the other
   days of a range keep their exports and manifests.

``<job>/lookups`` (own group ``<job>_lookups``, not partitioned) writes the lookup tables.
"""


import os
from datetime import timedelta
from typing import Iterator

import dagster as dg

from userpilot_sync.defs import checks
from userpilot_sync.defs.failures import failure, tag_run
from userpilot_sync.defs.io_managers import DocumentedBatch, ExportBatch, LookupTables, ManifestBatch, ReplacingManifests
from userpilot_sync.documented.day import compute_day_files
from userpilot_sync.documented.state import STATE_DIR_ENV, SnapshotStore, backend_for, state_is_worker_local
from userpilot_sync.defs.keys import CHECK_DAY_EXPORTED, FAILURE_TAG, STAGING_RESOURCE_KEY, SyncJobKeys
from userpilot_sync.defs.ledger import (
    ROWS_RECEIVED_KEY,
    STATUS_EXPORTED,
    STATUS_FAILED,
    STATUS_REFUSED,
    Ledger,
    record_metadata,
)
from userpilot_sync.defs.notifications import check_problems, notify_run_days
from userpilot_sync.defs.recovery import SESSION_POSTGRES, SESSION_TAG, WORKER_NAME_TAG, worker_name, worker_tags
from userpilot_sync.defs.resources import SourceResource, StagingResource
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.destination.superseded import superseded_paths
from userpilot_sync.errors import DestinationError, UserpilotSyncError, ValidationError, WindowError
from userpilot_sync.faults import pause_point
from userpilot_sync.locks import PostgresLockBackend, wait_until_free
from userpilot_sync.guards import (
    ALLOW_SHRINK_TAG,
    allows_shrink,
    check_accounting,
    settings_changes,
    shrink_error,
    shrink_violations,
)
from userpilot_sync.partitions import check_in_window, consecutive_days, parse_partition, window_partition_keys
from userpilot_sync.pipeline import (
    day_counts,
    day_source_facts,
    manifest_for,
    rebuild_snapshot_state,
    replacing_manifest_for,
    stage_and_prepare,
)

SOURCE_LABELS = {"demo": "the demo generator", "files": "local export files", "export_api": "the Bulk Data Export API"}


def _label(partitions: list[str]) -> str:
    return partitions[0] if len(partitions) == 1 else f"{partitions[0]}..{partitions[-1]}"


class _Plan:
    """The days a step exports and the days it refuses (with why)."""

    def __init__(self, days: list[str], refused: dict[str, str]):
        self.days = days
        self.refused = refused


def _plan(context: dg.AssetExecutionContext, keys: SyncJobKeys, ledger: Ledger) -> _Plan:
    """Refuse what may not be exported; raises dg.Failure before anything is written."""
    job = keys.job
    partitions = list(context.partition_keys)
    label = _label(partitions)
    if not job.enabled:
        raise failure(job.name, label,
                      f"the sync job is disabled (enabled: false in {job.source_file or 'its file'}): no new exports "
                      f"are made and files already exported stay untouched. Set enabled: true to export it.")
    try:
        ordered = consecutive_days(partitions)
    except ValueError as exc:
        raise failure(job.name, label, f"{exc}; partitions are UTC days. Nothing was written.") from None
    if not ordered:
        raise failure(job.name, label, "the run's partitions are not consecutive UTC days (one extraction covers "
                                       "one unbroken range); launch the days as separate runs or a backfill of "
                                       "consecutive days. Nothing was written.")
    refused: dict[str, str] = {}
    for pk in partitions:
        try:
            check_in_window(job.name, parse_partition(pk))
        except WindowError as exc:
            refused[pk] = str(exc)
    if len(refused) == len(partitions):
        raise failure(job.name, label, "\n".join(refused[pk] for pk in partitions))
    try:
        ledger.check_destination_unchanged()
    except DestinationError as exc:
        raise failure(job.name, label, str(exc)) from None
    days = [pk for pk in partitions if pk not in refused]
    _refuse_reexports(context, keys, ledger, days)
    return _Plan(days, refused)


def _refuse_reexports(context: dg.AssetExecutionContext, keys: SyncJobKeys, ledger: Ledger, days: list[str]) -> None:
    """GCS ``overwrite: refuse``: raise dg.Failure if one of ``days`` was exported before. Checked
    before the day locks (a quick refusal) and again once they are held (another run may have
    finished exporting one of the days while this run waited for its lock)."""
    job = keys.job
    dest = job.destination
    if dest.kind == "gcs" and dest.overwrite == "refuse":
        for pk in days:
            if ledger.exported_before(pk, run_id=context.run_id):
                raise failure(
                    job.name, pk,
                    "this partition was exported before and destination.overwrite is 'refuse' (a "
                    "roles/storage.objectCreator credential cannot replace objects). Grant the custom role with "
                    "storage.objects.delete and set overwrite: overwrite to re-export. Nothing was written.")


DOCUMENTED_DESCRIPTIONS = {
    "all_users": "Snapshot of every identified user at the end of the UTC day (Userpilot Data Sync's all_users): "
                 "latest company, first/last identified, last event, merged properties; one row per user.",
    "all_companies": "Snapshot of every identified company at the end of the UTC day (all_companies): first/last "
                     "identified, last event, merged properties; one row per company.",
    "feature_tags_breakdown": "Per feature tag with track_feature events on the UTC day: events, unique users, "
                              "unique companies, name from the lookups.",
    "feature_tags_definitions": "Every feature tag of the app (id, name, description, category) from the lookups, "
                                "in each date folder.",
    "track_feature_per_tag": "The day's track_feature events, one file per feature tag (track_feature_<ID>).",
    "track_labeled_per_label": "The day's track events of labeled events, one file per label (track_labeled_<ID>).",
}


def _documented_deps(keys: SyncJobKeys) -> dict[str, set[dg.AssetKey]]:
    """Lineage of the documented files: what each is computed from, within the day's multi-asset."""
    exports = keys.exports
    deps: dict[str, set[dg.AssetKey]] = {}
    for name in keys.job.userpilot_files:
        source = {"track_feature_per_tag": "track_feature", "feature_tags_breakdown": "track_feature",
                  "track_labeled_per_label": "track", "all_users": "identify_user",
                  "all_companies": "identify_company"}.get(name)
        # definitions come from the lookups the run fetches: a root of the day
        deps[name] = {keys.raw_events} if name in ("all_users", "all_companies") else set()
        if source in exports:
            deps[name].add(exports[source])
        elif source is not None:
            deps[name].add(keys.raw_events)
    return deps


def build_day_assets(keys: SyncJobKeys, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The multi-asset that exports whole days of one sync job (see the module docstring)."""
    job = keys.job
    dest_kind = job.destination.kind
    formats = sorted({f.format for f in job.formats})
    # Dagster shows at most 3 kinds: the first format the sync job lists (its main one) is the kind
    primary = job.formats[0].format
    owners = list(job.owners)
    common = dict(owners=owners, group_name=keys.group)
    # the UI shows descriptions where users pick what to materialize: say that a day is one unit
    one_unit = f" A day is one unit: materialize group {keys.group!r} (a single asset of a day is refused)."
    outs: dict[str, dg.AssetOut] = {
        "raw_events": dg.AssetOut(
            key=keys.raw_events, dagster_type=dg.Nothing, kinds={"python"},
            description=(f"Raw Userpilot events of one UTC day from {SOURCE_LABELS[job.source.kind]}, staged on "
                         f"local disk per event type and hour (Arrow IPC); per day: rows received and source facts."
                         + one_unit),
            metadata={"sync_id": job.sync_id, "app_token": job.app_token, "source": job.source.kind},
            tags={"userpilot_sync/role": "extract"}, **common),
    }
    for et, key in keys.exports.items():
        outs[et] = dg.AssetOut(
            key=key, io_manager_key=keys.export_io_manager, kinds={"pandera", dest_kind, primary},
            description=(f"{et} events of one UTC day: filtered, de-duplicated, validated against the Userpilot "
                         f"Event Schema and exported to {dest_kind} as {', '.join(formats)}." + one_unit),
            metadata={"event_type": et},
            tags={"userpilot_sync/role": "export", "userpilot_sync/event_type": et}, **common)
    for name, key in keys.documented_files.items():
        outs[name] = dg.AssetOut(
            key=key, io_manager_key=keys.documented_io_manager, kinds={"pandera", dest_kind, primary},
            description=DOCUMENTED_DESCRIPTIONS[name] + f" Exported to {dest_kind} as {', '.join(formats)}." + one_unit,
            metadata={"userpilot_file": name},
            tags={"userpilot_sync/role": "documented_file"}, **common)
    outs["manifest"] = dg.AssetOut(
        key=keys.manifest, io_manager_key=keys.manifest_io_manager, kinds={"json", dest_kind},
        description="The manifest of one UTC day (_manifest.json), written last: every export's files with rows, "
                    "bytes and sha256." + one_unit,
        tags={"userpilot_sync/role": "manifest"}, **common)
    specs = checks.check_specs(keys, partitions_def)

    @dg.multi_asset(
        name=f"{job.name}_day",
        outs=outs,
        internal_asset_deps={"raw_events": set(), **{et: {keys.raw_events} for et in keys.exports},
                             **_documented_deps(keys),
                             "manifest": set(keys.exports.values()) | set(keys.documented_files.values())},
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.multi_run(job.backfill_days_per_run),
        can_subset=False,
        check_specs=specs,
        pool=job.pool,
        required_resource_keys={STAGING_RESOURCE_KEY, keys.source_resource},
        description=f"Exports whole UTC days of sync job {job.name!r}: raw events, every event type, the manifest.",
    )
    def day(context: dg.AssetExecutionContext) -> Iterator:
        yield from _export_days(context, keys)

    return day


def _export_days(context: dg.AssetExecutionContext, keys: SyncJobKeys) -> Iterator:
    try:
        yield from _export_days_unguarded(context, keys)
    except dg.Failure as exc:
        tag_run(context.instance, context.run_id, exc)
        _notify_run_failure(context, keys, exc)
        raise
    except Exception as exc:
        if isinstance(exc, dg.DagsterError):
            raise
        # an error nobody foresaw (a library, the disk): still the job, the days and the cause first
        wrapped = failure(keys.name, _label(list(context.partition_keys)), f"{type(exc).__name__}: {exc}")
        tag_run(context.instance, context.run_id, wrapped)
        _notify_run_failure(context, keys, wrapped)
        raise wrapped from exc


def _notify_run_failure(context: dg.AssetExecutionContext, keys: SyncJobKeys, exc: dg.Failure) -> None:
    """``failed`` for the days of a run that failed as a whole (days already notified are deduped)."""
    if not keys.job.notifications or getattr(exc, "days_notified", False):
        return
    reason = (exc.description or str(exc)).strip()
    notify_run_days(context.instance, keys, context.run_id, exported={},  # never raises
                    failed={pk: reason for pk in context.partition_keys}, problems={}, log=context.log.warning)


def _export_days_unguarded(context: dg.AssetExecutionContext, keys: SyncJobKeys) -> Iterator:
    job = keys.job
    staging: StagingResource = getattr(context.resources, STAGING_RESOURCE_KEY)
    backend = staging.lock_backend(context.instance)
    tags = worker_tags(context.run_id)  # lets recovery tell a dead run
    if isinstance(backend, PostgresLockBackend):  # cluster: the session exists before the tag says so
        if set(job.userpilot_files) & {"all_users", "all_companies"} and state_is_worker_local(job):
            raise failure(job.name, _label(list(context.partition_keys)),
                          f"the snapshot state store is a folder in this worker's staging ({staging.path}/_state), but "
                          f"this instance runs on several workers (PostgreSQL): each worker would chain the "
                          f"all_users/all_companies snapshots alone. Set state: {{kind: s3|gcs, ...}} in the sync job's "
                          f"file, or {STATE_DIR_ENV} on every worker to a folder they all share (docs/deploy.md). "
                          f"Nothing was written.")
        backend.serve_run(context.run_id)
        tags[SESSION_TAG] = SESSION_POSTGRES
    if context.run.tags.get(FAILURE_TAG):  # inherited from the parent of a re-execution
        tags[FAILURE_TAG] = ""
    context.instance.add_run_tags(context.run_id, tags)
    context.log.info(f"sync job {job.name!r}: running on worker {tags[WORKER_NAME_TAG]} (pid {os.getpid()}), "
                     f"staging in {staging.path}, day locks: {type(backend).__name__}")
    source: SourceResource = getattr(context.resources, keys.source_resource)
    ledger = Ledger(context.instance, keys)
    plan = _plan(context, keys, ledger)
    days = plan.days

    def waiting(pk: str) -> None:
        context.log.info(f"sync job {job.name!r}, partition {pk}: waiting for another run of this partition to finish "
                         f"(at most {staging.lock_wait_s:.0f} s)")

    try:
        staging.hold_days(job, days, owner=context.run_id, on_wait=waiting, log=context.log.warning, backend=backend)
        _refuse_reexports(context, keys, ledger, days)
        yield from _export_locked(context, keys, staging, source, ledger, plan, backend)
    except UserpilotSyncError as exc:  # lock timeout, source errors: nothing was written
        raise failure(job.name, _label(days), str(exc)) from None
    finally:
        staging.release_days()  # also done by the resource's teardown if Dagster drops this generator


def _export_locked(context: dg.AssetExecutionContext, keys: SyncJobKeys, staging: StagingResource, source: SourceResource,
                   ledger: Ledger, plan: _Plan, backend) -> Iterator:
    job = keys.job
    days = plan.days
    # extract and stage the range; every event type of every day is prepared (up to one thread per
    # core) while the source is still read, hours once the source moved past them; a day fails as a whole
    slot = _PoolSlot(context, job, _label(days))
    # the slot is freed once the source was read, unless the snapshots may read it again (rebuilding
    # their state) or must follow the run before (the snapshot chain): then after they are computed
    keep_slot = bool(set(job.userpilot_files) & SNAPSHOT_FILES)
    both = stage_and_prepare(job, [parse_partition(pk) for pk in days], staging.path, source=source.event_source(),
                             on_extracted=None if keep_slot else slot.free)
    staged = both.staged
    pause_point("staged")
    context.log.info(f"sync job {job.name!r}, {_label(days)}: staged in {both.staging_s:.1f} s; "
                     f"{both.early_groups} group(s) of hours prepared while staging ran, the rest in "
                     f"{both.after_staging_s:.1f} s after")
    if both.redone:
        context.log.info(f"sync job {job.name!r}: the source delivered rows into hours already prepared; prepared "
                         f"again after staging: {', '.join(both.redone[:20])}{' ...' if len(both.redone) > 20 else ''}")
    prepared: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for pk, result in both.prepared.items():
        try:
            if isinstance(result, ValidationError):
                raise result
            check_accounting(day_counts(staged[pk], result))
            prepared[pk] = result
        except ValidationError as exc:
            failed[pk] = str(exc)
    # guard: a re-export may not shrink a day's export beyond checks.max_shrink unless the run allows it
    previous = ledger.previous_manifests(list(prepared))
    shrink_allowed = allows_shrink(context.run.tags)
    for pk in list(prepared):
        if pk not in previous:
            continue
        new_rows = {et: p.rows for et, p in prepared[pk].items()}
        shrinks = shrink_violations(rows_by_event_type(previous[pk]), new_rows, job.checks.max_shrink)
        if not shrinks:
            continue
        error = shrink_error(job.name, pk, shrinks, job.checks.max_shrink,
                             settings_changes(previous[pk].get("settings"), job.settings_summary()))
        if shrink_allowed:
            context.log.warning(f"{error} — allowed by the run tag {ALLOW_SHRINK_TAG}")
            continue
        del prepared[pk]
        failed[pk] = str(error)
    # Userpilot's documented files (snapshots, feature tags): computed and validated before upload
    documented, store = _documented_files(context, keys, staging, source, ledger, staged, prepared, failed)
    slot.free()
    not_exported = {**{pk: (STATUS_REFUSED, r) for pk, r in plan.refused.items()},
                    **{pk: (STATUS_FAILED, r) for pk, r in failed.items()}}
    if not prepared:  # nothing of the run can be written
        for pk in sorted(failed):
            yield checks.day_exported(keys, pk, None, failed[pk])
        for pk in sorted(plan.refused):
            yield checks.day_refused(keys, pk, plan.refused[pk])
        notify_run_days(context.instance, keys, context.run_id, exported={},
                        failed={pk: r for pk, (_, r) in not_exported.items()}, problems={}, log=context.log.warning)
        raise _summary_failure(job.name, list(context.partition_keys), not_exported, exported=[])

    # raw events: one record per day
    received: list[tuple[str, int | None, bool]] = []  # (day, rows received, exported) for the emptiness check
    for pk in context.partition_keys:
        if pk not in staged:
            status, reason = not_exported[pk]
            context.add_asset_metadata(record_metadata(job, status, reason=reason), asset_key=keys.raw_events,
                                       partition_key=pk)
            received.append((pk, None, False))
            continue
        day = staged[pk]
        status = STATUS_EXPORTED if pk in prepared else STATUS_FAILED
        metadata = record_metadata(job, status, **{ROWS_RECEIVED_KEY: day.rows_received},
                                   rows_by_event_type=day.rows_by_event_type, source_facts=day_source_facts(day),
                                   unknown_columns=day.unknown_columns)
        # counted over the whole extraction (one day, or the run's range): named as such
        metadata.update({"dagster/row_count": day.rows_received, "extraction_computed_ids": day.computed_ids,
                         "extraction_rows_outside_window": day.rows_outside_window,
                         "userpilot/worker": f"{worker_name()} pid {os.getpid()}"})
        if pk in failed:
            metadata["reason"] = failed[pk]
        context.add_asset_metadata(metadata, asset_key=keys.raw_events, partition_key=pk)
        received.append((pk, day.rows_received, pk in prepared))
    yield dg.Output(None, output_name="raw_events")

    # re-exported days: a 'replacing' manifest goes out before the first file of the day is replaced
    earlier = ledger.earlier_paths_by_day(list(prepared))
    started = ledger.days_started_before(list(prepared), run_id=context.run_id)
    # (GCS overwrite: refuse never replaces an object: days exported before were refused in _plan)
    refuse = job.destination.kind == "gcs" and job.destination.overwrite == "refuse"
    replacing = ReplacingManifests({pk: replacing_manifest_for(job, pk, context.run_id, earlier[pk])
                                    for pk in prepared if (earlier[pk] or pk in started) and not refuse})
    if job.destination.kind == "gcs":
        for pk in replacing.manifests:
            replacing.generations.update(ledger.generations(keys.manifest, pk))

    # exports: the ExportIOManager writes each day's files (every event type validated above)
    files: dict[str, list] = {pk: [] for pk in prepared}
    for et in job.event_types:
        batch = ExportBatch(et, {pk: prepared[pk][et] for pk in prepared}, not_exported, replacing=replacing)
        yield dg.Output(batch, output_name=et)
        for pk, written in batch.written.items():
            files[pk].extend(written)

    # documented files: the DocumentedIOManager writes each day's files of one kind
    for name in job.userpilot_files:
        batch = DocumentedBatch(name, {pk: documented[pk][name] for pk in prepared if name in documented.get(pk, {})},
                                not_exported, replacing=replacing, taken={pk: {f.path for f in files[pk]} for pk in prepared})
        yield dg.Output(batch, output_name=name)
        for pk, written in batch.written.items():
            files[pk].extend(written)

    # manifests, published last by the ManifestIOManager
    allow_deletes = bool(getattr(job.destination, "allow_deletes", False))
    manifests = {}
    for pk in prepared:
        superseded = superseded_paths(earlier[pk], files[pk])
        manifests[pk] = manifest_for(job, staged[pk], prepared[pk].values(), files[pk], context.run_id,
                                     superseded=superseded, deleted=superseded if allow_deletes else [],
                                     documented=documented.get(pk))
    yield dg.Output(ManifestBatch(manifests, not_exported, replacing=replacing), output_name="manifest")

    # checks: one evaluation per check and day. They compare with earlier days (the day before, the
    # volume baseline): wait until no other run is still exporting one of those (a run that freed the
    # app token's pool slot may be), so a check never depends on how two runs happened to overlap
    _wait_for_earlier_days(context, keys, staging, backend, days[0])
    evaluations = []
    previous_rows = ledger.rows_received((parse_partition(days[0]) - timedelta(days=1)).isoformat())
    for pk, rows, exported in received:
        if rows is not None:
            evaluations.append(checks.not_unexpectedly_empty(keys, pk, rows, previous_rows))
        previous_rows = rows if exported else None
    for et in job.event_types:
        baselines = _baselines(ledger, job, et, list(context.partition_keys),
                               {pk: prepared[pk][et].rows for pk in prepared})
        for pk in prepared:
            evaluations.append(checks.known_values(keys, et, pk, prepared[pk][et]))
            evaluations.append(checks.expected_volume(keys, et, pk, prepared[pk][et], baselines[pk]))
    for name in ("all_users", "all_companies"):
        if name in job.userpilot_files:
            evaluations.extend(checks.snapshot_current(keys, name, pk, documented[pk][name].facts)
                               for pk in sorted(manifests))
    if store is not None and manifests:
        evaluations.extend(_stale_snapshot_checks(context, keys, store, sorted(manifests)))
    for pk in context.partition_keys:
        if pk in manifests:
            evaluations.append(checks.day_exported(keys, pk, manifests[pk]))
        elif pk in failed:
            evaluations.append(checks.day_exported(keys, pk, None, failed[pk]))
        else:
            evaluations.append(checks.day_refused(keys, pk, plan.refused[pk]))
    yield from evaluations
    for name in context.assets_def.check_specs_by_output_name:
        yield dg.Output(None, output_name=name)
    for pk, (status, reason) in sorted(not_exported.items()):
        (context.log.warning if status == STATUS_REFUSED else context.log.error)(reason)
    day_checks = [e for e in evaluations if e.check_name != CHECK_DAY_EXPORTED]  # day_exported: the 'failed' notice
    notify_run_days(context.instance, keys, context.run_id, exported=manifests,
                    failed={pk: r for pk, (_, r) in not_exported.items()}, problems=check_problems(day_checks),
                    log=context.log.warning)
    if failed:
        raise _summary_failure(job.name, list(context.partition_keys), not_exported, exported=sorted(manifests))


def _wait_for_earlier_days(context: dg.AssetExecutionContext, keys: SyncJobKeys, staging: StagingResource,
                           backend, first: str) -> None:
    """Wait (at most ``lock_wait_s``) until no other run holds a day lock of the days the checks
    look back on (the volume baseline's ``2 × baseline_days`` days before ``first``, the day before
    included); after that the checks use what is recorded, and the log says which days were still
    being exported."""
    job = keys.job
    start = parse_partition(first)
    lookback = [(start - timedelta(days=i)).isoformat() for i in range(max(2 * job.checks.volume.baseline_days, 1), 0, -1)]

    def waiting(pk: str) -> None:
        context.log.info(f"sync job {job.name!r}: waiting for the run exporting partition {pk} to finish before "
                         f"evaluating the checks (they compare with earlier days)")

    busy = wait_until_free(backend, job.name, lookback, owner=f"{context.run_id}:checks",
                           wait_s=staging.lock_wait_s, on_wait=waiting)
    if busy:
        context.log.warning(f"sync job {job.name!r}: partitions {', '.join(busy)} were still being exported by another "
                            f"run after {staging.lock_wait_s:.0f} s; the checks compare with what was recorded so far")


#: Userpilot's documented files whose computation may read the source again (rebuilding the snapshot
#: state store) and continues the run before it (each day's snapshot starts from the day before).
SNAPSHOT_FILES = frozenset({"all_users", "all_companies"})


class _PoolSlot:
    """The app token's pool slot (``userpilot_export_<app token>``, limit 1) this export step holds.

    Dagster claims it before the step body runs and would free it only when the step ends, but the
    pool exists for the Bulk Data Export API (one export job per app token; a second gets 409
    Conflict). :meth:`free` gives it back as soon as the step no longer reads the source — after
    extraction and staging, or after the snapshots when the sync job writes them — so the next run
    of the app token (a backfill's next range, the daily run) extracts while this one prepares,
    uploads and records its days (the lookups the feature-tag files read later are not export jobs).
    This run keeps its day locks until its step ends; a run that waits for one of them holds the
    slot, but the holder waits for nothing but earlier days' locks (before its checks, without
    holding any of them), so no two runs can wait on each other. Freeing twice, or a slot Dagster
    already freed, changes nothing.
    """

    def __init__(self, context: dg.AssetExecutionContext, job, label: str):
        self.context, self.job, self.label = context, job, label
        self.freed = False

    def free(self) -> None:
        """Free this step's slot now (never raises: on an error the slot is freed when the step ends)."""
        if self.freed:
            return
        self.freed = True
        storage = self.context.instance.event_log_storage
        try:
            if not storage.supports_global_concurrency_limits:
                return
            step_key = self.context.get_step_execution_context().step.key
            storage.free_concurrency_slot_for_step(self.context.run_id, step_key)
        except Exception as exc:  # the slot stays claimed until Dagster frees it at the step's end
            self.context.log.warning(f"sync job {self.job.name!r}, {self.label}: could not free the pool slot of "
                                     f"{self.job.pool!r} early ({type(exc).__name__}: {exc}); it is freed when "
                                     f"the step ends")
            return
        self.context.log.info(f"sync job {self.job.name!r}, {self.label}: done with the source; pool slot of "
                              f"{self.job.pool!r} freed for the app token's next run (this run keeps its day locks)")


def _features_events(job, source: SourceResource):
    """The ``features_events`` lookup for the documented files, or (None, why not)."""
    from userpilot_sync.source.lookups import lookups_for_job

    if job.source.kind == "files":
        return None, "the sync job's source (local export files) has no lookups"
    try:
        api = source.event_source() if job.source.kind == "export_api" else None
        return lookups_for_job(job, ("features_events",), source=api)["features_events"], None
    except UserpilotSyncError as exc:
        return None, f"the features_events lookup could not be fetched ({exc})"


def _documented_files(context: dg.AssetExecutionContext, keys: SyncJobKeys, staging: StagingResource,
                      source: SourceResource, ledger: Ledger, staged: dict, prepared: dict, failed: dict):
    """Every documented file of every day still to export, in day order (the snapshot chain).

    Days whose files break their schema move from ``prepared`` to ``failed``. Returns
    ``({day: {name: DocumentedFile}}, the snapshot state store or None)``.
    """
    job = keys.job
    if not job.userpilot_files or not prepared:
        return {}, None
    features_events, note = (None, None)
    if set(job.userpilot_files) & {"feature_tags_breakdown", "feature_tags_definitions", "track_labeled_per_label"}:
        features_events, note = _features_events(job, source)
        if note:
            context.log.warning(f"sync job {job.name!r}: {note}")
    store = None
    if set(job.userpilot_files) & {"all_users", "all_companies"}:
        store = SnapshotStore(backend_for(job, staging.path), job.name, job.state.checkpoint_every_days)
        if not store.exists:
            first = min(prepared)
            window = [d for d in window_partition_keys(start=job.partitions_start) if d < first]
            earlier = sorted(ledger.previous_manifests(window)) if window else []
            if earlier:
                context.log.warning(
                    f"sync job {job.name!r}: the snapshot state store ({store.backend.where}) is empty but days from "
                    f"{earlier[0]} were exported: rebuilding the state from the source's identify events "
                    f"{earlier[0]}..{window[-1]} (last_event_at before {first} counts identify events only)")
                rebuild_snapshot_state(job, earlier[0], window[-1], staging.path, store, run_id=context.run_id,
                                       source=source.event_source())
    window_start = window_partition_keys()[0]
    out: dict[str, dict] = {}
    carried = None
    for pk in sorted(prepared):
        try:
            out[pk], carried = compute_day_files(job, staged[pk], prepared[pk], store=store, carried=carried,
                                                 features_events=features_events, lookups_note=note,
                                                 run_id=context.run_id, window_start=window_start)
        except ValidationError as exc:
            del prepared[pk]
            failed[pk] = str(exc)
    return out, store


def _stale_snapshot_checks(context: dg.AssetExecutionContext, keys: SyncJobKeys, store: SnapshotStore,
                           exported: list[str]) -> list[dg.AssetCheckEvaluation]:
    """Days after this run whose snapshots this run made stale: a failed ``snapshot_current`` per
    day, evaluated by this run for those days (Dagster keeps one row per check, run and partition;
    a runless report could be made only once per day); the snapshot sensor requests their
    recomputation."""
    stale = [d for d in store.stale_days() if d > exported[-1]]
    if not stale:
        return []
    context.log.warning(f"sync job {keys.name!r}: the snapshots of {stale[0]}..{stale[-1]} ({len(stale)} day(s)) are "
                        f"stale after this run; the sensor {keys.snapshot_sensor_name} recomputes them in one range run")
    return [checks.snapshot_stale(keys, name, pk, exported[0], context.run_id)
            for name in ("all_users", "all_companies") if name in keys.job.userpilot_files for pk in stale]


def _baselines(ledger: Ledger, job, event_type: str, partitions: list[str], in_run: dict[str, int]) -> dict[str, list[int]]:
    """Per day of ``partitions``: rows of ``event_type`` on the last ``checks.volume.baseline_days``
    exported days before it (newest first; looked up over twice as many calendar days; days of
    this run count with their new rows, failed days never)."""
    n = job.checks.volume.baseline_days
    first = parse_partition(min(partitions))
    lookback = [(first - timedelta(days=i)).isoformat() for i in range(2 * n, 0, -1)]
    known = ledger.exported_rows(event_type, lookback)
    known.update(in_run)  # days of this run that failed or were refused do not count
    out = {}
    for pk in partitions:
        before = sorted((d for d in known if d < pk), reverse=True)
        out[pk] = [known[d] for d in before if d >= (parse_partition(pk) - timedelta(days=2 * n)).isoformat()][:n]
    return out


def _summary_failure(job_name: str, partitions: list[str], not_exported: dict[str, tuple[str, str]],
                     exported: list[str]) -> dg.Failure:
    """The step's failure after its days were recorded (and notified) one by one."""
    exc = _summary_failure_of(job_name, partitions, not_exported, exported)
    exc.days_notified = True  # each day's 'failed' notice went out already
    return exc


def _summary_failure_of(job_name: str, partitions: list[str], not_exported: dict[str, tuple[str, str]],
                        exported: list[str]) -> dg.Failure:
    failed = {pk: r for pk, (s, r) in not_exported.items() if s == STATUS_FAILED}
    if len(partitions) == 1 or (len(failed) == 1 and not exported):
        pk, reason = next(iter(failed.items())) if failed else next((k, r) for k, (s, r) in not_exported.items())
        return failure(job_name, pk, reason)
    first_pk = sorted(failed)[0]
    first_cause = failed[first_pk].splitlines()[0].removeprefix(f"sync job {job_name!r}, partition {first_pk}, ")
    lines = [f"sync job {job_name!r}, partition(s) {', '.join(sorted(failed))}: {len(failed)} of {len(partitions)} "
             f"partition(s) failed and got no manifest"
             + (f" (the other {len(exported)} were exported completely)" if exported else "")
             + f"; {first_pk}: {first_cause}",
             "Fix the source data (or the sync job's filters) and re-run these partitions:"]
    lines += [f"  {pk}: " + reason.replace("\n", "\n    ") for pk, reason in sorted(failed.items())]
    return dg.Failure(description="\n".join(lines),
                      metadata={"sync_job": job_name, "failed_partitions": dg.MetadataValue.json(sorted(failed)),
                                "exported_partitions": dg.MetadataValue.json(exported)},
                      allow_retries=False)


def build_lookups_asset(keys: SyncJobKeys) -> dg.AssetsDefinition:
    """``<job>/lookups``: the app's lookup tables (demo and Export API sources), own group."""
    job = keys.job

    @dg.asset(
        key=keys.lookups,
        description="Lookups (flows, checklists, surveys, feature tags, segments, properties, ...) that name the ids "
                    "in the exports; written to <sync folder>/lookups/<kind>.parquet.",
        kinds={"pandera", job.destination.kind, "parquet"},
        io_manager_key=keys.lookups_io_manager,
        group_name=keys.lookups_group,
        owners=list(job.owners),
        tags={"userpilot_sync/role": "lookups"},
        required_resource_keys={keys.source_resource},
    )
    def lookups(context: dg.AssetExecutionContext) -> LookupTables:
        from userpilot_sync.source.lookups import lookups_for_job

        if not job.enabled:
            raise failure(job.name, None, "the sync job is disabled: its lookups are not refreshed "
                                          "(files already exported stay untouched)")
        try:
            Ledger(context.instance, keys).check_destination_unchanged()
            source: SourceResource = getattr(context.resources, keys.source_resource)
            api = source.event_source() if job.source.kind == "export_api" else None
            return LookupTables(lookups_for_job(job, source=api))
        except UserpilotSyncError as exc:
            raise failure(job.name, None, str(exc)) from None

    return lookups
