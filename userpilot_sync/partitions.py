"""Partitions (UTC days) and the 365-day window rule.

A partition is one UTC day, key ``YYYY-MM-DD``, covering [00:00, 24:00) UTC of ``inserted_at``.
A run may export day D only when D has ended (D < the run's own UTC day) and D is at most
365 days before the run's own UTC day (D >= today - 365). Everything else is refused with
:class:`~userpilot_sync.errors.WindowError` before anything is written.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from userpilot_sync.errors import WindowError

MAX_WINDOW_DAYS = 365


def parse_partition(key: str) -> date:
    """The day of a partition key ``YYYY-MM-DD``; raises ValueError otherwise."""
    try:
        return date.fromisoformat(key)
    except ValueError:
        raise ValueError(f"partition key {key!r} is not a UTC day of the form YYYY-MM-DD") from None


def day_window(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day as tz-aware datetimes."""
    start = datetime.combine(day, time(0), tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


def utc_today(now: datetime | None = None) -> date:
    """Today's UTC date (``now`` may be injected)."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).date()


def window_bounds(now: datetime | None = None) -> tuple[date, date]:
    """(oldest, newest) day a run at ``now`` may export: [today - 365, today - 1]."""
    today = utc_today(now)
    return today - timedelta(days=MAX_WINDOW_DAYS), today - timedelta(days=1)


def check_in_window(sync_job: str, day: date, now: datetime | None = None) -> None:
    """Raise WindowError unless ``day`` is inside the 365-day window at ``now``."""
    oldest, newest = window_bounds(now)
    if day > newest:
        raise WindowError(
            f"sync job {sync_job!r}, partition {day.isoformat()}: the UTC day has not ended yet "
            f"(the newest day that can be exported now is {newest.isoformat()}); nothing was written"
        )
    if day < oldest:
        raise WindowError(
            f"sync job {sync_job!r}, partition {day.isoformat()}: older than the 365-day window "
            f"(the oldest day that can be exported today is {oldest.isoformat()}); nothing was written"
        )


def last_complete_days(n: int, now: datetime | None = None) -> list[date]:
    """The last ``n`` complete UTC days, oldest first."""
    today = utc_today(now)
    return [today - timedelta(days=i) for i in range(n, 0, -1)]


def window_partition_keys(now: datetime | None = None, start: date | None = None) -> list[str]:
    """Partition keys a run at ``now`` may export, oldest first: [today - 365, today - 1] UTC,
    no earlier than ``start`` (a sync job's ``partitions_start``) when given."""
    oldest, newest = window_bounds(now)
    if start is not None:
        oldest = max(oldest, start)
    return [(oldest + timedelta(days=i)).isoformat() for i in range((newest - oldest).days + 1)]


def consecutive_days(keys: list[str]) -> bool:
    """True when ``keys`` are consecutive UTC days in ascending order (a valid backfill range)."""
    days = [parse_partition(k) for k in keys]
    return all((b - a).days == 1 for a, b in zip(days, days[1:]))
