"""What a notification says: :class:`Notice` and its JSON body (:func:`payload`).

A notice is one event of one sync job and (usually) one UTC day:

* ``failed`` — a day failed or was refused;
* ``late`` — a day was not exported by its deadline (``checks.deadline_hours``);
* ``check_failed`` — a check of a day ended at WARN or ERROR;
* ``exported`` — a day's manifest was written.

``dedup_key`` is ``"<sync_job>:<partition>:<event>"`` (``partition`` empty when the notice has no
day): the :class:`~userpilot_sync.notify.notifier.Notifier` sends each key once per receiver
until the day is re-armed (exported again), and receivers may use it to fold repeats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from userpilot_sync.config.model import NOTIFY_EVENTS, SyncJob

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
#: Version of the JSON body (``payload``); bumped only on incompatible changes.
PAYLOAD_VERSION = 1


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("occurred_at needs a timezone (UTC)")
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Notice:
    """One event of one sync job (and day) to announce.

    ``run_url`` is filled per receiver from its ``ui_url`` (``<ui_url>/runs/<run_id>``) when the
    notice has a ``run_id``; ``occurred_at`` is UTC ISO 8601 (``2026-03-10T09:00:00Z``).
    """

    event: str
    sync_job: str
    sync_id: str
    app_token: str
    partition: str | None
    run_id: str | None
    message: str
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)
    occurred_at: str = field(default_factory=lambda: _iso(utc_now()))
    run_url: str | None = None

    def __post_init__(self) -> None:
        if self.event not in NOTIFY_EVENTS:
            raise ValueError(f"unknown notification event {self.event!r}; valid events: {', '.join(NOTIFY_EVENTS)}")
        if self.partition is not None and not _DAY.fullmatch(self.partition):
            raise ValueError(f"partition {self.partition!r} is not a UTC day (YYYY-MM-DD)")

    @classmethod
    def for_job(
        cls,
        job: SyncJob,
        event: str,
        *,
        partition: str | None,
        message: str,
        run_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> "Notice":
        """A notice of ``job`` (its name, sync id and app token filled in), occurring now (``clock``)."""
        return cls(
            event=event, sync_job=job.name, sync_id=job.sync_id, app_token=job.app_token, partition=partition,
            run_id=run_id, message=message, details=dict(details or {}), occurred_at=_iso((clock or utc_now)()),
        )

    @property
    def dedup_key(self) -> str:
        """``"<sync_job>:<partition>:<event>"`` (partition empty when there is no day)."""
        return f"{self.sync_job}:{self.partition or ''}:{self.event}"

    def with_ui(self, ui_url: str | None) -> "Notice":
        """This notice with ``run_url = <ui_url>/runs/<run_id>`` when both are known (else unchanged)."""
        if ui_url and self.run_id:
            return replace(self, run_url=f"{ui_url.rstrip('/')}/runs/{self.run_id}")
        return self


def payload(notice: Notice) -> dict[str, Any]:
    """The JSON body every receiver gets (webhook body, SNS message; Slack renders it as text)."""
    return {
        "version": PAYLOAD_VERSION,
        "event": notice.event,
        "sync_job": notice.sync_job,
        "sync_id": notice.sync_id,
        "app_token": notice.app_token,
        "partition": notice.partition,
        "run_id": notice.run_id,
        "run_url": notice.run_url,
        "message": notice.message,
        "details": dict(notice.details),
        "dedup_key": notice.dedup_key,
        "occurred_at": notice.occurred_at,
    }
