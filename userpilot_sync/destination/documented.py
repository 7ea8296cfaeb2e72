"""Write one day's documented file (``documented/day.py``) in every format of the sync job.

Like :func:`~userpilot_sync.destination.writer.write_export`: each table is encoded to local part
files (deterministic, streaming per table), then uploaded to its key from the layout
(``Layout.documented_path``). Per-tag/per-label files get one file (set of parts) per id, named
with :func:`~userpilot_sync.documented.feature_tags.escape_id`; the manifest maps each file to
its full id.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.formats import CONTENT_TYPES, write_parts
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import FileRecord
from userpilot_sync.destination.storage import Storage
from userpilot_sync.documented.day import SPLITS, DocumentedFile
from userpilot_sync.documented.feature_tags import escape_id
from userpilot_sync.errors import DestinationError
from userpilot_sync.faults import pause_point


def write_documented(doc: DocumentedFile, job: SyncJob, partition: str, storage: Storage, work_dir: Path, *,
                     taken: set[str] = frozenset(), uploaded: list[FileRecord] | None = None) -> list[FileRecord]:
    """Write ``doc`` for ``partition`` in each of ``job.file_formats``; returns its file records.

    ``taken``: paths the day's other files already use — a per-tag name that would replace one
    (e.g. a tag ``00001`` beside a ``track_feature`` export split into parts, userpilot layout)
    is refused with DestinationError before that file uploads; the day then gets no complete
    manifest. Raises DestinationError (also from the storage).
    """
    layout = layout_for(job)
    split = SPLITS.get(doc.name)
    event_type = {"track_feature_per_tag": "track_feature", "track_labeled_per_label": "track"}.get(doc.name)
    files: list[FileRecord] = []
    work_dir = Path(work_dir)
    try:
        for file_id, table in doc.tables():
            escaped = escape_id(file_id) if split else None
            for spec in job.file_formats:  # delta is a table per event type; documented files are files
                label = doc.name if not split else f"{split[0]}_{escaped}"
                parts = write_parts(iter(table.to_batches()), table.schema, spec, work_dir / spec.format, label,
                                    max_rows=job.max_file_rows, max_bytes=job.max_file_bytes)
                content_type = "application/gzip" if spec.extension.endswith(".gz") else CONTENT_TYPES[spec.format]
                for i, part in enumerate(parts):
                    rel = layout.documented_path(partition, doc.name, spec.extension, i, len(parts), split, escaped)
                    if rel in taken:
                        raise DestinationError(
                            f"sync job {job.name!r}, partition {partition}, file {doc.name}: the file for id "
                            f"{file_id!r} would be written to {rel}, which another file of the day uses; "
                            f"remove track_feature_per_tag/track_labeled_per_label from userpilot_files or set "
                            f"layout: hive, then re-export the day.")
                    storage.put_file(layout.key(rel), part.path, content_type=content_type)
                    pause_point("uploading")
                    part.path.unlink()
                    files.append(FileRecord(path=rel, event_type=event_type, format=spec.format,
                                            compression=spec.compression or "none", part=i, rows=part.rows,
                                            bytes=part.bytes, sha256=part.sha256, file=doc.name, id=file_id))
                    if uploaded is not None:
                        uploaded.append(files[-1])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return files
