"""Which partitions a schedule tick exports (plain Python; the Dagster schedules call this).

All times are UTC. For a tick at instant T (its UTC day D = T's date):

* daily sync (``frequency: daily``), cron ``0 3 * * *``: [D - 1] (yesterday);
* weekly sync (``frequency: weekly``), cron ``0 3 * * 1`` (Mondays): [D - 7, ..., D - 1];
* sync back (``sync_back: {weekday, hour, days}``), cron ``0 <hour> * * <weekday>``:
  [D - days, ..., D - 1], each day once, clipped to the 365-day window and to
  ``partitions_start``.

A disabled sync job yields no partitions.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from userpilot_sync.config.model import WEEKDAYS, SyncJob
from userpilot_sync.partitions import utc_today, window_bounds

DAILY_CRON = "0 3 * * *"
WEEKLY_CRON = "0 3 * * 1"


def sync_cron(job: SyncJob) -> str:
    """Cron of the sync job's regular sync (UTC)."""
    return WEEKLY_CRON if job.frequency == "weekly" else DAILY_CRON


def sync_back_cron(job: SyncJob) -> str | None:
    """Cron of the sync job's sync back (UTC), or None when it has none."""
    if job.sync_back is None:
        return None
    dow = (WEEKDAYS.index(job.sync_back.weekday) + 1) % 7  # cron: 0 = Sunday
    return f"0 {job.sync_back.hour} * * {dow}"


def _clip(job: SyncJob, days: list[date], tick: datetime) -> list[str]:
    oldest, newest = window_bounds(tick)
    if job.partitions_start is not None:
        oldest = max(oldest, job.partitions_start)
    return [d.isoformat() for d in days if oldest <= d <= newest]


def sync_partitions(job: SyncJob, tick: datetime) -> list[str]:
    """Partition keys the regular (daily or weekly) sync exports at ``tick``, oldest first."""
    if not job.enabled:
        return []
    today = utc_today(tick)
    n = 7 if job.frequency == "weekly" else 1
    return _clip(job, [today - timedelta(days=i) for i in range(n, 0, -1)], tick)


def sync_back_partitions(job: SyncJob, tick: datetime) -> list[str]:
    """Partition keys the sync back re-exports at ``tick``, oldest first (each once)."""
    if not job.enabled or job.sync_back is None:
        return []
    today = utc_today(tick)
    return _clip(job, [today - timedelta(days=i) for i in range(job.sync_back.days, 0, -1)], tick)


def initial_backfill_partitions(job: SyncJob, now: datetime) -> list[str]:
    """Partition keys of the initial backfill requested when a sync job is first enabled."""
    if not job.enabled or job.backfill_days <= 0:
        return []
    today = utc_today(now)
    return _clip(job, [today - timedelta(days=i) for i in range(job.backfill_days, 0, -1)], now)


def export_deadline(job: SyncJob, day: date) -> datetime:
    """When day ``day`` must be exported at the latest (UTC): the regular sync's tick that exports
    it (daily: the next day at 03:00; weekly: the first Monday 03:00 after the day) plus
    ``checks.deadline_hours``. Later than that, a day without a complete manifest is ``late``."""
    from datetime import time, timezone

    tick_day = day + timedelta(days=1)
    if job.frequency == "weekly":
        tick_day += timedelta(days=(7 - tick_day.weekday()) % 7)  # Monday = 0
    tick = datetime.combine(tick_day, time(3, 0), tzinfo=timezone.utc)
    return tick + timedelta(hours=job.checks.deadline_hours)
