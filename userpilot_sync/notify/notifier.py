"""Send a sync job's notices to the entries of its ``notifications`` list, once per receiver.

Rules (docs/operations.md, "Receiving notifications"):

* a notice goes to every entry whose ``on`` lists its event, one after the other;
* **once per (sync job, day, event) and receiver**: a notice whose ``dedup_key`` an entry has
  already received is skipped (outcome ``duplicate``) — until :meth:`Notifier.rearm` clears the
  day. Call ``rearm(job, day)`` when a day is exported successfully, *then* notify ``exported``:
  a later failure of that day is sent again, and every (re-)export is announced;
* a notice without a day (``partition=None``) is never deduplicated;
* a delivery is recorded only after it succeeded: a failed one (outcome ``failed``) is sent again
  by the next ``notify`` of the same notice (at least once). Two processes notifying the same
  notice at the same moment may both send it; receivers fold repeats by ``dedup_key``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Literal, Mapping

from userpilot_sync.config.model import NOTIFY_EVENTS, SyncJob
from userpilot_sync.notify.dedupe import DedupeStore
from userpilot_sync.notify.delivery import Entry, NotificationError, RetryPolicy, deliver
from userpilot_sync.notify.notice import Notice, utc_now

log = logging.getLogger(__name__)

#: Prefix of every key the notifier writes to its DedupeStore.
KEY_PREFIX = "userpilot_sync/notify/"


@dataclass(frozen=True)
class Outcome:
    """What happened to one notice at one entry.

    ``status``: ``sent`` (delivered, after ``attempts`` requests), ``duplicate`` (this entry already
    got this ``dedup_key``; nothing sent) or ``failed`` (``error`` says why, naming the sync job and
    the entry, never a secret; the next notify sends it again).
    """

    entry: str  # notifications[1] (slack)
    kind: str
    event: str
    dedup_key: str
    status: Literal["sent", "duplicate", "failed"]
    attempts: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def entry_label(index: int, entry: Entry) -> str:
    """How messages name an entry: ``notifications[1] (slack)``."""
    return f"notifications[{index}] ({entry.kind})"


def entry_id(entry: Entry) -> str:
    """A stable id of the receiver (kind + URL / env var name / topic), independent of list order."""
    return hashlib.sha256(f"{entry.kind}\n{entry.target}".encode()).hexdigest()[:16]


class Notifier:
    """The notifications of one sync job.

    ``dedupe`` remembers what was sent (the Dagster instance's key-value storage in Dagster:
    ``DagsterKVDedupe(instance)``); ``clock`` returns the current UTC time (signatures, records);
    ``retry`` bounds each delivery; ``environ`` is where secrets are read (default ``os.environ``,
    read at every send).
    """

    def __init__(
        self,
        job: SyncJob,
        *,
        dedupe: DedupeStore,
        clock: Callable[[], datetime] | None = None,
        retry: RetryPolicy | None = None,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.job = job
        self.dedupe = dedupe
        self.clock = clock or utc_now
        self.retry = retry or RetryPolicy()
        self.environ = environ
        self.sleep = sleep or time.sleep

    def notice(self, event: str, *, partition: str | None, message: str, run_id: str | None = None,
               details: Mapping | None = None) -> Notice:
        """A :class:`Notice` of this sync job occurring now."""
        return Notice.for_job(self.job, event, partition=partition, message=message, run_id=run_id,
                              details=details, clock=self.clock)

    def entries_for(self, event: str) -> list[tuple[int, Entry]]:
        """The (index, entry) pairs whose ``on`` lists ``event``."""
        return [(i, e) for i, e in enumerate(self.job.notifications) if event in e.on]

    def _key(self, dedup_key: str, entry: Entry) -> str:
        return f"{KEY_PREFIX}{dedup_key}:{entry_id(entry)}"

    def notify(self, notice: Notice) -> list[Outcome]:
        """Send ``notice`` to every entry subscribed to its event; one :class:`Outcome` per entry.

        Never raises for a failed delivery (see the outcomes; each failure is also logged as a
        warning). Raises ValueError for a notice of another sync job.
        """
        if notice.sync_job != self.job.name:
            raise ValueError(f"notice of sync job {notice.sync_job!r} given to the notifier of {self.job.name!r}")
        outcomes = []
        for index, entry in self.entries_for(notice.event):
            label = entry_label(index, entry)
            key = self._key(notice.dedup_key, entry) if notice.partition else None
            if key and self.dedupe.get(key):
                outcomes.append(Outcome(label, entry.kind, notice.event, notice.dedup_key, "duplicate"))
                continue
            try:
                attempts = deliver(entry, notice, label=label, retry=self.retry, environ=self.environ,
                                   clock=self.clock, sleep=self.sleep)
            except NotificationError as exc:
                log.warning("%s", exc)
                outcomes.append(Outcome(label, entry.kind, notice.event, notice.dedup_key, "failed",
                                        exc.attempts, str(exc)))
                continue
            except Exception as exc:  # a library error (e.g. botocore credential refresh): never fails a run
                message = f"sync job {self.job.name!r}: {label}: the {notice.event} notice was not sent ({type(exc).__name__})"
                log.warning("%s", message)
                outcomes.append(Outcome(label, entry.kind, notice.event, notice.dedup_key, "failed", 1, message))
                continue
            if key:
                self.dedupe.set(key, json.dumps({"sent_at": self.clock().isoformat(), "run_id": notice.run_id}))
            log.info("sync job %r: %s: sent the %s notice %s (%d attempt(s))", self.job.name, label, notice.event,
                     notice.dedup_key, attempts)
            outcomes.append(Outcome(label, entry.kind, notice.event, notice.dedup_key, "sent", attempts))
        return outcomes

    def rearm(self, sync_job: str, partition: str, events: tuple[str, ...] = NOTIFY_EVENTS) -> None:
        """Forget every notice of ``partition`` (all events, all entries): the next ones are sent again.

        Call it when the day is exported successfully (before notifying ``exported``).
        """
        if sync_job != self.job.name:
            raise ValueError(f"rearm of sync job {sync_job!r} asked of the notifier of {self.job.name!r}")
        for event in events:
            for _, entry in self.entries_for(event):
                key = self._key(f"{sync_job}:{partition}:{event}", entry)
                if self.dedupe.get(key):
                    self.dedupe.set(key, None)
