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

    def skipped_files(self, limit: int = 50) -> tuple[list[dict[str, str]], int]:
        """Files below the folder that are not read, with why (at most ``limit``), and their count:
        hidden or ``_``-files, and names that are not a chunk format (e.g. ``.ndjson.zst``, ``.txt``)."""
        skipped = []
        for p in sorted(self.path.rglob("*"), key=lambda p: p.relative_to(self.path).as_posix()):
            if not p.is_file():
                continue
            rel = p.relative_to(self.path)
            if any(part.startswith((".", "_")) for part in rel.parts):
                reason = "hidden or '_' name (not a chunk by convention)"
            elif not chunk_format(p):
                reason = ("not a chunk format (parquet, ndjson, csv, avro; ndjson/csv may end in .gz): "
                          f"{''.join(p.suffixes) or 'no extension'}")
            else:
                continue
            skipped.append({"file": rel.as_posix(), "reason": reason})
        return skipped[:limit], len(skipped)

    def extract(self, request: ExtractRequest) -> Extraction:
        files = self.chunk_files()
        skipped, n_skipped = self.skipped_files()
        facts = {"kind": self.kind, "chunks": len(files), "files_skipped": n_skipped, "skipped": skipped}

        def batches() -> Iterator[SourceBatch]:
            for path in files:
                name = path.relative_to(self.path).as_posix()
                for batch in iter_chunk_batches(path):
                    yield SourceBatch(where=f"chunk {name}", data=batch)

        return Extraction(batches=batches(), facts=facts)
