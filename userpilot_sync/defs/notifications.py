"""Notifications from runs (CLI and daemon alike) and from the freshness sensor.

The export step itself tells the sync job's ``notifications`` entries what became of each day of
its run (so CLI runs notify exactly like daemon runs): ``exported`` (the day's complete manifest was
written), ``failed`` (the day failed or was refused; also every day of a run that failed before
any day was prepared, e.g. a source error), ``check_failed`` (a check of the day at WARN or ERROR).
The freshness sensor (``userpilot_freshness_<job>``, needs the daemon) sends ``late`` for days
without a complete manifest past their deadline (``scheduling.export_deadline``).

Each (sync job, day, event) is sent once per receiver (the dedupe keys live in the instance's
key-value storage, ``defs/notify_store.py``) and re-armed when the day is exported with every check
passing. Delivery failures are logged as warnings and never fail a run.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable, Iterable

import dagster as dg

from userpilot_sync.config.model import NOTIFY_EVENTS
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.notify_store import DagsterKVDedupe
from userpilot_sync.defs.status import day_statuses
from userpilot_sync.notify import Notifier, RetryPolicy


def notifier_for(instance: dg.DagsterInstance, keys: SyncJobKeys, *, clock: Callable[[], datetime] | None = None,
                 retry: RetryPolicy | None = None) -> Notifier | None:
    """The sync job's notifier (dedupe in ``instance``), or None when it has no notifications."""
    if not keys.job.notifications:
        return None
    return Notifier(keys.job, dedupe=DagsterKVDedupe(instance), clock=clock, retry=retry)


def check_problems(evaluations: Iterable[dg.AssetCheckEvaluation]) -> dict[str, list[str]]:
    """Per day: one line per failed check (severity, asset:check, description)."""
    problems: dict[str, list[str]] = {}
    for e in evaluations:
        if e.passed or e.partition is None:
            continue
        what = e.description or "failed"
        problems.setdefault(e.partition, []).append(
            f"{e.severity.value} {e.asset_key.to_user_string()}:{e.check_name}: {what}")
    return problems


def notify_run_days(instance: dg.DagsterInstance, keys: SyncJobKeys, run_id: str, *,
                    exported: dict[str, dict], failed: dict[str, str],
                    problems: dict[str, list[str]], log=None) -> None:
    """Tell the receivers what became of each day of run ``run_id`` (see the module docstring).
    Never raises: a notification problem is logged (``log``) and must not change the run's outcome."""
    try:
        _notify_run_days(instance, keys, run_id, exported=exported, failed=failed, problems=problems, log=log)
    except Exception as exc:
        if log is not None:
            log(f"sync job {keys.name!r}: notifications of run {run_id} not sent: {type(exc).__name__}: {exc}")


def _notify_run_days(instance: dg.DagsterInstance, keys: SyncJobKeys, run_id: str, *,
                     exported: dict[str, dict], failed: dict[str, str],
                     problems: dict[str, list[str]], log=None) -> None:
    notifier = notifier_for(instance, keys)
    if notifier is None:
        return
    job = keys.job
    outcomes = []
    for pk, reason in sorted(failed.items()):
        outcomes += notifier.notify(notifier.notice("failed", partition=pk, run_id=run_id, message=reason))
    for pk, manifest in sorted(exported.items()):
        # the day recovered: a later failure, lateness or export is news again; a check problem only
        # once the day's checks all passed
        notifier.rearm(job.name, pk, ("failed", "late", "exported") if problems.get(pk) else NOTIFY_EVENTS)
        rows = sum(e["rows"] if isinstance(e, dict) else e for e in manifest.get("event_types", {}).values())
        outcomes += notifier.notify(notifier.notice(
            "exported", partition=pk, run_id=run_id,
            message=f"sync job {job.name!r}, partition {pk}: exported ({manifest.get('status', 'complete')}, "
                    f"{rows:,} rows in {len(manifest.get('files', []))} files)",
            details={"status": manifest.get("status"), "rows": rows, "files": len(manifest.get("files", []))}))
    for pk, lines in sorted(problems.items()):
        outcomes += notifier.notify(notifier.notice(
            "check_failed", partition=pk, run_id=run_id,
            message=f"sync job {job.name!r}, partition {pk}: " + "; ".join(lines), details={"checks": lines}))
    failures = [o for o in outcomes if not o.ok]
    if failures and log is not None:
        for o in failures:
            log(f"sync job {job.name!r}: notification {o.entry} of {o.event} ({o.dedup_key}) not delivered: {o.error}")


def notify_late(instance: dg.DagsterInstance, keys: SyncJobKeys, now: datetime | None = None,
                retry: RetryPolicy | None = None) -> list[str]:
    """Send ``late`` once for every day whose deadline passed without a complete manifest (days on
    or after the sync job's first exported day; a disabled sync job sends none). Returns the days
    notified now (sent to at least one receiver)."""
    now = now or datetime.now(timezone.utc)
    notifier = notifier_for(instance, keys, clock=lambda: now, retry=retry)
    if notifier is None or not keys.job.enabled:
        return []
    statuses = day_statuses(instance, keys, now)
    exported_days = [d.partition for d in statuses if d.status in ("complete", "empty", "replacing", "failed")]
    if not exported_days:
        return []
    first = min(exported_days)
    sent = []
    for day in statuses:
        if not day.late or day.partition < first:
            continue
        message = (f"sync job {keys.name!r}, partition {day.partition}: not exported by its deadline {day.deadline} "
                   f"(status {day.status}{': ' + day.reason if day.reason else ''})")
        outcomes = notifier.notify(notifier.notice("late", partition=day.partition, run_id=day.run_id, message=message,
                                                   details={"status": day.status, "deadline": day.deadline}))
        if any(o.status == "sent" for o in outcomes):
            sent.append(day.partition)
    return sent


def build_freshness_sensor(keys: SyncJobKeys) -> dg.SensorDefinition:
    """``userpilot_freshness_<job>``: every 5 minutes, ``late`` for days past their deadline."""

    @dg.sensor(name=f"userpilot_freshness_{keys.name}", minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Sends 'late' notifications of sync job {keys.name!r}: days without a complete manifest "
                           f"{keys.job.checks.deadline_hours:g} h after their regular sync's tick (UTC).")
    def freshness(context: dg.SensorEvaluationContext):
        late = notify_late(context.instance, keys)
        return dg.SkipReason(f"late notified: {', '.join(late)}" if late else "no day newly late")

    return freshness
