"""Build the :class:`~userpilot_sync.destination.storage.Storage` of a sync job's destination."""

from __future__ import annotations

from pathlib import Path

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.journal import UploadJournal
from userpilot_sync.destination.storage import LocalStorage, Storage


def build_storage(job: SyncJob, generations: dict[str, int] | None = None,
                  journal: UploadJournal | None = None) -> Storage:
    """The storage backend of ``job.destination`` (local folder, S3 or GCS).

    ``generations`` (GCS only): ``{object key: generation}`` recorded for earlier writes, used as
    upload preconditions; the storage's ``written`` holds the new generations afterwards.
    ``journal`` (local and S3): records pending writes so the next run can clean what a killed
    process left (``destination/journal.py``); GCS resumable sessions need none (they expire and
    never create an object), so a GCS storage ignores it.
    """
    dest = job.destination
    if dest.kind == "local":
        return LocalStorage(Path(dest.path), journal=journal)
    if dest.kind == "s3":
        from userpilot_sync.destination.s3 import S3Storage

        return S3Storage.from_config(job, journal=journal)
    if dest.kind == "gcs":
        from userpilot_sync.destination.gcs import GcsStorage

        return GcsStorage.from_config(job, generations=dict(generations or {}))
    raise ValueError(f"sync job {job.name!r}: unknown destination kind {dest.kind!r}")
