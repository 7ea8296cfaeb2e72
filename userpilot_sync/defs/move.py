"""Move the history of one Dagster instance into another: e.g. the local SQLite instance of
``make run`` into the cluster's PostgreSQL, without losing what userpilot_sync keeps there.

Everything the exporter needs from earlier runs lives in the instance (``defs/ledger.py``): the
destination fingerprint, the files each day wrote (for ``superseded``), GCS generations, rows per
day, check results. They are materializations, observations and check evaluations in the event
log of the runs that recorded them. So a move copies, run by run (oldest first), what Dagster's
own ``dagster debug export`` / ``dagster debug import`` copy for one run — the run's job and
execution-plan snapshots, every event of its log, then the run record — plus the asset backfills
and the sync jobs' day partitions (``userpilot_days_<job>``). The target indexes the copied
materializations as it stores them, so the ledger, the UI's asset pages and ``cli status`` read
the same history there.

Safe to interrupt and repeat: a run is copied events first and its run record last, so a run
whose record is in the target is complete and skipped; a run without one has any events of an
interrupted copy deleted and is copied again. Refuses (``MoveError``) while the source has runs in
progress (stop its daemon and let runs finish first).

Not copied: the notifier's sent-notice keys (the key-value table has no listing in Dagster's API;
a day's notice may be sent once more), schedule/sensor on-off states and tick history (they start
from each definition's default status), pool limits changed in the UI (set them again; the default
comes from ``dagster.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from userpilot_sync.errors import UserpilotSyncError

_IN_PROGRESS = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


class MoveError(UserpilotSyncError):
    """The history cannot be moved now (the message says why and what to do)."""


@dataclass
class MoveReport:
    """What :func:`move_history` did: runs copied / already there, events copied, backfills and
    partition keys added."""

    runs_copied: int = 0
    runs_present: int = 0
    events_copied: int = 0
    backfills_copied: int = 0
    partitions_added: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.runs_copied} run(s) copied ({self.events_copied:,} events)",
                 f"{self.runs_present} already there", f"{self.backfills_copied} backfill(s) copied"]
        added = sum(self.partitions_added.values())
        parts.append(f"{added} day partition(s) added")
        return ", ".join(parts)


def move_history(source: dg.DagsterInstance, target: dg.DagsterInstance, partitions_defs: list[str],
                 log: Callable[[str], None] | None = None) -> MoveReport:
    """Copy every run (with its snapshots and event log), every asset backfill and the keys of
    ``partitions_defs`` (dynamic partitions names) from ``source`` into ``target``.

    ``log(message)`` is told each run copied. Raises :class:`MoveError` when the source has runs in
    progress or source and target are the same instance.
    """
    if source is target or (source.is_persistent and target.is_persistent and source.get_ref() == target.get_ref()):
        raise MoveError("the source and target instances are the same: point --from at the old DAGSTER_HOME and "
                        "DAGSTER_HOME at the new one")
    busy = source.get_runs(filters=dg.RunsFilter(statuses=list(_IN_PROGRESS)))
    if busy:
        raise MoveError(f"{len(busy)} run(s) of the source instance are queued or in progress "
                        f"({', '.join(r.run_id for r in busy[:5])}{', ...' if len(busy) > 5 else ''}): stop its "
                        f"daemon and let them finish (or cancel them), then move again. Nothing was moved.")
    report = MoveReport()
    for run in source.get_runs(ascending=True):
        if target.has_run(run.run_id):
            report.runs_present += 1
            continue
        target.event_log_storage.delete_events(run.run_id)  # what an interrupted move left
        for snapshot_id, load in ((run.job_snapshot_id, source.get_job_snapshot),
                                  (run.execution_plan_snapshot_id, source.get_execution_plan_snapshot)):
            if snapshot_id and not target.has_snapshot(snapshot_id):
                target.add_snapshot(load(snapshot_id))
        events = source.all_logs(run.run_id)
        for entry in events:
            target.store_event(entry)
        target.add_run(run)  # last: a run record in the target means its events are all there
        report.runs_copied += 1
        report.events_copied += len(events)
        if log is not None:
            log(f"copied run {run.run_id} ({run.job_name}, {run.status.value}, {len(events)} events)")
    for backfill in source.get_backfills():
        if target.get_backfill(backfill.backfill_id) is None:
            target.add_backfill(backfill)
            report.backfills_copied += 1
    for name in partitions_defs:
        have = set(target.get_dynamic_partitions(name))
        missing = [key for key in source.get_dynamic_partitions(name) if key not in have]
        if missing:
            target.add_dynamic_partitions(name, missing)
        report.partitions_added[name] = len(missing)
    return report
