"""The manifest: the JSON document that says whether one partition (UTC day) can be read.

Written at the layout's manifest path (``_manifest.json``). ``manifest_version`` 2 (DESIGN.md
decision 17). The rule for readers: **trust a day only when its manifest says ``status:
complete`` or ``status: empty``**; a missing manifest or ``status: replacing`` means the day's
files are being written (or a run writing them crashed; the next run completes them).

Order of writes for a day: on a re-export, first a ``replacing`` manifest (the run, the files
about to be replaced), then the data files, then the complete manifest, written last. Every write
overwrites the same key; the exporter never reads it back (write-only).

Fields of a complete manifest:

* ``manifest_version`` (2), ``schema_version``
* ``status``: ``complete`` (rows in at least one event type) or ``empty`` (no rows in any);
  ``status_reason``: one sentence (why a day is empty)
* ``sync_job`` (name), ``sync_id``, ``app_token``, ``title``
* ``partition`` (``YYYY-MM-DD``), ``window`` {``from``, ``to``} (ISO-8601 UTC, ``to`` exclusive)
* ``run_id``, ``exported_at`` (ISO-8601 UTC)
* ``settings``: formats, layout, filters, file size limits that produced the files
* ``source``: kind, export job id (API), ``source_rows`` (rows received for the day),
  ``rows_outside_window`` (under ``extraction_window`` when one extraction covered a range),
  ``duplicates_dropped``, ``filtered_out``, ``not_selected``, unknown columns
* ``event_types``: per selected event type {``status`` (``complete`` | ``empty``), ``reason``
  (only when empty), ``rows`` (exported), ``rows_received`` (rows of the type the source delivered
  for the day), ``duplicates_dropped``, ``filtered_out``}; ``rows_received = rows +
  duplicates_dropped + filtered_out``
* ``userpilot_files``: per documented file the sync job writes (``all_users``, ``all_companies``,
  ``feature_tags_breakdown``, ``feature_tags_definitions``, ``track_feature_per_tag``,
  ``track_labeled_per_label``) {``status`` (``complete`` | ``empty`` | ``absent``: not written,
  ``reason`` says why), ``rows``, snapshot facts (``history_start``, ``previous_day``,
  ``state_chain``)}
* ``files``: path (relative to the sync folder), event_type (null for snapshots, breakdown and
  definitions), format, compression, part, rows, bytes, sha256; documented files add ``file``
  (their name) and per-tag/label files ``id`` (the full, unescaped id)
* ``delta`` (sync jobs with the ``delta`` format): per event type its Delta table {``table``
  (``_delta/<event_type>``), ``uri``, ``version`` (the commit that replaced the day; also
  ``event_types.<type>.delta_version``), ``partition_column`` (``date``), ``partition``,
  ``predicate``, ``mode``, ``compression``, ``rows``, ``bytes`` (the day's data files),
  ``files_added``, ``files_removed``}; Delta files are not in ``files`` (not byte-identical)
* ``superseded``: paths an earlier export of this partition wrote that this one no longer
  produces (deleted only when the sync job allows deletes; ``deleted`` says which)

A ``replacing`` manifest has the identity fields, ``window``, ``run_id``, ``started_at``,
``status_reason`` and ``replacing``: {``files``: paths earlier exports of the day wrote, which
this run overwrites or supersedes}; its ``files`` list is empty (nothing of the day is readable).

An empty day is a manifest with ``status: empty``, never a missing manifest. An export (event
type or documented file) with no rows has no data file: its entry says ``rows: 0`` (``status:
empty`` with a ``reason``) and ``files`` lists nothing of it; a file an earlier export of the day
wrote for it is listed under ``superseded`` (and deleted where the sync job allows deletes).
:func:`rows_by_event_type` reads the rows of manifest version 1 and 2 alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from userpilot_sync.schema.events import SCHEMA_VERSION

MANIFEST_VERSION = 2
STATUS_COMPLETE = "complete"
STATUS_EMPTY = "empty"
STATUS_REPLACING = "replacing"
#: The statuses a reader may trust (the day's files are all there and listed).
READABLE_STATUSES = (STATUS_COMPLETE, STATUS_EMPTY)


@dataclass(frozen=True)
class FileRecord:
    """One exported data file, as listed in a manifest and in materialization metadata."""

    path: str
    event_type: str | None
    format: str
    compression: str
    part: int
    rows: int
    bytes: int
    sha256: str
    #: Documented files only: the file's name (``all_users``, ``track_feature_per_tag``, ...).
    file: str | None = None
    #: Per-tag/per-label files only: the full feature-tag id or labeled event name.
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for optional in ("file", "id"):
            if out[optional] is None:
                del out[optional]
        return out


#: The one place each field of a manifest ``files`` entry (:class:`FileRecord`) is described
#: (docs/schema.md's generated reference): field -> description. The manifest is this project's.
FILE_RECORD_DOCS: dict[str, str] = {
    "path": "The file's path relative to the sync folder (`<prefix>/<sync folder>/<path>` is its key).",
    "event_type": "The event type of an event export or a per-tag/label file; null for the snapshots, "
                  "the breakdown and the definitions.",
    "format": "The export format (`parquet`, `ndjson`, `csv`, `avro`, ...).",
    "compression": "The file's compression (`zstd`, `snappy`, `gzip`, `deflate`, `none`).",
    "part": "The part number (0, 1, ...); a day's export is split only by `max_file_rows` / `max_file_bytes`.",
    "rows": "Rows in the file.",
    "bytes": "Size of the file in bytes.",
    "sha256": "SHA-256 of the file's bytes, 64 lower-case hex digits.",
    "file": "Documented files only: the file's name (`all_users`, `track_feature_per_tag`, ...); absent "
            "otherwise.",
    "id": "Per-tag/label files only: the full, unescaped feature-tag id or labeled event name; absent "
          "otherwise.",
}


def build_manifest(
    *,
    sync_job: str,
    sync_id: str,
    app_token: str,
    title: str,
    partition: str,
    window_from: datetime,
    window_to: datetime,
    run_id: str,
    settings: dict[str, Any],
    source: dict[str, Any],
    event_types: dict[str, dict[str, Any]],
    files: Iterable[FileRecord],
    superseded: Iterable[str] = (),
    deleted: Iterable[str] = (),
    exported_at: datetime | None = None,
    userpilot_files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The complete manifest of one partition (a JSON-serialisable dict).

    ``event_types`` maps each selected event type to its entry (:func:`event_type_entry`); the
    day's ``status`` is ``empty`` when no event type has rows, else ``complete``.
    """
    exported_at = exported_at or datetime.now(timezone.utc)
    entries = {et: dict(entry) for et, entry in event_types.items()}
    files = list(files)
    # Delta Lake commits (destination/delta.py) travel with the files: listed apart, with their versions
    delta = {f.event_type: f.to_dict() for f in files if f.format == "delta"}
    files = [f for f in files if f.format != "delta"]
    for et, table in delta.items():
        if et in entries:
            entries[et]["delta_version"] = table["version"]
    rows = sum(e["rows"] for e in entries.values())
    if rows:
        status, reason = STATUS_COMPLETE, f"{rows} rows exported in {sum(1 for e in entries.values() if e['rows'])} " \
                                          f"of {len(entries)} event types"
    else:
        received = source.get("source_rows", 0)
        reason = (_no_events_reason(source) if not received else
                  f"the source delivered {received} events for the day and none of them was exported "
                  "(see each event type's reason)")
        status = STATUS_EMPTY
    return {
        "manifest_version": MANIFEST_VERSION,
        "status": status,
        "status_reason": reason,
        **_identity(sync_job, sync_id, app_token, title, partition, window_from, window_to, run_id),
        "exported_at": exported_at.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "source": source,
        "event_types": entries,
        **({"userpilot_files": userpilot_files} if userpilot_files else {}),
        "files": [f.to_dict() for f in sorted(files, key=lambda f: f.path)],
        **({"delta": dict(sorted(delta.items()))} if delta else {}),
        "superseded": sorted(set(superseded)),
        "deleted": sorted(set(deleted)),
    }


def _identity(sync_job: str, sync_id: str, app_token: str, title: str, partition: str, window_from: datetime,
              window_to: datetime, run_id: str) -> dict[str, Any]:
    """The fields every manifest of a day carries, whatever its status."""
    return {
        "schema_version": SCHEMA_VERSION,
        "sync_job": sync_job,
        "sync_id": sync_id,
        "app_token": app_token,
        "title": title,
        "partition": partition,
        "window": {"from": window_from.isoformat(), "to": window_to.isoformat()},
        "run_id": run_id,
    }


def _no_events_reason(source: dict[str, Any]) -> str:
    """Why the source delivered nothing, from its facts: chunks found, files skipped (and why)."""
    reason = "the source delivered no events for the day"
    kind = source.get("kind")
    if kind == "files":
        reason += f" (the source folder held {source.get('chunks', 0)} chunk file(s)"
        skipped = source.get("skipped") or []
        if source.get("files_skipped"):
            names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:5])
            reason += f"; {source['files_skipped']} file(s) skipped: {names}"
        reason += ")"
    elif kind == "export_api" and "chunks" in source:
        reason += f" (export job {source.get('export_job_id', '?')} completed with {source['chunks']} chunk(s))"
    return reason


def event_type_entry(event_type: str, *, rows: int, rows_received: int, duplicates_dropped: int,
                     filtered_out: int, filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """One event type's entry in a complete manifest: status, rows and the accounting terms.

    ``status`` is ``empty`` with a ``reason`` when no row was exported: the source delivered none,
    the filters (named from ``filters``, the sync job's filter settings) removed them all, or every
    row was a duplicate.
    """
    entry: dict[str, Any] = {"status": STATUS_COMPLETE if rows else STATUS_EMPTY, "rows": rows,
                             "rows_received": rows_received, "duplicates_dropped": duplicates_dropped,
                             "filtered_out": filtered_out}
    if not rows:
        if not rows_received:
            entry["reason"] = f"the source delivered no {event_type} events for the day"
        elif filtered_out:
            active = sorted(k for k, v in (filters or {}).items() if v and k != "event_types")
            named = f" ({', '.join(active)})" if active else ""
            entry["reason"] = (f"the sync job's filters{named} removed all {filtered_out} of the "
                               f"{rows_received} {event_type} events received"
                               + (f"; {duplicates_dropped} were duplicates" if duplicates_dropped else ""))
        else:
            entry["reason"] = f"all {rows_received} {event_type} events received were exact duplicates"
    return entry


def build_replacing_manifest(
    *,
    sync_job: str,
    sync_id: str,
    app_token: str,
    title: str,
    partition: str,
    window_from: datetime,
    window_to: datetime,
    run_id: str,
    replacing: Iterable[str],
    started_at: datetime | None = None,
) -> dict[str, Any]:
    """The ``replacing`` manifest a re-export writes before it replaces any file of the day.

    ``replacing``: paths (relative to the sync folder) earlier exports of the day wrote.
    """
    started_at = started_at or datetime.now(timezone.utc)
    return {
        "manifest_version": MANIFEST_VERSION,
        "status": STATUS_REPLACING,
        "status_reason": f"run {run_id} is replacing this day's files; do not read the day until its manifest "
                         "says complete or empty (a crashed run leaves this status until the next run completes "
                         "the day)",
        **_identity(sync_job, sync_id, app_token, title, partition, window_from, window_to, run_id),
        "started_at": started_at.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "replacing": {"files": sorted(set(replacing))},
        "files": [],
    }


def rows_by_event_type(manifest: dict[str, Any]) -> dict[str, int]:
    """Rows exported per event type, from a manifest of version 1 (``{type: rows}``) or 2."""
    return {et: (v["rows"] if isinstance(v, dict) else int(v)) for et, v in manifest.get("event_types", {}).items()}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON (indented, stable key order within sections)."""
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
