"""The manifest: the JSON document that declares one partition's export complete.

Written last, after every data file of the partition, at the layout's manifest path. A reader
that follows the manifest (rows, bytes and sha256 per file) can tell a complete day from one
being replaced. ``manifest_version`` 1 fields:

* ``manifest_version``, ``schema_version``
* ``sync_job`` (name), ``sync_id``, ``app_token``, ``title``
* ``partition`` (``YYYY-MM-DD``), ``window`` {``from``, ``to``} (ISO-8601 UTC, ``to`` exclusive)
* ``run_id``, ``exported_at`` (ISO-8601 UTC)
* ``settings``: formats, layout, filters, file size limits that produced the files
* ``source``: kind, export job id (API), ``source_rows`` (rows received for the day),
  ``rows_outside_window`` (under ``extraction_window`` when one extraction covered a range),
  ``duplicates_dropped``, ``filtered_out``, unknown columns
* ``event_types``: per event type, ``rows`` exported
* ``files``: path (relative to the sync folder), event_type, format, compression, part, rows,
  bytes, sha256
* ``superseded``: paths an earlier export of this partition wrote that this one no longer
  produces (deleted only when the sync job allows deletes; ``deleted`` says which)

An empty day is a manifest with 0-row files and ``source_rows: 0``, never a missing manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from userpilot_sync.schema.events import SCHEMA_VERSION

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    """One exported data file, as listed in a manifest and in materialization metadata."""

    path: str
    event_type: str
    format: str
    compression: str
    part: int
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    event_types: dict[str, int],
    files: Iterable[FileRecord],
    superseded: Iterable[str] = (),
    deleted: Iterable[str] = (),
    exported_at: datetime | None = None,
) -> dict[str, Any]:
    """The manifest document of one partition (a JSON-serialisable dict)."""
    exported_at = exported_at or datetime.now(timezone.utc)
    return {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "sync_job": sync_job,
        "sync_id": sync_id,
        "app_token": app_token,
        "title": title,
        "partition": partition,
        "window": {"from": window_from.isoformat(), "to": window_to.isoformat()},
        "run_id": run_id,
        "exported_at": exported_at.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "source": source,
        "event_types": dict(event_types),
        "files": [f.to_dict() for f in sorted(files, key=lambda f: f.path)],
        "superseded": sorted(set(superseded)),
        "deleted": sorted(set(deleted)),
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON (indented, stable key order within sections)."""
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
