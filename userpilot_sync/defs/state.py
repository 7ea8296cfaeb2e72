"""State the exporter keeps in the Dagster instance (never in the customer's bucket).

* every export/manifest materialization carries ``userpilot/destination_fingerprint``; the
  first one fixes the sync job's destination, and :func:`check_destination_unchanged` refuses
  a run whose destination differs;
* export materializations carry, keyed by partition, ``userpilot/files`` (the manifest entries
  of their files), ``userpilot/counts``, ``userpilot/failed`` (days that could not be exported)
  and, on GCS, ``userpilot/generations`` (object key -> generation, the preconditions of the next
  overwrite); raw_events carries ``userpilot/staged`` (source facts per day). The manifest asset
  reads them back per partition.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.errors import DestinationError

FINGERPRINT_KEY = "userpilot/destination_fingerprint"
FILES_KEY = "userpilot/files"
COUNTS_KEY = "userpilot/counts"
FAILED_KEY = "userpilot/failed"
GENERATIONS_KEY = "userpilot/generations"
STAGED_KEY = "userpilot/staged"


def destination_fingerprint(job: SyncJob) -> str:
    """A short, stable hash of the fixed part of a destination (kind, bucket/project/path, prefix)."""
    text = json.dumps(job.destination.fingerprint(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> dg.AssetMaterialization | None:
    """The newest materialization of ``key`` (of one partition when given), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records:
        return None
    return records[0].asset_materialization


def metadata_value(mat: dg.AssetMaterialization | None, key: str) -> Any:
    """The plain value of one metadata entry of a materialization (None when absent)."""
    if mat is None or key not in mat.metadata:
        return None
    value = mat.metadata[key]
    return getattr(value, "value", value)


def recorded_fingerprint(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]) -> str | None:
    """The destination fingerprint recorded by the sync job's earlier exports, if any."""
    for key in keys:
        value = metadata_value(latest_materialization(instance, key), FINGERPRINT_KEY)
        if value:
            return str(value)
    return None


def check_destination_unchanged(instance: dg.DagsterInstance, job: SyncJob, keys: Iterable[dg.AssetKey]) -> str:
    """Raise DestinationError when the sync job's destination differs from the recorded one.

    Returns the current fingerprint. The destination of a sync job is fixed at its first export
    (Userpilot Data Sync: a new destination means a new sync job).
    """
    current = destination_fingerprint(job)
    recorded = recorded_fingerprint(instance, keys)
    if recorded and recorded != current:
        raise DestinationError(
            f"sync job {job.name!r}: the destination changed since the first export "
            f"(recorded fingerprint {recorded}, now {current} for {job.destination.kind} "
            f"{json.dumps(job.destination.fingerprint(), sort_keys=True)}). A destination cannot be "
            f"changed after setup: restore the original destination in {job.source_file or 'the sync job file'}, "
            f"or create a new sync job (new name and sync_id) for the new destination. Nothing was written."
        )
    return current
