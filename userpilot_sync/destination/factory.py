"""Build the :class:`~userpilot_sync.destination.storage.Storage` of a sync job's destination."""

from __future__ import annotations

from pathlib import Path

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.storage import LocalStorage, Storage


def build_storage(job: SyncJob, generations: dict[str, int] | None = None) -> Storage:
    """The storage backend of ``job.destination`` (local folder, S3 or GCS).

    ``generations`` (GCS only): ``{object key: generation}`` recorded for earlier writes, used as
    upload preconditions; the storage's ``written`` holds the new generations afterwards.
    """
    dest = job.destination
    if dest.kind == "local":
        return LocalStorage(Path(dest.path))
    if dest.kind == "s3":
        from userpilot_sync.destination.s3 import S3Storage

        return S3Storage.from_config(job)
    if dest.kind == "gcs":
        from userpilot_sync.destination.gcs import GcsStorage

        return GcsStorage.from_config(job, generations=dict(generations or {}))
    raise ValueError(f"sync job {job.name!r}: unknown destination kind {dest.kind!r}")
