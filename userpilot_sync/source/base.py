"""The interface every source of raw events implements.

A source answers an :class:`ExtractRequest` (one sync job, a UTC window [start, end), the event
types wanted) with an :class:`Extraction`: an iterator of Arrow record batches in the *chunk
record shape* of the Bulk Data Export API (Event Schema columns, leniently typed, see
``normalize.py``) plus facts about the extraction (export job id, chunk names) for the manifest.
Batches are bounded in size; no source holds a whole day in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Protocol

import pyarrow as pa


@dataclass(frozen=True)
class ExtractRequest:
    """What to extract: a sync job's events in [start, end) UTC of the given event types."""

    sync_job: str
    app_token: str
    start: datetime
    end: datetime
    event_types: tuple[str, ...]
    #: A private folder the source may use for downloads (removed by the caller).
    work_dir: Path


@dataclass(frozen=True)
class SourceBatch:
    """One record batch and where it came from (a chunk file name, for error messages)."""

    where: str
    data: pa.RecordBatch | pa.Table


@dataclass
class Extraction:
    """The batches of one extraction and the facts recorded about it.

    ``facts`` is filled while ``batches`` is consumed (e.g. the export job id, chunk count) and
    is JSON-serialisable; it ends up in the staging record and the manifest's ``source``.
    """

    batches: Iterator[SourceBatch]
    facts: dict[str, Any] = field(default_factory=dict)


class EventSource(Protocol):
    """A source of raw events (demo generator, local files, Bulk Data Export API)."""

    kind: str

    def extract(self, request: ExtractRequest) -> Extraction:
        """Start extracting; the returned batches stream the window's events."""
        ...
