"""Dagster definitions of one sync job: assets, checks, the asset job, schedules and sensors.

Asset graph (key prefix and group = the sync job's name)::

    <job>/raw_events  ->  <job>/<event_type> (one per selected event type)  ->  <job>/manifest

All assets are partitioned by UTC day. ``raw_events`` runs in the pool of the app token (one
export job per app token at a time); exports hand their prepared data to the sync job's
destination IO manager; the manifest is written last and re-materializes automatically when a
user materializes a subset of the exports (declarative automation), so it always describes
what the exports wrote.
"""


from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.io_managers import (
    DestinationIOManager,
    ExportBatch,
    LookupTables,
    ManifestBatch,
    files_from_metadata,
)
from userpilot_sync.defs.state import (
    COUNTS_KEY,
    FAILED_KEY,
    FILES_KEY,
    STAGED_KEY,
    check_destination_unchanged,
    latest_materialization,
    metadata_value,
)
from userpilot_sync.destination.manifest import build_manifest
from userpilot_sync.destination.superseded import superseded_paths
from userpilot_sync.errors import DestinationError, UserpilotSyncError, ValidationError, WindowError
from userpilot_sync.export import load_prepared, prepare_export
from userpilot_sync.partitions import check_in_window, day_window, parse_partition
from userpilot_sync.pipeline import extract_and_stage
from userpilot_sync.staging import hold_partition_lock
from userpilot_sync.scheduling import (
    DAILY_CRON,
    initial_backfill_partitions,
    sync_back_cron,
    sync_back_partitions,
    sync_cron,
    sync_partitions,
)

STAGING_IO_MANAGER_KEY = "userpilot_staging_io_manager"
PARTITION_LOCK_TAG = "userpilot_sync/partition_lock"
SYNC_JOB_TAG = "userpilot_sync/sync_job"


def destination_io_manager_key(job: SyncJob) -> str:
    return f"userpilot_destination_{job.name}"


def partitions_def(job: SyncJob) -> dg.DailyPartitionsDefinition:
    """UTC days from ``partitions_start`` to yesterday (the newest complete day)."""
    return dg.DailyPartitionsDefinition(start_date=job.partitions_start.isoformat(), timezone="UTC", fmt="%Y-%m-%d")


def run_tags(job: SyncJob, partition: str) -> dict[str, str]:
    """Tags of a run exporting one partition (the lock tag serialises runs of a job+partition)."""
    return {SYNC_JOB_TAG: job.name, PARTITION_LOCK_TAG: f"{job.name}.{partition}"}


class _Guard:
    """Checks every asset of a sync job runs before writing: enabled, in window, same destination."""

    def __init__(self, job: SyncJob, destination_keys: list[dg.AssetKey], staging_root: Path):
        self.job = job
        self.destination_keys = destination_keys
        self.staging_root = staging_root

    def __call__(self, context: dg.AssetExecutionContext) -> tuple[list[str], dict[str, str]]:
        """The run's partitions to export (one, or a backfill range) and the refused ones with why.

        A single partition outside the 365-day window raises; inside a backfill range such days
        are refused one by one (reported like a bad day) so they don't cost the others.
        """
        job = self.job
        partitions = list(context.partition_keys)
        label = partitions[0] if len(partitions) == 1 else f"{partitions[0]}..{partitions[-1]}"
        if not job.enabled:
            raise UserpilotSyncError(
                f"sync job {job.name!r} is disabled (enabled: false in {job.source_file or 'its file'}): no new "
                f"exports are made and files already exported stay untouched. Set enabled: true to export "
                f"partition {label}."
            )
        refused: dict[str, str] = {}
        for pk in partitions:
            try:
                check_in_window(job.name, parse_partition(pk))
            except ValueError as exc:
                raise WindowError(f"sync job {job.name!r}: {exc}") from None
            except WindowError as exc:
                if len(partitions) == 1:
                    raise
                refused[pk] = str(exc)
        if len(refused) == len(partitions):
            raise WindowError("\n".join(refused.values()))
        for pk in partitions:
            if pk not in refused:  # runs of one sync job and partition never interleave
                hold_partition_lock(self.staging_root, job.name, pk, context.run_id)
        check_destination_unchanged(context.instance, job, self.destination_keys)
        dest = job.destination
        if dest.kind == "gcs" and dest.overwrite == "refuse":
            for pk in partitions:
                for key in self.destination_keys:
                    if key.path[-1] == "definitions":
                        continue
                    records = context.instance.fetch_materializations(
                        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]), limit=1000
                    ).records
                    written = [  # a failed or refused day of a range has a record but no files
                        r for r in records
                        if r.run_id != context.run_id
                        and (metadata_value(r.asset_materialization, FILES_KEY) or {}).get(pk)
                    ]
                    if written:  # written by an earlier run
                        raise DestinationError(
                            f"sync job {job.name!r}, partition {pk}: this partition was exported before and "
                            f"destination.overwrite is 'refuse' (a roles/storage.objectCreator credential cannot "
                            f"replace objects). Grant the custom role with storage.objects.delete and set "
                            f"overwrite: overwrite to re-export. Nothing was written."
                        )
        return [pk for pk in partitions if pk not in refused], refused


def build_sync_job_definitions(job: SyncJob, staging_root: Path) -> dg.Definitions:
    """All Dagster definitions of one sync job."""
    parts = partitions_def(job)
    raw_key = dg.AssetKey([job.name, "raw_events"])
    export_keys = {et: dg.AssetKey([job.name, et]) for et in job.event_types}
    manifest_key = dg.AssetKey([job.name, "manifest"])
    guard = _Guard(job, [manifest_key, *export_keys.values()], staging_root)
    owners = list(job.owners)
    dest_kind = job.destination.kind
    formats = sorted({f.format for f in job.formats})
    # A backfill run exports up to backfill_days_per_run days: one extraction for the range,
    # split by day (each day still gets its own exports and manifest).
    common = dict(
        group_name=job.name,
        owners=owners,
        partitions_def=parts,
        backfill_policy=dg.BackfillPolicy.multi_run(job.backfill_days_per_run),
    )
    source_label = {"demo": "the demo generator", "files": "local export files",
                    "export_api": "the Bulk Data Export API"}[job.source.kind]

    # ---------------------------------------------------------------- raw events
    @dg.asset(
        key=raw_key,
        description=f"Raw Userpilot events of one UTC day from {source_label}, staged on local disk per event type and hour.",
        kinds={"python", "parquet"},
        pool=job.pool,
        io_manager_key=STAGING_IO_MANAGER_KEY,
        metadata={"sync_id": job.sync_id, "app_token": job.app_token, "source": job.source.kind},
        check_specs=[
            dg.AssetCheckSpec(
                "not_unexpectedly_empty",
                asset=raw_key,
                description="Warns when a day comes back empty while the previous day had events.",
            )
        ],
        tags={"userpilot_sync/role": "extract"},
        **common,
    )
    def raw_events(context: dg.AssetExecutionContext):
        partitions, refused = guard(context)
        days = [parse_partition(pk) for pk in partitions]
        staged = extract_and_stage(job, days, staging_root)
        # Prepare (filter, de-duplicate, order, validate) every event type of every day here, before
        # any export asset uploads: a day that breaks the schema in one event type gets no file
        # replaced at all, so a re-export can never leave a day half-overwritten.
        failed: dict[str, str] = dict(refused)
        for pk in partitions:
            day = staged[pk]
            if day.error is None:
                try:
                    for event_type in job.event_types:
                        prepare_export(day, job, event_type, day.root / "prepared" / event_type)
                except ValidationError as exc:
                    day.error = str(exc)
                    day.save()
            if day.error:
                failed[pk] = day.error
        if failed and len(context.partition_keys) == 1:
            raise ValidationError(failed[partitions[0]])
        if len(failed) == len(context.partition_keys):
            raise ValidationError("\n".join(failed[pk] for pk in sorted(failed)))
        for pk, message in sorted(failed.items()):
            context.log.error(message)
        previous = latest_materialization(context.instance, raw_key, (days[0] - timedelta(days=1)).isoformat())
        previous_rows = (metadata_value(previous, STAGED_KEY) or {}).get(
            (days[0] - timedelta(days=1)).isoformat(), {}
        ).get("source_rows")
        suspicious = {}
        per_day = {}
        for pk in partitions:
            day = staged[pk]
            if day.rows_received == 0 and previous_rows:
                suspicious[pk] = previous_rows
                context.log.warning(
                    f"sync job {job.name!r}, partition {pk}: the source returned no events, but the previous day "
                    f"had {previous_rows}. Check the source (API key, filters) before trusting this empty day."
                )
            previous_rows = day.rows_received
            per_day[pk] = {
                "source_rows": day.rows_received,
                "rows_outside_window": day.rows_outside_window,
                "rows_by_event_type": day.rows_by_event_type,
                "unknown_columns": day.unknown_columns,
                "computed_ids": day.computed_ids,
                "source": day.source,
                "error": day.error,
            }
        yield dg.Output(
            staged,
            metadata={
                "source_rows": sum(d.rows_received for d in staged.values()),
                "rows_outside_window": max((d.rows_outside_window for d in staged.values()), default=0),
                "unknown_columns": dg.MetadataValue.json(sorted({c for d in staged.values() for c in d.unknown_columns})),
                "failed_partitions": dg.MetadataValue.json(failed),
                STAGED_KEY: dg.MetadataValue.json(per_day),
            },
        )
        yield dg.AssetCheckResult(
            check_name="not_unexpectedly_empty",
            passed=not suspicious,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"empty_days_after_non_empty": dg.MetadataValue.json(suspicious)},
        )

    # ---------------------------------------------------------------- exports
    def make_export(event_type: str) -> dg.AssetsDefinition:
        key = export_keys[event_type]

        @dg.asset(
            key=key,
            ins={"raw_events": dg.AssetIn(key=raw_key)},
            description=(
                f"{event_type} events of one UTC day: filtered, de-duplicated, validated against the "
                f"Userpilot Event Schema and exported to {dest_kind} as {', '.join(formats)}."
            ),
            kinds={"pandera", dest_kind, formats[0]},
            io_manager_key=destination_io_manager_key(job),
            metadata={"event_type": event_type},
            check_specs=[
                dg.AssetCheckSpec(
                    "known_values",
                    asset=key,
                    description="Warns about source values or interaction statuses outside the documented sets.",
                )
            ],
            tags={"userpilot_sync/role": "export", "userpilot_sync/event_type": event_type},
            **common,
        )
        def export(context: dg.AssetExecutionContext, raw_events: dict):
            partitions, refused = guard(context)
            exports, failed = {}, dict(refused)
            for pk in partitions:
                staged = raw_events.get(pk)
                if staged is None:
                    failed[pk] = (f"sync job {job.name!r}, partition {pk}: no staged raw events (staging is removed "
                                  f"once a partition's manifest is written); materialize {job.name}/raw_events "
                                  f"together with the exports of this partition.")
                elif staged.error:
                    failed[pk] = staged.error
                else:
                    exports[pk] = load_prepared(staged.root / "prepared" / event_type)
            if failed and (len(context.partition_keys) == 1 or not exports):
                raise ValidationError("\n".join(failed[pk] for pk in sorted(failed)))
            for pk, message in sorted(failed.items()):
                context.log.error(message)
            yield dg.Output(ExportBatch(event_type, exports, failed))
            unknown_sources: dict[str, int] = {}
            unknown_statuses: dict[str, int] = {}
            entities: dict[str, int] = {}
            for prepared in exports.values():
                for target, values in ((unknown_sources, prepared.unknown_sources),
                                       (unknown_statuses, prepared.unknown_statuses),
                                       (entities, prepared.entity_types)):
                    for value, n in values.items():
                        target[value] = target.get(value, 0) + n
            yield dg.AssetCheckResult(
                check_name="known_values",
                passed=not (unknown_sources or unknown_statuses),
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"unknown_values": dg.MetadataValue.json({"source": unknown_sources, "interaction_status": unknown_statuses}),
                          "entity_types": dg.MetadataValue.json(entities)},
            )

        return export

    exports = [make_export(et) for et in job.event_types]

    # ---------------------------------------------------------------- manifest
    # Re-materialize the manifest of a partition whose exports were updated without it (a user
    # materialized a subset); a run that includes the manifest resets the condition.
    automation = (
        dg.AutomationCondition.any_deps_updated().since(
            dg.AutomationCondition.newly_requested() | dg.AutomationCondition.newly_updated()
        )
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    )

    @dg.asset(
        key=manifest_key,
        deps=list(export_keys.values()),
        description="The manifest of one UTC day (_manifest.json), written last: every export's files with rows, bytes and sha256.",
        kinds={"json", dest_kind},
        io_manager_key=destination_io_manager_key(job),
        automation_condition=automation,
        check_specs=[
            dg.AssetCheckSpec(
                "all_days_exported",
                asset=manifest_key,
                description="Fails when a day of the run got no manifest (it broke the schema).",
            )
        ],
        tags={"userpilot_sync/role": "manifest"},
        **common,
    )
    def manifest(context: dg.AssetExecutionContext):
        partitions, refused = guard(context)
        instance = context.instance
        manifests, failed = {}, {}
        for partition in partitions:
            try:
                manifests[partition] = _manifest_of(instance, partition, context.run_id)
            except UserpilotSyncError as exc:
                if len(context.partition_keys) == 1:
                    raise
                failed[partition] = str(exc)
        if not manifests:
            raise UserpilotSyncError("\n".join({**refused, **failed}[pk] for pk in sorted({**refused, **failed})))
        for pk, message in sorted(refused.items()):
            context.log.warning(message)
        # The output is handled (manifests written, metadata recorded per day) before anything
        # below can fail the step, so the good days of a range keep their records.
        yield dg.Output(ManifestBatch(manifests, {**refused, **failed}))
        yield dg.AssetCheckResult(
            check_name="all_days_exported",
            passed=not failed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"failed": dg.MetadataValue.json(failed), "refused": dg.MetadataValue.json(refused),
                      "exported": dg.MetadataValue.json(sorted(manifests))},
        )
        if failed:
            raise UserpilotSyncError(
                f"sync job {job.name!r}: {len(failed)} partition(s) of this run failed and got no manifest "
                f"(the other {len(manifests)} were exported completely):\n"
                + "\n".join(f"  {pk}: " + msg.replace("\n", "\n    ") for pk, msg in sorted(failed.items()))
                + "\nFix the source data and re-run those partitions."
            )

    def _manifest_of(instance: dg.DagsterInstance, partition: str, run_id: str) -> dict:
        files = []
        rows: dict[str, int] = {}
        export_runs: dict[str, str] = {}
        dupes = filtered = 0
        missing, bad = [], {}
        for event_type, key in export_keys.items():
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
            ).records
            mat = records[0].asset_materialization if records else None
            failure = (metadata_value(mat, FAILED_KEY) or {}).get(partition)
            counts = (metadata_value(mat, COUNTS_KEY) or {}).get(partition)
            if failure:
                bad[event_type] = failure
                continue
            if mat is None or counts is None:
                missing.append(event_type)
                continue
            files.extend(files_from_metadata(metadata_value(mat, FILES_KEY), partition))
            rows[event_type] = int(counts.get("rows", 0))
            dupes += int(counts.get("duplicates_dropped", 0))
            filtered += int(counts.get("filtered_out", 0))
            export_runs[event_type] = records[0].run_id
        if bad:
            messages = sorted(set(bad.values()))  # a day-level failure is shared by every export
            raise UserpilotSyncError(
                f"sync job {job.name!r}, partition {partition}: the day failed validation, so it gets no "
                f"manifest:\n" + "\n".join(messages)
            )
        if missing:
            raise UserpilotSyncError(
                f"sync job {job.name!r}, partition {partition}: export(s) {missing} have not been materialized for "
                f"this partition; materialize them (with {job.name}/raw_events) before the manifest."
            )
        raw = latest_materialization(instance, raw_key, partition)
        staged = (metadata_value(raw, STAGED_KEY) or {}).get(partition, {})
        source = dict(staged.get("source") or {})
        day_from, day_to = day_window(parse_partition(partition))
        if source.get("window_from") != day_from.isoformat() or source.get("window_to") != day_to.isoformat():
            # a backfill range: one extraction covered several days
            source["extraction_window"] = {"from": source.get("window_from"), "to": source.get("window_to")}
        source.update(window_from=day_from.isoformat(), window_to=day_to.isoformat())
        source.update(
            source_rows=int(staged.get("source_rows", 0)),
            rows_outside_window=int(staged.get("rows_outside_window", 0)),
            unknown_columns=staged.get("unknown_columns", []),
            duplicates_dropped=dupes,
            filtered_out=filtered,
            export_runs=export_runs,
        )
        superseded = superseded_paths(_earlier_paths(instance, partition), files)
        allow_deletes = bool(getattr(job.destination, "allow_deletes", False))
        start, end = day_window(parse_partition(partition))
        return build_manifest(
            sync_job=job.name, sync_id=job.sync_id, app_token=job.app_token, title=job.title,
            partition=partition, window_from=start, window_to=end, run_id=run_id,
            settings=job.settings_summary(), source=source, event_types=rows, files=files,
            superseded=superseded, deleted=superseded if allow_deletes else [],
        )

    def _earlier_paths(instance: dg.DagsterInstance, partition: str) -> set[str]:
        """Every path an earlier export of this partition wrote and has not deleted (from the instance).

        The union over all recorded export and manifest materializations, not only the last
        manifest: a run that failed before its manifest may have written parts that are now gone
        from the new file list, and readers must be told about them.
        """
        events = []
        for key in [*export_keys.values(), manifest_key]:
            events.extend(
                instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1000
                ).records
            )
            events.extend(  # partial writes of failed steps (see DestinationIOManager)
                instance.fetch_observations(
                    dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1000
                ).records
            )
        paths: set[str] = set()
        for record in sorted(events, key=lambda r: r.storage_id):  # oldest first
            mat = record.asset_materialization or record.asset_observation
            paths |= {f["path"] for f in (metadata_value(mat, FILES_KEY) or {}).get(partition, [])}
            paths |= set((metadata_value(mat, "superseded") or {}).get(partition, []))
            paths -= set((metadata_value(mat, "deleted") or {}).get(partition, []))
        return paths

    assets = [raw_events, *exports, manifest]
    jobs = []
    extra_schedules = []
    if job.source.kind in ("demo", "export_api"):
        definitions_key = dg.AssetKey([job.name, "definitions"])

        @dg.asset(
            key=definitions_key,
            description="Lookups (flows, checklists, surveys, feature tags, segments, properties, ...) that name the ids in the exports.",
            kinds={"pandera", dest_kind, "parquet"},
            io_manager_key=destination_io_manager_key(job),
            group_name=job.name,
            owners=owners,
            tags={"userpilot_sync/role": "definitions"},
        )
        def definitions(context: dg.AssetExecutionContext) -> LookupTables:
            if not job.enabled:
                raise UserpilotSyncError(f"sync job {job.name!r} is disabled: definitions are not refreshed")
            check_destination_unchanged(context.instance, job, guard.destination_keys + [definitions_key])
            from userpilot_sync.source.lookups import definitions_for_job

            return LookupTables(definitions_for_job(job))

        assets.append(definitions)
        guard.destination_keys.append(definitions_key)
        definitions_job = dg.define_asset_job(
            name=f"{job.name}_definitions_refresh",
            selection=dg.AssetSelection.assets(definitions_key),
            description=f"Refresh the lookup definitions of sync job {job.name!r}.",
            tags={SYNC_JOB_TAG: job.name},
        )
        jobs.append(definitions_job)
        extra_schedules.append(
            dg.ScheduleDefinition(
                name=f"{job.name}_definitions_refresh",
                cron_schedule=DAILY_CRON,
                execution_timezone="UTC",
                job=definitions_job,
                default_status=dg.DefaultScheduleStatus.RUNNING if (job.enabled and job.schedules_running) else dg.DefaultScheduleStatus.STOPPED,
                description=f"Daily 03:00 UTC refresh of {job.name!r}'s lookup definitions.",
            )
        )

    # ---------------------------------------------------------------- jobs and schedules
    selection = dg.AssetSelection.assets(raw_key, *export_keys.values(), manifest_key)
    sync_job_def = dg.define_asset_job(
        name=f"{job.name}_sync",
        selection=selection,
        partitions_def=parts,
        description=f"Export one UTC day of sync job {job.name!r}: raw events, every event type, manifest.",
        tags={SYNC_JOB_TAG: job.name},
    )
    running = dg.DefaultScheduleStatus.RUNNING if (job.enabled and job.schedules_running) else dg.DefaultScheduleStatus.STOPPED

    def requests(context: dg.ScheduleEvaluationContext, partitions_at, kind: str):
        """One run per partition that ``partitions_at(job, tick)`` selects, or why none."""
        keys = partitions_at(job, context.scheduled_execution_time.astimezone(timezone.utc))
        if not keys:
            return dg.SkipReason(f"sync job {job.name!r} is disabled" if not job.enabled else "no partition in the window")
        return [
            dg.RunRequest(run_key=f"{kind}:{pk}", partition_key=pk, tags={**run_tags(job, pk), "userpilot_sync/trigger": kind})
            for pk in keys
        ]

    @dg.schedule(
        name=f"{job.name}_{job.frequency}_sync",
        cron_schedule=sync_cron(job),
        execution_timezone="UTC",
        job=sync_job_def,
        default_status=running,
        description=(
            f"{job.frequency.capitalize()} sync of {job.name!r} at 03:00 UTC: "
            + ("yesterday's partition." if job.frequency == "daily" else "the previous 7 days (Mondays).")
        ),
    )
    def sync_schedule(context: dg.ScheduleEvaluationContext):
        return requests(context, sync_partitions, job.frequency)

    schedules = [sync_schedule, *extra_schedules]
    if job.sync_back is not None:

        @dg.schedule(
            name=f"{job.name}_sync_back",
            cron_schedule=sync_back_cron(job),
            execution_timezone="UTC",
            job=sync_job_def,
            default_status=running,
            description=(
                f"Weekly sync back of {job.name!r} ({job.sync_back.weekday}s {job.sync_back.hour:02d}:00 UTC): "
                f"re-exports the trailing {job.sync_back.days} days in place."
            ),
        )
        def sync_back_schedule(context: dg.ScheduleEvaluationContext):
            return requests(context, sync_back_partitions, "sync_back")

        schedules.append(sync_back_schedule)

    sensors = []
    if job.backfill_days > 0:

        @dg.sensor(
            name=f"{job.name}_initial_backfill",
            asset_selection=selection,
            minimum_interval_seconds=60,
            default_status=(
                dg.DefaultSensorStatus.RUNNING if (job.enabled and job.schedules_running) else dg.DefaultSensorStatus.STOPPED
            ),
            description=f"Requests the initial backfill of {job.name!r} ({job.backfill_days} days) once, when the sync job is first enabled.",
        )
        def initial_backfill(context: dg.SensorEvaluationContext):
            if context.cursor == "requested":
                return dg.SkipReason("the initial backfill was already requested")
            if not job.enabled:
                return dg.SkipReason(f"sync job {job.name!r} is disabled")
            keys = initial_backfill_partitions(job, datetime.now(timezone.utc))
            context.update_cursor("requested")
            if not keys:
                return dg.SkipReason("no partition in the window")
            return dg.SensorResult(
                run_requests=[
                    dg.RunRequest.for_asset_graph_subset(
                        asset_graph_subset=_subset(context, [raw_key, *export_keys.values(), manifest_key], parts, keys),
                        tags={SYNC_JOB_TAG: job.name, "userpilot_sync/trigger": "initial_backfill"},
                    )
                ]
            )

        sensors.append(initial_backfill)

    @dg.op(
        name=f"{job.name}_check_destination_op",
        description=f"Uploads one small marker object to {job.name!r}'s destination with the sync's own permissions.",
        tags={SYNC_JOB_TAG: job.name},
    )
    def check_destination_op(context: dg.OpExecutionContext) -> dg.Nothing:
        from userpilot_sync.destination.check import check_destination
        from userpilot_sync.destination.factory import build_storage

        check_destination_unchanged(context.instance, job, guard.destination_keys)
        result = check_destination(job, build_storage(job))
        context.add_output_metadata({"uri": result.uri, "steps": dg.MetadataValue.json(result.steps)})
        if not result.ok:
            raise DestinationError(f"sync job {job.name!r}: destination check failed: {result.message}")
        context.log.info(result.message)

    @dg.job(
        name=f"{job.name}_check_destination",
        description=f"Verify {job.name!r}'s destination before the first sync: write one marker object, report what failed.",
        tags={SYNC_JOB_TAG: job.name},
    )
    def check_destination_job():
        check_destination_op()

    jobs.append(check_destination_job)

    return dg.Definitions(
        assets=assets,
        jobs=[sync_job_def, *jobs],
        schedules=schedules,
        sensors=sensors,
        resources={destination_io_manager_key(job): DestinationIOManager(job, staging_root)},
    )


def _subset(context, keys, parts, partition_keys):
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

    subset = parts.empty_subset().with_partition_keys(partition_keys)
    return AssetGraphSubset(partitions_subsets_by_asset_key={k: subset for k in keys})
