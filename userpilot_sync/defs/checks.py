"""Asset checks of a sync job, evaluated per day.

The checks are declared on the day's assets (partitioned like them, so the UI shows a result per
day) and evaluated inside the export step, one ``AssetCheckEvaluation`` per day with its
``partition`` — in one-day and range runs alike, so a result never lacks its day and a later run of
another day never replaces it. Each carries numeric metadata the UI can plot.

* ``<job>/raw_events`` ``not_unexpectedly_empty`` (WARN): the source delivered no events for a day
  while the day before had some (``rows_received``, ``previous_day_rows``).
* ``<job>/<event_type>`` ``known_values`` (WARN): source values and interaction statuses outside
  the documented sets (open sets: reported, not rejected; counts and samples).
* ``<job>/<event_type>`` ``expected_volume`` (ERROR or WARN per evaluation): ERROR when the sync
  job's filters removed every event of the type the source delivered (naming the filters), or when
  the type is empty after exported days that were not (``checks.empty_days``: ``error`` | ``warn`` |
  ``expected``); WARN when its rows fall outside ``checks.volume`` ``min_ratio`` .. ``max_ratio`` of
  the median of the last ``baseline_days`` exported days (failed days never count).
* ``<job>/all_users``, ``<job>/all_companies`` ``snapshot_current`` (WARN): the day's snapshot
  includes every recorded earlier day; a re-export of an earlier day makes every later day's
  snapshot stale (failed evaluations for those days, by the run that changed the earlier day) until the automatic
  range run (sensor ``userpilot_snapshots_<job>``) recomputes them.
* ``<job>/manifest`` ``day_exported`` (ERROR): the day got its complete manifest (``rows``,
  ``files``), or why not; a day of a range refused for the window is a WARN saying so.
"""

from __future__ import annotations

import statistics

import dagster as dg

from userpilot_sync.defs.keys import (
    CHECK_DAY_EXPORTED,
    CHECK_EXPECTED_VOLUME,
    CHECK_KNOWN_VALUES,
    CHECK_NOT_UNEXPECTEDLY_EMPTY,
    CHECK_SNAPSHOT_CURRENT,
    SyncJobKeys,
)
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.export import PreparedExport


def check_specs(keys: SyncJobKeys, partitions_def: dg.PartitionsDefinition) -> list[dg.AssetCheckSpec]:
    """The check specs of one sync job's day assets (partitioned by day)."""
    specs = [
        dg.AssetCheckSpec(
            CHECK_NOT_UNEXPECTEDLY_EMPTY, asset=keys.raw_events, partitions_def=partitions_def,
            description="Warns when the source delivered no events for a day while the day before had events.",
        ),
        dg.AssetCheckSpec(
            CHECK_DAY_EXPORTED, asset=keys.manifest, partitions_def=partitions_def,
            description="Fails when a day got no complete manifest (it broke the Event Schema or was refused).",
        ),
    ]
    for name in ("all_users", "all_companies"):
        if name in keys.job.userpilot_files:
            specs.append(dg.AssetCheckSpec(
                CHECK_SNAPSHOT_CURRENT, asset=keys.documented(name), partitions_def=partitions_def,
                description="Warns when the day's snapshot misses a later re-export of an earlier day (stale); "
                            "the sensor userpilot_snapshots_<job> recomputes stale days in one range run.",
            ))
    for key in keys.exports.values():
        specs.append(dg.AssetCheckSpec(
            CHECK_KNOWN_VALUES, asset=key, partitions_def=partitions_def,
            description="Warns about source values or interaction statuses outside the documented sets.",
        ))
        specs.append(dg.AssetCheckSpec(
            CHECK_EXPECTED_VOLUME, asset=key, partitions_def=partitions_def,
            description="Fails when filters removed every event of the type, or the type is empty after non-empty "
                        "days; warns when its rows fall outside the sync job's checks.volume ratios of the "
                        "median of recent exported days.",
        ))
    return specs


def expected_volume(keys: SyncJobKeys, event_type: str, partition: str, prepared: PreparedExport,
                    baseline: list[int]) -> dg.AssetCheckEvaluation:
    """The day's exported rows of ``event_type`` judged against ``baseline`` (rows of the last
    exported days, newest first, at most ``checks.volume.baseline_days``) and the sync job's
    ``checks`` settings (see the module docstring)."""
    job = keys.job
    settings = job.checks
    rows, received = prepared.rows, prepared.rows_staged
    median = statistics.median(baseline) if baseline else None
    where = f"sync job {job.name!r}, partition {partition}, event type {event_type!r}"
    severity, problem = dg.AssetCheckSeverity.WARN, None
    if rows == 0 and received and prepared.filtered_out and prepared.filtered_out + prepared.duplicates_dropped == received:
        active = sorted(k for k, v in job.filters.model_dump().items() if v and k != "event_types")
        severity = dg.AssetCheckSeverity.ERROR
        problem = (f"{where}: the sync job's filters ({', '.join(active) or 'filters'}) removed all {prepared.filtered_out:,} "
                   f"events the source delivered; check them for a typo in {job.source_file or 'the sync job file'}")
    elif rows == 0 and median:
        if settings.empty_days != "expected":
            severity = dg.AssetCheckSeverity.ERROR if settings.empty_days == "error" else dg.AssetCheckSeverity.WARN
            problem = (f"{where}: no rows, while the last {len(baseline)} exported days had a median of {median:,.0f}; "
                       f"check the source before trusting this empty day (set checks.empty_days: expected if empty "
                       f"days are normal)")
    elif median and rows:
        ratio = rows / median
        if ratio < settings.volume.min_ratio or ratio > settings.volume.max_ratio:
            problem = (f"{where}: {rows:,} rows is {ratio:.0%} of the median of the last {len(baseline)} exported days "
                       f"({median:,.0f}); expected {settings.volume.min_ratio:.0%}..{settings.volume.max_ratio:.0%}")
    return dg.AssetCheckEvaluation(
        asset_key=keys.export(event_type), check_name=CHECK_EXPECTED_VOLUME, partition=partition,
        passed=problem is None, severity=severity, description=problem,
        metadata={"rows": rows, "rows_received": received, "filtered_out": prepared.filtered_out,
                  "baseline_median": float(median) if median is not None else -1.0,
                  "baseline_days": len(baseline),
                  "ratio": float(rows / median) if median else -1.0},
    )


def not_unexpectedly_empty(keys: SyncJobKeys, partition: str, rows_received: int,
                           previous_day_rows: int | None) -> dg.AssetCheckEvaluation:
    """WARN when ``rows_received`` is 0 and the previous day (``previous_day_rows``) was not empty."""
    suspicious = rows_received == 0 and bool(previous_day_rows)
    return dg.AssetCheckEvaluation(
        asset_key=keys.raw_events, check_name=CHECK_NOT_UNEXPECTEDLY_EMPTY, partition=partition,
        passed=not suspicious, severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"sync job {keys.name!r}, partition {partition}: the source returned no events, but the previous day "
            f"had {previous_day_rows}. Check the source (API key, filters) before trusting this empty day."
            if suspicious else None
        ),
        metadata={"rows_received": rows_received,
                  "previous_day_rows": previous_day_rows if previous_day_rows is not None else -1},
    )


def known_values(keys: SyncJobKeys, event_type: str, partition: str, prepared: PreparedExport) -> dg.AssetCheckEvaluation:
    """WARN when the day's export has ``source`` values or interaction statuses outside the documented sets."""
    unknown_sources = sum(prepared.unknown_sources.values())
    unknown_statuses = sum(prepared.unknown_statuses.values())
    return dg.AssetCheckEvaluation(
        asset_key=keys.export(event_type), check_name=CHECK_KNOWN_VALUES, partition=partition,
        passed=not (unknown_sources or unknown_statuses), severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rows_with_unknown_source": unknown_sources,
            "rows_with_unknown_status": unknown_statuses,
            "unknown_values": dg.MetadataValue.json({"source": prepared.unknown_sources,
                                                     "interaction_status": prepared.unknown_statuses}),
            "entity_types": dg.MetadataValue.json(prepared.entity_types),
        },
    )


def day_exported(keys: SyncJobKeys, partition: str, manifest: dict | None, reason: str | None = None) -> dg.AssetCheckEvaluation:
    """ERROR unless the day's complete manifest was published (``reason`` says why not)."""
    if manifest is None:
        return dg.AssetCheckEvaluation(
            asset_key=keys.manifest, check_name=CHECK_DAY_EXPORTED, partition=partition, passed=False,
            severity=dg.AssetCheckSeverity.ERROR, description=reason,
            metadata={"rows": 0, "files": 0, "reason": reason or ""},
        )
    return dg.AssetCheckEvaluation(
        asset_key=keys.manifest, check_name=CHECK_DAY_EXPORTED, partition=partition, passed=True,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows": sum(rows_by_event_type(manifest).values()), "files": len(manifest["files"])},
    )


def day_refused(keys: SyncJobKeys, partition: str, reason: str) -> dg.AssetCheckEvaluation:
    """WARN: a day of a range run that was refused (outside the 365-day window); nothing written."""
    return dg.AssetCheckEvaluation(
        asset_key=keys.manifest, check_name=CHECK_DAY_EXPORTED, partition=partition, passed=False,
        severity=dg.AssetCheckSeverity.WARN, description=reason,
        metadata={"rows": 0, "files": 0, "reason": reason},
    )


def snapshot_current(keys: SyncJobKeys, name: str, partition: str, facts: dict) -> dg.AssetCheckEvaluation:
    """``snapshot_current`` passed: the day's snapshot was computed from the newest recorded state."""
    return dg.AssetCheckEvaluation(
        asset_key=keys.documented(name), check_name=CHECK_SNAPSHOT_CURRENT, passed=True, partition=partition,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"computed from the state of {facts.get('previous_day') or 'no earlier day'} "
                    f"(history start {facts.get('history_start')})",
        metadata={"history_start": str(facts.get("history_start")), "previous_day": str(facts.get("previous_day"))},
    )


def snapshot_stale(keys: SyncJobKeys, name: str, partition: str, changed_day: str, run_id: str) -> dg.AssetCheckEvaluation:
    """``snapshot_current`` failed: an earlier day changed after this day's snapshot was written."""
    return dg.AssetCheckEvaluation(
        asset_key=keys.documented(name), check_name=CHECK_SNAPSHOT_CURRENT, passed=False, partition=partition,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"stale: day {changed_day} was re-exported by run {run_id} after this day's {name} was written; "
                    f"the sensor {keys.snapshot_sensor_name} requests one range run that recomputes it",
        metadata={"changed_day": changed_day, "run_id": run_id},
    )
