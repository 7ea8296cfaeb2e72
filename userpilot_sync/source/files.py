"""The local-files source: a folder of export chunk files as the Bulk Data Export API delivers them.

Any number of files per day, in parquet, ndjson, csv or avro (ndjson/csv may be gzipped),
anywhere below ``path`` (names starting with ``.`` or ``_`` are skipped); rows are assigned to partitions by ``inserted_at`` (the stager keeps
only the requested window). Files are read in name order, streamed in batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from userpilot_sync.errors import SourceError
from userpilot_sync.source.base import Extraction, ExtractRequest, SourceBatch
from userpilot_sync.source.chunks import chunk_format, iter_chunk_batches


class FilesSource:
    """Reads every chunk file below ``path`` (sorted by relative path)."""

    kind = "files"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def chunk_files(self) -> list[Path]:
        """All chunk files below the folder, in a stable order. Raises SourceError if missing."""
        if not self.path.is_dir():
            raise SourceError(f"source folder {self.path} does not exist; check the sync job's source.path")
        return sorted(
            (
                p for p in self.path.rglob("*")
                # hidden files and "_"-files (e.g. a _manifest.json copied along) are not chunks
                if p.is_file() and chunk_format(p)
                and not any(part.startswith((".", "_")) for part in p.relative_to(self.path).parts)
            ),
            key=lambda p: p.relative_to(self.path).as_posix(),
        )

    def extract(self, request: ExtractRequest) -> Extraction:
        files = self.chunk_files()
        facts = {"kind": self.kind, "chunks": len(files)}

        def batches() -> Iterator[SourceBatch]:
            for path in files:
                name = path.relative_to(self.path).as_posix()
                for batch in iter_chunk_batches(path):
                    yield SourceBatch(where=f"chunk {name}", data=batch)

        return Extraction(batches=batches(), facts=facts)
