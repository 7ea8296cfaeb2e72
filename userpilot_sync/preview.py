"""Dry-run preview of one day of a sync job: what an export would write, without writing it.

:func:`preview_day` runs the real steps of an export (``pipeline.stage_and_prepare``:
staging and preparation, the accounting guard, the documented files, ``writer.write_export`` /
``documented.write_documented`` / ``writer.write_manifest``, ``pipeline.manifest_for``) with the
day staged in a temporary folder and a :class:`RecordingStorage` in place of the destination: the
writers name every object exactly as an export would (same layout code, same keys, same bytes,
rows and sha256 in the manifest), but nothing leaves the machine. The destination receives no
request (no credentials check, no listing, no write), nothing is recorded in the Dagster instance
(no fingerprint, so a preview never fixes a destination; no per-day record, no baseline), and the
snapshot state store is only read (its writes go to memory). A day that would fail its export
fails its preview with the same one-line cause (ValidationError, GuardError, WindowError,
SourceError, DestinationError).

Used by the Dagster job ``<job>_preview`` (``defs/jobs.py``: its op holds the app token's pool
slot, like the export step, and passes what the instance knows of earlier exports of the day as
:class:`EarlierExports`) and by ``python -m userpilot_sync.cli preview`` (which runs that job).

The preview document (``--json`` prints it; the op's output metadata ``preview`` holds it)::

    {
      "preview_version": 1,
      "sync_job": "demo", "partition": "YYYY-MM-DD", "enabled": true,
      "destination": {"kind": "local|s3|gcs", "root_uri": "<URI of the sync folder>"},
      "layout": "userpilot|hive", "formats": ["parquet/zstd", ...],
      "rows_received": 400,                       # rows the source delivered for the day
      "event_types": {"<event type>": {"rows", "rows_received", "duplicates_dropped", "filtered_out",
                                       "files", "status", "reason"?}},  # sync job's order; rows = exported
      "userpilot_files": {"<name>": {"status", "rows", ...}},   # the manifest's entries
      "files": [{"key", "uri", "path", "event_type", "file", "id", "format", "compression", "part",
                 "rows", "bytes", "sha256", "sample": [{column: value}, ...]}],   # in write order
      "delta_tables": [{"table", "key", "uri", "event_type", "partition", "predicate", "rows", "bytes",
                        "version": null, ..., "sample"}],   # format delta: a dry-run commit per event type
      "manifest": {"key", "uri", "replacing_first": false, "document": {...the manifest...}},
      "keys": ["<every object key, in write order; the manifest last>"],   # Delta's own objects not included
      "notes": ["<what a real export would do differently or first>", ...]
    }

``sample`` holds the first :data:`SAMPLE_ROWS` rows of each file as read back from the encoded
bytes (JSON values; timestamps as text), ``id`` is set for per-tag/per-label files only, and the
manifest's ``run_id`` is the preview run's.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import FileRecord
from userpilot_sync.errors import DestinationError, ValidationError
from userpilot_sync.partitions import check_in_window, parse_partition

PREVIEW_VERSION = 1
#: Rows shown per file.
SAMPLE_ROWS = 3


# ---------------------------------------------------------------------------------- storage
@dataclass
class PreviewObject:
    """One object an export would write: key, content type, size and the first rows."""

    key: str
    content_type: str
    bytes: int
    sample: list[dict] = field(default_factory=list)


def destination_uri(job: SyncJob, key: str) -> str:
    """The URI an export's storage gives ``key`` (``s3://``, ``gs://``, ``file://``), computed from
    the sync job's settings alone: no client is built, no credential is looked up."""
    dest = job.destination
    if dest.kind == "s3":
        return f"s3://{dest.bucket}/{key}"
    if dest.kind == "gcs":
        return f"gs://{dest.bucket}/{key}"
    return (Path(dest.path).absolute() / key).as_uri()


class RecordingStorage:
    """A :class:`~userpilot_sync.destination.storage.Storage` that writes nothing: it records each
    key it is given (with size and the first ``sample_rows`` rows read back from the local file the
    writer hands over) and never opens a connection. ``delete`` is refused."""

    def __init__(self, job: SyncJob, sample_rows: int = SAMPLE_ROWS):
        self.job = job
        self.kind = job.destination.kind
        self.sample_rows = sample_rows
        self.objects: dict[str, PreviewObject] = {}
        self.order: list[str] = []  # keys in write order (a key written twice appears twice)

    def uri(self, key: str) -> str:
        return destination_uri(self.job, key)

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None,
                 **_: Any) -> None:
        path = Path(path)
        self.objects[key] = PreviewObject(key, content_type, path.stat().st_size,
                                          read_sample(path, key, self.sample_rows))
        self.order.append(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str, **_: Any) -> None:
        self.objects[key] = PreviewObject(key, content_type, len(data))
        self.order.append(key)

    def delete(self, key: str) -> None:
        raise DestinationError(f"a preview deletes nothing (asked to delete {key})")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_sample(path: Path, key: str, n: int = SAMPLE_ROWS) -> list[dict]:
    """The first ``n`` rows of an encoded export file (format from the key's extension), as JSON
    values. Unknown formats give ``[]``."""
    if n <= 0:
        return []
    name = key.rsplit("/", 1)[-1]
    opener = gzip.open if name.endswith(".gz") else open
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        rows: list[dict] = []
        for batch in pf.iter_batches(batch_size=n):
            rows.extend(batch.to_pylist())
            break
        return _jsonable(rows[:n])
    if base.endswith(".ndjson") or base.endswith(".jsonl"):
        out = []
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= n:
                    break
                if line.strip():
                    out.append(json.loads(line))
        return out
    if base.endswith(".csv"):
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            return [dict(row) for _, row in zip(range(n), reader)]
    if base.endswith(".avro"):
        import fastavro

        with open(path, "rb") as fh:
            return _jsonable([rec for _, rec in zip(range(n), fastavro.reader(fh))])
    return []


# ---------------------------------------------------------------------------------- state store
class ReadOnlyState:
    """A snapshot-state backend that reads the real store and keeps every write in memory, so the
    preview's snapshots start from the recorded previous day exactly as the export's do, while the
    store itself is never changed."""

    def __init__(self, backend):
        self.backend = backend
        self.where = f"{backend.where} (read only: preview)"
        self._written: dict[str, bytes | None] = {}

    def get(self, name: str) -> bytes | None:
        if name in self._written:
            return self._written[name]
        return self.backend.get(name)

    def put(self, name: str, data: bytes) -> None:
        self._written[name] = data

    def delete(self, name: str) -> None:
        self._written[name] = None


# ---------------------------------------------------------------------------------- the day
@dataclass
class EarlierExports:
    """What the Dagster instance knows of earlier exports of the day (read, never written):
    the paths they wrote (for ``superseded`` and the ``replacing`` manifest), whether a run began
    to write the day, the newest complete manifest (shrink guard), the recorded destination
    fingerprint (None: never exported) and the current one."""

    paths: set[str] = field(default_factory=set)
    started: bool = False
    previous_manifest: dict | None = None
    recorded_fingerprint: str | None = None
    fingerprint: str | None = None


def _features_events(job: SyncJob, source):
    """The ``features_events`` lookup for the documented files, or ``(None, why not)`` (as the export)."""
    from userpilot_sync.errors import UserpilotSyncError
    from userpilot_sync.source.lookups import lookups_for_job

    if job.source.kind == "files":
        return None, "the sync job's source (local export files) has no lookups"
    try:
        api = source if job.source.kind == "export_api" else None
        return lookups_for_job(job, ("features_events",), source=api)["features_events"], None
    except UserpilotSyncError as exc:
        return None, f"the features_events lookup could not be fetched ({exc})"


def preview_day(job: SyncJob, partition: str, work_root: Path, *, state_root: Path, source=None,
                run_id: str = "preview", earlier: EarlierExports | None = None,
                sample_rows: int = SAMPLE_ROWS) -> dict:
    """The preview document of ``partition`` (see the module docstring).

    ``work_root``: a folder of this preview only (created, and removed before returning);
    ``state_root``: the staging root the exports use (where a local snapshot state store lives);
    ``source``: the sync job's :class:`~userpilot_sync.source.base.EventSource` (default: built
    from the job). Raises WindowError, SourceError, ValidationError (incl. GuardError) or
    DestinationError exactly where the export of the day would fail, naming sync job and day.
    """
    from userpilot_sync.destination.documented import write_documented
    from userpilot_sync.destination.superseded import superseded_paths
    from userpilot_sync.destination.writer import write_export, write_manifest
    from userpilot_sync.documented.day import compute_day_files
    from userpilot_sync.documented.state import SnapshotStore, backend_for
    from userpilot_sync.guards import check_accounting, shrink_error, shrink_violations, settings_changes
    from userpilot_sync.destination.manifest import rows_by_event_type
    from userpilot_sync.partitions import window_partition_keys
    from userpilot_sync.pipeline import day_counts, manifest_for, stage_and_prepare
    from userpilot_sync.source.factory import build_source

    earlier = earlier or EarlierExports()
    day = parse_partition(partition)
    pk = day.isoformat()
    check_in_window(job.name, day)
    source = source or build_source(job)
    notes: list[str] = []
    if not job.enabled:
        notes.append(f"the sync job is disabled (enabled: false): its exports are refused until it is enabled; "
                     f"this is what the export of {pk} would write once it is")
    if job.partitions_start is not None and day < job.partitions_start:
        notes.append(f"{pk} is before partitions_start {job.partitions_start.isoformat()}: the sync job never exports it")
    if earlier.recorded_fingerprint and earlier.fingerprint and earlier.recorded_fingerprint != earlier.fingerprint:
        notes.append("the destination changed since the first export (recorded fingerprint "
                     f"{earlier.recorded_fingerprint}, now {earlier.fingerprint}): a real export is refused")
    work_root = Path(work_root)
    try:
        both = stage_and_prepare(job, [day], work_root, source)
        staged = both.staged[pk]
        result = both.prepared[pk]
        if isinstance(result, ValidationError):
            raise result
        prepared = result
        check_accounting(day_counts(staged, prepared))
        if earlier.previous_manifest:
            shrinks = shrink_violations(rows_by_event_type(earlier.previous_manifest),
                                        {et: p.rows for et, p in prepared.items()}, job.checks.max_shrink)
            if shrinks:
                error = shrink_error(job.name, pk, shrinks, job.checks.max_shrink,
                                     settings_changes(earlier.previous_manifest.get("settings"),
                                                      job.settings_summary()))
                notes.append(f"a re-export is refused unless the run allows it (userpilot_sync/allow_shrink): {error}")
        documented = {}
        if job.userpilot_files:
            features_events, note = (None, None)
            if set(job.userpilot_files) & {"feature_tags_breakdown", "feature_tags_definitions",
                                           "track_labeled_per_label"}:
                features_events, note = _features_events(job, source)
                if note:
                    notes.append(note)
            store = None
            if set(job.userpilot_files) & {"all_users", "all_companies"}:
                store = SnapshotStore(ReadOnlyState(backend_for(job, state_root)), job.name,
                                      job.state.checkpoint_every_days)
            documented, _ = compute_day_files(job, staged, prepared, store=store, carried=None,
                                              features_events=features_events, lookups_note=note, run_id=run_id,
                                              window_start=window_partition_keys()[0])
        storage = RecordingStorage(job, sample_rows)
        files: list[FileRecord] = []
        for p in prepared.values():
            files.extend(write_export(p, job, storage, staged.root / "write" / p.event_type).files)
        delta_samples = {f.event_type: _delta_sample(prepared[f.event_type], sample_rows)
                         for f in files if f.format == "delta"}  # read before the staging goes
        for name, doc in documented.items():
            files.extend(write_documented(doc, job, pk, storage, staged.root / "write" / name,
                                          taken={f.path for f in files}))
        replacing_first = bool(earlier.paths) or earlier.started
        superseded = superseded_paths(earlier.paths, files)
        allow_deletes = bool(getattr(job.destination, "allow_deletes", False))
        if job.destination.kind == "gcs" and job.destination.overwrite == "refuse" and earlier.paths:
            notes.append("the day was exported before and destination.overwrite is 'refuse': a real export is refused")
        if replacing_first:
            notes.append("the day was exported (or begun) before: the export first writes a 'replacing' manifest "
                         "to the manifest's key, then the files, then the complete manifest")
        if superseded:
            notes.append(f"{len(superseded)} file(s) of earlier exports are superseded"
                         + (" and deleted (allow_deletes)" if allow_deletes else " (listed in the manifest)"))
        manifest = manifest_for(job, staged, prepared.values(), files, run_id, superseded=superseded,
                                deleted=superseded if allow_deletes else [], documented=documented)
        manifest_key = write_manifest(manifest, job, storage)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    layout = layout_for(job)
    manifest = _jsonable(manifest)
    entries = manifest.get("event_types") or {}
    counts: dict[str, int] = {}
    for f in files:
        if f.event_type and not getattr(f, "file", None) and f.format != "delta":
            counts[f.event_type] = counts.get(f.event_type, 0) + 1
    event_types = {}
    for et, p in prepared.items():
        entry = entries.get(et) or {}
        event_types[et] = {"rows": p.rows, "rows_received": p.rows_staged, "duplicates_dropped": p.duplicates_dropped,
                           "filtered_out": p.filtered_out, "files": counts.get(et, 0),
                           "status": entry.get("status"), **({"reason": entry["reason"]} if "reason" in entry else {})}
    file_docs, tables = [], []
    for f in files:
        key = layout.key(f.path)
        if f.format == "delta":  # a dry-run commit (destination/delta.py): the table and the day's rows
            tables.append({**_jsonable(f.to_dict()), "event_type": f.event_type, "key": key,
                           "uri": destination_uri(job, key), "sample": delta_samples.get(f.event_type, [])})
            continue
        obj = storage.objects.get(key)
        record = _jsonable(f.to_dict())
        file_docs.append({"key": key, "uri": destination_uri(job, key), **record,
                          "sample": obj.sample if obj else []})
    keys = list(dict.fromkeys(storage.order))
    return {
        "preview_version": PREVIEW_VERSION,
        "sync_job": job.name,
        "partition": pk,
        "enabled": job.enabled,
        "destination": {"kind": job.destination.kind, "root_uri": destination_uri(job, layout.root)},
        "layout": job.layout,
        "formats": [f.label for f in job.formats],
        "rows_received": staged.rows_received,
        "event_types": event_types,
        "userpilot_files": manifest.get("userpilot_files") or {},
        "files": file_docs,
        "delta_tables": tables,
        "manifest": {"key": manifest_key, "uri": destination_uri(job, manifest_key),
                     "replacing_first": replacing_first, "document": manifest},
        "keys": keys,
        "notes": notes,
    }


def _delta_sample(prepared, n: int) -> list[dict]:
    """The first rows of the day a Delta commit would add (its local Parquet parts)."""
    try:
        parts = prepared.local_parts("delta")
        return read_sample(parts[0].path, "part.parquet", n) if parts else []
    except (KeyError, ValueError, OSError):  # parts already gone: no sample
        return []


# ---------------------------------------------------------------------------------- output
def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render(doc: dict, width: int = 160) -> str:
    """The preview document as terminal text: summary, rows per event type, keys, samples, manifest."""
    lines = [f"Preview of sync job {doc['sync_job']}, partition {doc['partition']}: nothing was written, the "
             f"destination received no request.",
             f"  destination: {doc['destination']['kind']} {doc['destination']['root_uri']}",
             f"  layout {doc['layout']}, formats {', '.join(doc['formats'])}; "
             f"{doc['rows_received']:,} rows received from the source"]
    if not doc["enabled"]:
        lines.append("  the sync job is DISABLED (enabled: false): this is what its export would write once enabled")
    lines += ["", "Rows per event type:"]
    for et, e in doc["event_types"].items():
        extra = []
        if e["duplicates_dropped"]:
            extra.append(f"{e['duplicates_dropped']:,} duplicates dropped")
        if e["filtered_out"]:
            extra.append(f"{e['filtered_out']:,} filtered out")
        lines.append(f"  {et:<24} {e['rows']:>10,d}" + (f"   ({', '.join(extra)})" if extra else ""))
    if doc["userpilot_files"]:
        lines += ["", "Documented files:"]
        for name, e in doc["userpilot_files"].items():
            reason = f"   ({e['reason']})" if e.get("reason") else ""
            lines.append(f"  {name:<24} {e.get('status', ''):<9} {e.get('rows', 0):>10,d}" + _short(reason, width - 50))
    lines += ["", f"Object keys it would write ({len(doc['files'])} file(s), then the manifest):"]
    pad = max([len(f["key"]) for f in doc["files"]] + [len(doc["manifest"]["key"])])
    for f in doc["files"]:
        lines.append(f"  {f['key']:<{pad}}  {f['rows']:>10,d} rows {f['bytes']:>12,d} bytes")
    lines.append(f"  {doc['manifest']['key']:<{pad}}  (the manifest, written last)")
    if doc.get("delta_tables"):
        lines += ["", "Delta tables it would commit the day to (replacing the day; object names are Delta's):"]
        for t in doc["delta_tables"]:
            lines.append(f"  {t['key']:<{pad}}  {t['rows']:>10,d} rows  ({t.get('predicate', '')})")
    lines += ["", "Sample rows (first rows of each file):"]
    for f in [*doc["files"], *doc.get("delta_tables", [])]:
        lines.append(f"  {f['key'].rsplit('/', 2)[-2] + '/' + f['key'].rsplit('/', 1)[-1]}"
                     + ("" if f["sample"] else "   (no rows)"))
        for row in f["sample"]:
            lines.append("    " + _short(json.dumps(row, ensure_ascii=False, default=str), width - 4))
    lines += ["", f"Manifest it would write ({doc['manifest']['key']}):",
              json.dumps(doc["manifest"]["document"], indent=2)]
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"  - {n}" for n in doc["notes"]]
    return "\n".join(lines)


def rows_of(doc: dict) -> dict[str, int]:
    """Rows per event type of a preview document."""
    return {et: e["rows"] for et, e in doc["event_types"].items()}
