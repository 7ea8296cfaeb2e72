"""Schedules and sensors of a sync job, and the project's partition-window sensor.

* ``<job>_daily_sync`` (03:00 UTC, yesterday) or ``<job>_weekly_sync`` (Mondays 03:00 UTC, the
  previous 7 days): one run per day.
* ``<job>_sync_back`` (weekly, for sync jobs that set ``sync_back``): re-exports the trailing days.
* ``<job>_lookups_refresh`` (03:00 UTC): refreshes ``<job>/lookups``.
* ``<job>_initial_backfill`` (sensor, jobs with ``backfill_days``): once, ranged runs of
  ``backfill_days_per_run`` days over the initial backfill.
* ``userpilot_partition_window`` (sensor, every 5 minutes): keeps every sync job's partitions
  equal to its 365-day window (``defs/partitions.py``).

Which days a tick exports is plain Python (``scheduling.py``); every tick first makes sure those
days exist as partitions. Every run request carries the sync-job and trigger tags.
"""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg

from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, sync_window_partitions
from userpilot_sync.scheduling import (
    DAILY_CRON,
    initial_backfill_partitions,
    sync_back_cron,
    sync_back_partitions,
    sync_cron,
    sync_partitions,
)


def _status(keys: SyncJobKeys) -> dg.DefaultScheduleStatus:
    job = keys.job
    return dg.DefaultScheduleStatus.RUNNING if (job.enabled and job.schedules_running) else dg.DefaultScheduleStatus.STOPPED


def _requests(context: dg.ScheduleEvaluationContext, keys: SyncJobKeys, partitions_at, trigger: str):
    """One run per partition that ``partitions_at(job, tick)`` selects, or why none."""
    job = keys.job
    tick = context.scheduled_execution_time.astimezone(timezone.utc)
    days = partitions_at(job, tick)
    if not days:
        return dg.SkipReason(f"sync job {job.name!r} is disabled" if not job.enabled else "no partition in the window")
    sync_window_partitions(context.instance, keys, tick)
    return [dg.RunRequest(run_key=f"{trigger}:{pk}", partition_key=pk, tags=keys.run_tags(trigger)) for pk in days]


def build_schedules(keys: SyncJobKeys, sync_job,
                    lookups_job) -> list[dg.ScheduleDefinition]:
    """The sync job's regular sync, sync back and lookups refresh schedules."""
    job = keys.job
    status = _status(keys)

    @dg.schedule(
        name=f"{job.name}_{job.frequency}_sync", cron_schedule=sync_cron(job), execution_timezone="UTC",
        job=sync_job, default_status=status,
        description=(f"{job.frequency.capitalize()} sync of {job.name!r} at 03:00 UTC: "
                     + ("yesterday's partition." if job.frequency == "daily" else "the previous 7 days (Mondays).")),
    )
    def regular_sync(context: dg.ScheduleEvaluationContext):
        return _requests(context, keys, sync_partitions, job.frequency)

    schedules = [regular_sync]
    if job.sync_back is not None:

        @dg.schedule(
            name=f"{job.name}_sync_back", cron_schedule=sync_back_cron(job), execution_timezone="UTC",
            job=sync_job, default_status=status,
            description=(f"Weekly sync back of {job.name!r} ({job.sync_back.weekday}s {job.sync_back.hour:02d}:00 UTC): "
                         f"re-exports the trailing {job.sync_back.days} days in place."),
        )
        def sync_back(context: dg.ScheduleEvaluationContext):
            return _requests(context, keys, sync_back_partitions, "sync_back")

        schedules.append(sync_back)
    if lookups_job is not None:
        schedules.append(dg.ScheduleDefinition(
            name=keys.lookups_job_name, cron_schedule=DAILY_CRON, execution_timezone="UTC", job=lookups_job,
            default_status=status, description=f"Daily 03:00 UTC refresh of {job.name!r}'s lookups.",
            tags=keys.run_tags("lookups_refresh"),
        ))
    return schedules


def backfill_ranges(days: list[str], per_run: int) -> list[tuple[str, str]]:
    """(first, last) day of each run of a backfill of ``days`` (consecutive), ``per_run`` days each."""
    return [(days[i], days[min(i + per_run, len(days)) - 1]) for i in range(0, len(days), per_run)]


def build_initial_backfill_sensor(keys: SyncJobKeys, sync_job) -> dg.SensorDefinition:
    """Requests the initial backfill once, as ranged runs of ``backfill_days_per_run`` days."""
    job = keys.job

    @dg.sensor(
        name=f"{job.name}_initial_backfill", job=sync_job, minimum_interval_seconds=60,
        default_status=(dg.DefaultSensorStatus.RUNNING if (job.enabled and job.schedules_running)
                        else dg.DefaultSensorStatus.STOPPED),
        description=f"Requests the initial backfill of {job.name!r} ({job.backfill_days} days) once, when the sync job "
                    f"is first enabled.",
    )
    def initial_backfill(context: dg.SensorEvaluationContext):
        if context.cursor == "requested":
            return dg.SkipReason("the initial backfill was already requested")
        if not job.enabled:
            return dg.SkipReason(f"sync job {job.name!r} is disabled")
        now = datetime.now(timezone.utc)
        days = initial_backfill_partitions(job, now)
        context.update_cursor("requested")
        if not days:
            return dg.SkipReason("no partition in the window")
        sync_window_partitions(context.instance, keys, now)
        return [
            dg.RunRequest(run_key=f"initial_backfill:{first}..{last}",
                          tags={**keys.run_tags("initial_backfill"), RANGE_START_TAG: first, RANGE_END_TAG: last})
            for first, last in backfill_ranges(days, job.backfill_days_per_run)
        ]

    return initial_backfill


def build_partition_window_sensor(all_keys: list[SyncJobKeys]) -> dg.SensorDefinition:
    """The project's sensor that rolls every sync job's partitions with the 365-day window."""

    @dg.sensor(
        name="userpilot_partition_window", minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keeps each sync job's partitions equal to its 365-day window: adds the days that entered it, "
                    "removes the days that left it (kept while an in-progress backfill or run targets them).",
    )
    def partition_window(context: dg.SensorEvaluationContext):
        lines = [f"{keys.name}: {sync_window_partitions(context.instance, keys).summary()}" for keys in all_keys]
        return dg.SkipReason("; ".join(lines) or "no sync jobs")

    return partition_window


def build_snapshot_sensor(keys: SyncJobKeys, sync_job, staging_root) -> dg.SensorDefinition:
    """Recomputes stale snapshots (``all_users``/``all_companies``) in one range run.

    A re-export of day D (sync back, late data, a backfill of older days) leaves the snapshots of
    the recorded days after D stale (``documented/state.py``). This sensor reads the sync job's
    snapshot state store and requests one run of ``<job>_sync`` over the first stale day .. the
    newest recorded day (inside the window), tagged ``userpilot_sync/snapshot_refresh``; the run
    re-exports those days in order, so every day and its manifest stay one unit.
    """
    job = keys.job

    @dg.sensor(
        name=keys.snapshot_sensor_name, job=sync_job, minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING if job.enabled else dg.DefaultSensorStatus.STOPPED,
        description=f"Re-exports the days of {job.name!r} whose user/company snapshots became stale after an earlier "
                    f"day was re-exported, in one range run.",
    )
    def snapshot_refresh(context: dg.SensorEvaluationContext):
        return snapshot_refresh_request(context.instance, keys, staging_root)

    return snapshot_refresh


def snapshot_refresh_request(instance: dg.DagsterInstance, keys: SyncJobKeys, staging_root):
    """The run request recomputing the sync job's stale snapshots, or why there is none."""
    from userpilot_sync.defs.keys import SNAPSHOT_REFRESH_TAG, SYNC_JOB_TAG
    from userpilot_sync.documented.state import SnapshotStore, backend_for
    from userpilot_sync.partitions import window_partition_keys

    job = keys.job
    if not job.enabled:
        return dg.SkipReason(f"sync job {job.name!r} is disabled")
    store = SnapshotStore(backend_for(job, staging_root), job.name, job.state.checkpoint_every_days)
    window = set(window_partition_keys(start=job.partitions_start))
    stale = [d for d in store.stale_days() if d in window]
    if not stale:
        return dg.SkipReason("no stale snapshot")
    active = instance.get_runs(dg.RunsFilter(
        tags={SYNC_JOB_TAG: job.name},
        statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                  dg.DagsterRunStatus.STARTED]), limit=1)
    if active:
        return dg.SkipReason(f"stale snapshots from {stale[0]}; waiting for run {active[0].run_id} of the sync job to end")
    first, last = stale[0], stale[-1]
    sync_window_partitions(instance, keys)
    basis = store.index["days"][first]["basis"][:16]
    return dg.RunRequest(
        run_key=f"snapshot_refresh:{first}..{last}:{basis}",
        tags={**keys.run_tags("snapshot_refresh"), RANGE_START_TAG: first, RANGE_END_TAG: last,
              SNAPSHOT_REFRESH_TAG: first})
