"""The partitions the UI offers: exactly the UTC days of a sync job's 365-day window.

A sync job's days are a ``DynamicPartitionsDefinition`` (``userpilot_days_<job>``) whose keys live
in the Dagster instance, so the window rolls forward every day without a code reload:
:func:`sync_window_partitions` adds the days that entered the window (oldest first, so ranges
are consecutive days) and removes the days that left it. A day that left the window is kept
while an in-progress asset backfill or run still targets it (Dagster stops a backfill whose
target partitions were removed), and removed by the next call after that. It runs from the
``userpilot_partition_window`` sensor (every 5 minutes with the daemon), before every schedule
tick and every CLI sync, so a day exists before anything requests it.

Why not a ``DailyPartitionsDefinition``: its start is fixed when the code location loads; a start
computed from "today" moves only on a reload, and a reload that moves it stops any asset
backfill that targets the days it drops (``asset_backfill.py``:
"Targeted partitions ... have been removed since this backfill was stored").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg

from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.partitions import parse_partition, window_partition_keys

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"
_IN_PROGRESS_BACKFILL = {"REQUESTED", "CANCELING", "FAILING"}
_BACKFILL_PAGE = 100


def partitions_def(keys: SyncJobKeys) -> dg.DynamicPartitionsDefinition:
    """The sync job's partitions: UTC days ``YYYY-MM-DD`` kept equal to its 365-day window."""
    return dg.DynamicPartitionsDefinition(name=keys.partitions_name)


@dataclass
class WindowChange:
    """What :func:`sync_window_partitions` did: days added, removed, and left-window days kept."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.added:
            parts.append(f"added {len(self.added)} day(s) {self.added[0]}..{self.added[-1]}")
        if self.removed:
            parts.append(f"removed {len(self.removed)} day(s) that left the window")
        if self.kept_in_use:
            parts.append(f"kept {', '.join(self.kept_in_use)} (an in-progress backfill or run targets them)")
        return "; ".join(parts) or "the partitions match the window"


def _range(start: str, end: str) -> list[str]:
    try:
        a, b = parse_partition(start), parse_partition(end)
    except ValueError:
        return [start, end]
    return [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def _all_backfills(instance: dg.DagsterInstance):
    """Every backfill of the instance, newest first, paged."""
    cursor = None
    while True:
        page = instance.get_backfills(cursor=cursor, limit=_BACKFILL_PAGE)
        yield from page
        if len(page) < _BACKFILL_PAGE:
            return
        cursor = page[-1].backfill_id


def partitions_in_use(instance: dg.DagsterInstance, keys: SyncJobKeys) -> set[str]:
    """Days that an in-progress asset backfill or run of the sync job targets."""
    used: set[str] = set()
    for backfill in _all_backfills(instance):
        if getattr(backfill.status, "value", str(backfill.status)) not in _IN_PROGRESS_BACKFILL:
            continue
        data = getattr(backfill, "asset_backfill_data", None)
        if data is not None:
            for key, subset in data.target_subset.partitions_subsets_by_asset_key.items():
                if key in keys.day_assets:
                    used.update(subset.get_partition_keys())
        used.update(getattr(backfill, "partition_names", None) or [])
    statuses = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses)):  # every in-progress run
        targets = {k.to_user_string() for k in (run.asset_selection or [])}
        if targets and not targets & {k.to_user_string() for k in keys.day_assets}:
            continue
        tags = run.tags
        if PARTITION_TAG in tags:
            used.add(tags[PARTITION_TAG])
        if RANGE_START_TAG in tags and RANGE_END_TAG in tags:
            used.update(_range(tags[RANGE_START_TAG], tags[RANGE_END_TAG]))
    return used


def sync_window_partitions(instance: dg.DagsterInstance, keys: SyncJobKeys, now: datetime | None = None) -> WindowChange:
    """Make the sync job's partitions equal to its window at ``now`` (UTC; default: the clock).

    Adds missing days oldest first; removes days outside the window (and keys that are not UTC
    days) unless an in-progress backfill or run targets them. When days older than the kept ones
    are missing (``partitions_start`` was moved back) and nothing is in progress, the keys are
    rebuilt in order, since ranges follow the keys' order.
    """
    name = keys.partitions_name
    wanted = window_partition_keys(now, keys.job.partitions_start)
    wanted_set = set(wanted)
    existing = list(instance.get_dynamic_partitions(name))
    change = WindowChange()
    stale = [k for k in existing if k not in wanted_set]
    in_use = partitions_in_use(instance, keys) if stale else set()
    for key in stale:
        if key in in_use:
            change.kept_in_use.append(key)
        else:
            instance.delete_dynamic_partition(name, key)
            change.removed.append(key)
    kept = [k for k in existing if k in wanted_set]
    missing = [k for k in wanted if k not in set(existing)]
    if missing and kept and missing[0] < kept[-1]:
        if change.kept_in_use or partitions_in_use(instance, keys):
            missing = [k for k in missing if k > kept[-1]]  # rebuild later, when nothing is in progress
        else:
            for key in kept:
                instance.delete_dynamic_partition(name, key)
            missing = wanted
    if missing:
        instance.add_dynamic_partitions(name, missing)
        change.added = [k for k in missing if k not in set(existing)]
    return change
