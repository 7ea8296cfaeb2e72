"""Upload one prepared export's encoded files to a destination, and the manifest last.

The export was encoded once, while it was validated (``export.prepare_export``: local part files
per format); here each part is uploaded to its deterministic key (``layout.py``) and removed
locally. Data files of a partition go first; the manifest, written by :func:`write_manifest`,
goes last. An export with no rows has no parts, so nothing is uploaded for it (its manifest entry
says ``rows: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.formats import CONTENT_TYPES
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import FileRecord, manifest_bytes
from userpilot_sync.destination.storage import Storage
from userpilot_sync.export import PreparedExport
from userpilot_sync.faults import pause_point

if TYPE_CHECKING:
    from userpilot_sync.destination.delta import DeltaWriter


@dataclass(frozen=True)
class WrittenExport:
    """What writing one export produced: its files (relative paths) and their full keys."""

    files: list[FileRecord]
    keys: list[str]


def write_export(prepared: PreparedExport, job: SyncJob, storage: Storage, work_dir: Path | None = None,
                 uploaded: list[FileRecord] | None = None, delta: "DeltaWriter | None" = None) -> WrittenExport:
    """Upload the parts ``prepared`` holds for each of ``job.formats``. Returns the file records.

    ``uploaded``, when given, receives each file's record as soon as its upload succeeded, so a
    caller can record what a failed export already replaced. ``work_dir`` is unused (the parts
    were encoded while the export was prepared) and kept for callers of the earlier signature.

    Raises DestinationError (from the storage) when an upload fails; parts already uploaded stay
    (they are replaced by the next export of the partition, and no manifest points at them), and
    KeyError when ``prepared`` holds no parts of one of the sync job's formats.

    The ``delta`` format is a commit to the event type's Delta table, not files: ``delta`` (a
    :class:`~userpilot_sync.destination.delta.DeltaWriter`; default: the sync job's own, the
    standard credential chains) commits the day, and its record
    (:class:`~userpilot_sync.destination.delta.DeltaCommit`, never in ``uploaded``) joins the files.
    """
    layout = layout_for(job)
    files: list[FileRecord] = []
    keys: list[str] = []
    for spec in job.formats:
        if spec.format == "delta":
            from userpilot_sync.destination.delta import DeltaWriter

            files.append((delta or DeltaWriter(job)).commit(prepared, spec, storage))
            keys.append(layout.key(files[-1].path))
            continue
        parts = prepared.local_parts(spec.format)
        # No Content-Encoding: clients would decompress on download and break the sha256.
        content_type = "application/gzip" if spec.extension.endswith(".gz") else CONTENT_TYPES[spec.format]
        for i, part in enumerate(parts):
            rel = layout.data_path(prepared.partition, prepared.event_type, spec.extension, i, len(parts))
            key = layout.key(rel)
            storage.put_file(key, part.path, content_type=content_type)
            pause_point("uploading")
            part.path.unlink(missing_ok=True)
            files.append(
                FileRecord(
                    path=rel,
                    event_type=prepared.event_type,
                    format=spec.format,
                    compression=spec.compression or "none",
                    part=i,
                    rows=part.rows,
                    bytes=part.bytes,
                    sha256=part.sha256,
                )
            )
            keys.append(key)
            if uploaded is not None:
                uploaded.append(files[-1])
    return WrittenExport(files=files, keys=keys)


def write_manifest(manifest: dict, job: SyncJob, storage: Storage) -> str:
    """Upload a partition's manifest (last). Returns its object key."""
    key = layout_for(job).key(layout_for(job).manifest_path(manifest["partition"]))
    storage.put_bytes(key, manifest_bytes(manifest), content_type=CONTENT_TYPES["json"])
    return key
