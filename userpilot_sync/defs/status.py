"""Every day of a sync job's 365-day window, judged from the ledger (the Dagster instance).

Statuses (``DayStatus.status``):

* ``complete`` / ``empty`` — the day's newest complete manifest (rows / no rows);
* ``replacing`` — a run began to write the day after its last complete manifest and did not finish
  (the destination's manifest says ``replacing``; the next run of the day completes it);
* ``running`` — a run is exporting the day now;
* ``failed`` — no complete manifest, and the newest attempt failed or was refused (``reason``);
* ``late`` — never attempted and its deadline (``scheduling.export_deadline``) has passed, on or
  after the sync job's first exported day;
* ``pending`` — its deadline has not passed yet;
* ``missing`` — never exported, before the sync job's first export (e.g. older than the initial
  backfill).

A complete/empty day whose newest attempt failed keeps its status (its files are intact) and says
so in ``last_attempt``; ``late`` is also set on any day without a complete manifest whose deadline
passed, whatever its status. Nothing is read from the destination.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import dagster as dg

from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.ledger import STATUS_EXPORTED, STATUS_KEY, Ledger, _is_v1, _value
from userpilot_sync.partitions import parse_partition, window_partition_keys
from userpilot_sync.scheduling import export_deadline

_IN_PROGRESS = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                dg.DagsterRunStatus.NOT_STARTED)
READABLE = ("complete", "empty")


@dataclass
class DayStatus:
    """One day of the window: its status, the run and rows behind it, why, and its deadline (UTC)."""

    partition: str
    status: str
    late: bool
    deadline: str
    run_id: str | None = None
    rows: int | None = None
    exported_at: str | None = None
    reason: str | None = None
    last_attempt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _newest(ledger: Ledger, key: dg.AssetKey, days: list[str], keep=lambda record: True) -> dict[str, object]:
    newest: dict[str, object] = {}
    for record in ledger._records(key, days):  # newest first, paged
        if record.partition_key not in newest and keep(record):
            newest[record.partition_key] = record
    return newest


def _exported(record) -> bool:
    event = record.asset_materialization
    return _is_v1(event) or _value(event, STATUS_KEY) == STATUS_EXPORTED


def _when(record) -> str:
    return datetime.fromtimestamp(record.timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def _day_exported_failures(instance: dg.DagsterInstance, keys: SyncJobKeys, days: set[str],
                           limit: int = 2000) -> dict[str, tuple[float, str, str]]:
    """Per day: the newest failed ``day_exported`` check evaluation (timestamp, run id, reason) among
    the check's newest ``limit`` evaluations — the only record of a day whose run failed before it
    wrote anything (e.g. a row that breaks the Event Schema, a refused shrink)."""
    from userpilot_sync.defs.keys import CHECK_DAY_EXPORTED

    key = dg.AssetCheckKey(keys.manifest, CHECK_DAY_EXPORTED)
    newest: dict[str, tuple[float, str, str] | None] = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=limit):
        data = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        if not isinstance(data, dg.AssetCheckEvaluation) or data.partition not in days or data.partition in newest:
            continue
        reason = getattr(data.metadata.get("reason"), "value", None) or data.description or "see the run"
        newest[data.partition] = None if data.passed else (record.event.timestamp, record.run_id, str(reason))
    return {pk: v for pk, v in newest.items() if v is not None}


def day_statuses(instance: dg.DagsterInstance, keys: SyncJobKeys, now: datetime | None = None) -> list[DayStatus]:
    """The status of every day of the sync job's window at ``now`` (UTC), oldest first."""
    job = keys.job
    now = now or datetime.now(timezone.utc)
    days = window_partition_keys(now, job.partitions_start)
    ledger = Ledger(instance, keys)
    manifests = _newest(ledger, keys.manifest, days, keep=_exported)  # a failed re-export keeps the day's files
    raws = _newest(ledger, keys.raw_events, days)
    checks = _day_exported_failures(instance, keys, set(days))
    attempted = sorted(set(manifests) | set(raws) | set(checks))
    first_day = attempted[0] if attempted else None
    runs: dict[str, dg.DagsterRun | None] = {}

    def run_of(run_id: str):
        if run_id not in runs:
            runs[run_id] = instance.get_run_by_id(run_id)
        return runs[run_id]

    out = []
    for pk in days:
        deadline = export_deadline(job, parse_partition(pk))
        m, r = manifests.get(pk), raws.get(pk)
        day = DayStatus(pk, "missing", False, deadline.isoformat())
        if m is not None:
            event = m.asset_materialization
            rows = int(_value(event, "dagster/row_count") or 0)
            day.status = str(_value(event, "manifest_status") or ("complete" if rows else "empty"))
            day.run_id, day.rows, day.exported_at = m.run_id, rows, _when(m)
        if r is not None and (m is None or r.storage_id > m.storage_id) and r.run_id != day.run_id:
            event = r.asset_materialization
            run = run_of(r.run_id)
            began_writing = _is_v1(event) or _value(event, STATUS_KEY) == STATUS_EXPORTED
            reason = _value(event, "reason") or (run.tags.get("userpilot_sync/failure") if run else None) or None
            if run is not None and run.status in _IN_PROGRESS:
                day.status, day.run_id, day.reason = "running", r.run_id, None
            elif began_writing and m is not None:
                day.status, day.run_id = "replacing", r.run_id
                day.reason = reason or "a run began to replace the day's files and did not finish; run the day again"
            elif m is not None:
                day.last_attempt = f"run {r.run_id} {_value(event, STATUS_KEY) or 'failed'}: {reason or 'see the run'}"
            else:
                day.status, day.run_id, day.reason = "failed", r.run_id, reason or "see the run"
        failure = checks.get(pk)  # a run that failed before recording anything of the day
        if failure is not None and (m is None or failure[0] > m.timestamp) and (r is None or failure[0] > r.timestamp) \
                and failure[1] != day.run_id:
            if m is not None and day.status in READABLE:
                day.last_attempt = f"run {failure[1]} failed: {failure[2]}"
            elif day.status in ("missing", "pending"):
                day.status, day.run_id, day.reason = "failed", failure[1], failure[2]
        if day.status not in READABLE and day.status != "running" and now > deadline:
            day.late = True
            if day.status == "missing" and first_day is not None and pk >= first_day:
                day.status = "late"
        elif day.status == "missing" and now <= deadline:
            day.status = "pending"
        out.append(day)
    return out


def summary(statuses: list[DayStatus]) -> dict[str, int]:
    """Days per status, in a fixed order (zero counts left out)."""
    order = ("complete", "empty", "replacing", "running", "failed", "late", "pending", "missing")
    counts = {s: sum(1 for d in statuses if d.status == s) for s in order}
    return {s: n for s, n in counts.items() if n}
