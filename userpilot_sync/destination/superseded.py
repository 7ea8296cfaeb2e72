"""Files a re-export no longer produces ("superseded"), and their optional deletion.

A re-export of a partition (retry, overlapping backfill, sync back) writes the same deterministic
keys, but may produce fewer files than before: fewer parts after ``max_file_rows`` /
``max_file_bytes`` changed, a dropped format, an event type filtered out. Those old files are
named in the new manifest's ``superseded`` list and deleted only when the sync job sets
``destination.allow_deletes`` (which then needs the delete permission). The previous file list
comes from the Dagster instance (every export, manifest and partial-write record of the
partition), never from the bucket.
"""

from __future__ import annotations

from typing import Any, Iterable

from userpilot_sync.destination.delta import is_delta_path
from userpilot_sync.destination.layout import Layout
from userpilot_sync.destination.storage import Storage


def _path(f: Any) -> str:
    if isinstance(f, str):
        return f
    if isinstance(f, dict):
        return f["path"]
    return f.path


def superseded_paths(previous_files: Iterable[Any], new_files: Iterable[Any]) -> list[str]:
    """Paths (relative to the sync folder) in ``previous_files`` but not in ``new_files``, sorted.

    Each item is a path string, a manifest ``files`` entry (dict with ``path``) or a FileRecord.
    Paths in the Delta tables' folder (``_delta/``) are never superseded: Delta replaces a day by a
    commit of its own (``destination/delta.py``).
    """
    new = {_path(f) for f in new_files}
    return sorted({p for p in map(_path, previous_files) if not is_delta_path(p)} - new)


def delete_superseded(storage: Storage, layout: Layout, paths: Iterable[str], *, allow_deletes: bool,
                      deleted: list[str] | None = None) -> list[str]:
    """Delete superseded ``paths`` when ``allow_deletes``; returns the paths deleted (else ``[]``).

    ``deleted``, when given, receives each path as soon as its delete succeeded (so a caller can
    record what a failed call already removed). Raises DestinationError from the storage (e.g. the
    credential lacks the delete permission).
    """
    done: list[str] = [] if deleted is None else deleted
    if not allow_deletes:
        return done
    for path in sorted(set(paths)):
        if is_delta_path(path):  # a Delta table's files belong to its log, never to this cleanup
            continue
        storage.delete(layout.key(path))
        done.append(path)
    return done
