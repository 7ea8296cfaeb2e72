"""Write an app's lookup tables (flows, checklists, surveys, feature tags, ...) to a destination.

Each table becomes ``<sync folder>/lookups/<kind>.parquet`` (Parquet, zstd, deterministic bytes:
the same table gives the same file), uploaded through the write-only :class:`Storage`. The
tables come validated from the source (``userpilot_sync.source.lookups``); nothing is read back.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.storage import Storage

if TYPE_CHECKING:  # pragma: no cover
    from userpilot_sync.config.model import SyncJob


@dataclass(frozen=True)
class LookupFile:
    """One written lookup file: path relative to the sync folder, rows, bytes, sha256 (hex)."""

    kind: str
    path: str
    rows: int
    bytes: int
    sha256: str


def write_lookups(job: "SyncJob", storage: Storage, tables: Mapping[str, pa.Table],
                  work_dir: Path | None = None) -> list[LookupFile]:
    """Write each table to ``<sync folder>/lookups/<kind>.parquet``, in kind order.

    Raises DestinationError (from the storage) when an upload fails; files uploaded before stay.
    """
    layout = layout_for(job)
    written: list[LookupFile] = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for kind in sorted(tables):
            path = Path(tmp) / f"{kind}.parquet"
            pq.write_table(tables[kind], path, compression="zstd")
            data = path.read_bytes()
            rel = layout.lookups_path(kind)
            storage.put_file(layout.key(rel), path, content_type="application/vnd.apache.parquet")
            written.append(LookupFile(kind, rel, tables[kind].num_rows, len(data), hashlib.sha256(data).hexdigest()))
    return written
