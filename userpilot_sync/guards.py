"""Guards that protect a day's files: they run after a day is prepared, before anything of it uploads.

Dagster evaluates a blocking asset check only after its asset's output is written — too late to
keep a bad re-export from replacing a good day. So the export step calls these for each day of
its range, in order, between :func:`~userpilot_sync.pipeline.prepare_day` and the first upload:

1. :func:`check_accounting` — every row the source delivered for the day is accounted for, per
   event type: ``rows_received = rows exported + duplicates dropped + filtered out``, and for the
   day ``rows received = Σ per selected event type + rows of event types not selected``.
2. :func:`shrink_violations` — a re-export may not replace a non-empty export of an event type
   with an empty one, nor lose more than ``checks.max_shrink`` of its rows, unless the run allows it
   (CLI ``--allow-shrink``, run tag ``userpilot_sync/allow_shrink: "true"``).

A guard that fails raises :class:`~userpilot_sync.errors.GuardError` (a ValidationError) naming the
sync job, the day, the event type and what to do; the day is then not written at all (its earlier
files and manifest stay byte-identical). Plain Python: no Dagster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from userpilot_sync.errors import GuardError

#: Run tag that lets a run shrink exports beyond ``checks.max_shrink`` (value ``"true"``).
ALLOW_SHRINK_TAG = "userpilot_sync/allow_shrink"


def allows_shrink(tags: Mapping[str, str]) -> bool:
    """True when run ``tags`` carry ``userpilot_sync/allow_shrink: "true"`` (case-insensitive)."""
    return str(tags.get(ALLOW_SHRINK_TAG, "")).strip().lower() == "true"


@dataclass(frozen=True)
class DayCounts:
    """What one day's preparation counted (rows): per selected event type and for the whole day.

    ``by_event_type``: ``{event type: (rows_received, rows, duplicates_dropped, filtered_out)}``;
    ``rows_received``: every row the source delivered for the day; ``received_by_type``: the
    staging counts per event type (selected or not).
    """

    sync_job: str
    partition: str
    rows_received: int
    received_by_type: Mapping[str, int]
    by_event_type: Mapping[str, tuple[int, int, int, int]]


def check_accounting(counts: DayCounts) -> None:
    """Raise GuardError when a row of the day is unaccounted for (see the module docstring).

    The message names the sync job, partition, event type and every term, so the term that is off
    can be found; nothing of the day is written.
    """
    where = f"sync job {counts.sync_job!r}, partition {counts.partition}"
    problems = []
    for et, (received, rows, dupes, filtered) in counts.by_event_type.items():
        staged = counts.received_by_type.get(et, 0)
        if received != staged:
            problems.append(f"event type {et!r}: {received} rows read from staging but {staged} staged")
        if received != rows + dupes + filtered:
            problems.append(f"event type {et!r}: rows received {received} != exported {rows} + duplicates dropped "
                            f"{dupes} + filtered out {filtered} (= {rows + dupes + filtered})")
    staged_total = sum(counts.received_by_type.values())
    if staged_total != counts.rows_received:
        problems.append(f"the day's {counts.rows_received} rows received != {staged_total} staged across event types")
    if problems:
        raise GuardError(f"{where}: rows are unaccounted for (a bug in the exporter, not in your data): "
                         + "; ".join(problems) + ". Nothing of the day was written; please report this with the "
                         "run's logs.")


@dataclass(frozen=True)
class Shrink:
    """One event type whose re-export would lose more rows than allowed."""

    event_type: str
    previous_rows: int
    new_rows: int

    @property
    def lost_share(self) -> float:
        return 1.0 if self.previous_rows == 0 else (self.previous_rows - self.new_rows) / self.previous_rows


def shrink_violations(previous: Mapping[str, int], new: Mapping[str, int], max_shrink: float) -> list[Shrink]:
    """Event types whose rows would drop from ``previous`` (the day's last export) to ``new`` by more
    than ``max_shrink`` (share of rows, 0..1), or from non-empty to empty. Event types without a
    previous export, or that were empty before, never count."""
    found = []
    for et, before in sorted(previous.items()):
        if et not in new or not before:
            continue
        after = new[et]
        shrink = Shrink(et, int(before), int(after))
        if after == 0 or shrink.lost_share > max_shrink:
            found.append(shrink)
    return found


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def settings_changes(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """Settings (``SyncJob.settings_summary()``, as recorded in manifests) that differ, as
    ``key: old → new`` lines, sorted; empty when unknown or unchanged."""
    if not previous:
        return []
    old, new = _flat(dict(previous)), _flat(dict(current))
    return [f"{k}: {json.dumps(old.get(k))} → {json.dumps(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def shrink_error(sync_job: str, partition: str, shrinks: Iterable[Shrink], max_shrink: float,
                 changes: list[str]) -> GuardError:
    """The refusal of a shrinking re-export: day, event types, previous → new rows, changed settings."""
    lines = [f"{s.event_type!r}: {s.previous_rows:,} → {s.new_rows:,} rows (-{s.lost_share:.0%})" for s in shrinks]
    changed = ("settings changed since the previous export: " + "; ".join(changes)) if changes else \
        "no setting changed since the previous export (the source returned fewer events)"
    return GuardError(
        f"sync job {sync_job!r}, partition {partition}: refusing to replace the day's export, which would lose more "
        f"than checks.max_shrink ({max_shrink:.0%}) of its rows — " + ", ".join(lines) + f". {changed}. Nothing of "
        f"the day was written. If this is intended, re-run the day with --allow-shrink (CLI) or the run tag "
        f"{ALLOW_SHRINK_TAG}=true (UI launchpad); otherwise fix the sync job's settings.")
