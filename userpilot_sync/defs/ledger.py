"""The ledger: every fact about a sync job that later runs need, kept in the Dagster instance.

The customer's bucket is write-only, so what a run must know about earlier runs lives here, as
materialization (and observation) metadata of the sync job's assets, one record per day:

================================  ==========================================================
metadata key                      meaning (per day, on the day's own materialization)
================================  ==========================================================
``userpilot/ledger_version``      2 (records without it were written by version 1, below)
``userpilot/destination_fingerprint``  the destination the record was written to
``userpilot/status``              ``exported`` | ``failed`` | ``refused`` (a day of a range run
                                  that got no files; Dagster records every day of a range)
``userpilot/files``               the day's files: path (relative to the sync folder), uri,
                                  event_type, format, compression, part, rows, bytes, sha256
``userpilot/generations``         GCS only: ``{object key: generation}`` (next preconditions)
``userpilot/superseded``          manifest only: paths earlier exports wrote, no longer produced
``userpilot/deleted``             manifest only: superseded paths actually deleted
``rows_received``                 raw_events only: rows the source delivered for the day
================================  ==========================================================

Version 1 (before the per-day records) wrote the same facts as ``{partition: value}`` maps
(``userpilot/files``, ``userpilot/generations``, ``superseded``, ``deleted``) and the source facts
as ``userpilot/staged``; this module reads both, so destination immutability and superseded-file
tracking survive an upgrade. Every read pages through the instance (never silently truncated).
Within a run, values flow through Dagster outputs; the ledger is read only for earlier runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.errors import DestinationError

LEDGER_VERSION = 2
VERSION_KEY = "userpilot/ledger_version"
FINGERPRINT_KEY = "userpilot/destination_fingerprint"
STATUS_KEY = "userpilot/status"
FILES_KEY = "userpilot/files"
GENERATIONS_KEY = "userpilot/generations"
SUPERSEDED_KEY = "userpilot/superseded"
DELETED_KEY = "userpilot/deleted"
ROWS_RECEIVED_KEY = "rows_received"
#: Version-1 keys (read only).
V1_SUPERSEDED_KEY = "superseded"
V1_DELETED_KEY = "deleted"
V1_STAGED_KEY = "userpilot/staged"

STATUS_EXPORTED = "exported"
STATUS_FAILED = "failed"
STATUS_REFUSED = "refused"

PAGE_SIZE = 500


def destination_fingerprint(job: SyncJob) -> str:
    """A short, stable hash of the fixed part of a destination (kind, bucket/project/path, prefix)."""
    text = json.dumps(job.destination.fingerprint(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _value(event, key: str) -> Any:
    """The plain value of one metadata entry of a materialization/observation (None if absent)."""
    if event is None or key not in event.metadata:
        return None
    value = event.metadata[key]
    return getattr(value, "value", value)


def _is_v1(event) -> bool:
    return _value(event, VERSION_KEY) is None


def _of_day(event, key: str, partition: str, v1_key: str | None = None) -> Any:
    """The value of ``key`` for ``partition``: the record's own (v2) or its entry in a v1 map."""
    if _is_v1(event):
        value = _value(event, v1_key or key)
        return (value or {}).get(partition) if isinstance(value, dict) else None
    return _value(event, key)


def record_metadata(job: SyncJob, status: str, **facts: Any) -> dict[str, Any]:
    """The ledger entries every per-day record carries (status, fingerprint, version) plus ``facts``.

    Lists and dicts become JSON metadata; everything else is passed through.
    """
    metadata: dict[str, Any] = {
        VERSION_KEY: LEDGER_VERSION,
        STATUS_KEY: status,
        FINGERPRINT_KEY: destination_fingerprint(job),
    }
    for key, value in facts.items():
        metadata[key] = dg.MetadataValue.json(value) if isinstance(value, (list, dict)) else value
    return metadata


class Ledger:
    """Reads (and records partial writes of) one sync job's facts in a Dagster instance."""

    def __init__(self, instance: dg.DagsterInstance, keys: SyncJobKeys):
        self.instance = instance
        self.keys = keys

    # ------------------------------------------------------------------ paging
    def _records(self, key: dg.AssetKey, partition: str | list[str] | None = None, *, observations: bool = False,
                 newest_first: bool = True) -> Iterator[Any]:
        """Every materialization (or observation) record of ``key`` (of one or several partitions), paged."""
        fetch = self.instance.fetch_observations if observations else self.instance.fetch_materializations
        partitions = [partition] if isinstance(partition, str) else partition
        flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions or None)
        cursor = None
        while True:
            result = fetch(flt, limit=PAGE_SIZE, cursor=cursor, ascending=not newest_first)
            yield from result.records
            if not result.has_more:
                return
            cursor = result.cursor

    def _newest(self, key: dg.AssetKey, partition: str | None = None, *, observations: bool = False):
        fetch = self.instance.fetch_observations if observations else self.instance.fetch_materializations
        flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
        records = fetch(flt, limit=1).records
        return records[0] if records else None

    # ------------------------------------------------------------------ destination fingerprint
    def recorded_fingerprint(self) -> str | None:
        """The destination fingerprint of the sync job's newest record that has one, if any."""
        newest = None
        for key in self.keys.destination_assets:
            record = self._newest(key)  # every record carries the fingerprint; page only if one does not
            if record is not None and not _value(record.asset_materialization, FINGERPRINT_KEY):
                record = next((r for r in self._records(key) if _value(r.asset_materialization, FINGERPRINT_KEY)), None)
            if record is not None and (newest is None or record.storage_id > newest.storage_id):
                newest = record
        return None if newest is None else str(_value(newest.asset_materialization, FINGERPRINT_KEY))

    def check_destination_unchanged(self) -> str:
        """Raise DestinationError when the destination differs from the recorded one.

        Returns the current fingerprint. A sync job's destination is fixed at its first export
        (Userpilot Data Sync: a new destination means a new sync job).
        """
        job = self.keys.job
        current = destination_fingerprint(job)
        recorded = self.recorded_fingerprint()
        if recorded and recorded != current:
            raise DestinationError(
                f"sync job {job.name!r}: the destination changed since the first export "
                f"(recorded fingerprint {recorded}, now {current} for {job.destination.kind} "
                f"{json.dumps(job.destination.fingerprint(), sort_keys=True)}). A destination cannot be "
                f"changed after setup: restore the original destination in {job.source_file or 'the sync job file'}, "
                f"or create a new sync job (new name and sync_id) for the new destination. Nothing was written."
            )
        return current

    # ------------------------------------------------------------------ files per day
    def earlier_paths(self, partition: str) -> set[str]:
        """Every path an earlier export of ``partition`` wrote and has not deleted (see
        :meth:`earlier_paths_by_day`)."""
        return self.earlier_paths_by_day([partition])[partition]

    def earlier_paths_by_day(self, partitions: list[str]) -> dict[str, set[str]]:
        """Per day of ``partitions``: every path an earlier export wrote and has not deleted.

        The union over all recorded export and manifest materializations and the observations of
        failed writes (oldest first), not only the last manifest: a run that failed before its
        manifest may have written parts that a new file list no longer has. One paged query per
        asset for all the days (a backfill range), not one per day.
        """
        events = []
        for key in [*self.keys.exports.values(), self.keys.manifest]:
            events.extend(self._records(key, list(partitions), newest_first=False))
            events.extend(self._records(key, list(partitions), observations=True, newest_first=False))
        paths: dict[str, set[str]] = {pk: set() for pk in partitions}
        for record in sorted(events, key=lambda r: r.storage_id):
            pk = record.partition_key
            if pk not in paths:
                continue
            event = record.asset_materialization or record.asset_observation
            paths[pk] |= {f["path"] for f in (_of_day(event, FILES_KEY, pk) or [])}
            paths[pk] |= set(_of_day(event, SUPERSEDED_KEY, pk, V1_SUPERSEDED_KEY) or [])
            paths[pk] -= set(_of_day(event, DELETED_KEY, pk, V1_DELETED_KEY) or [])
        return paths

    def days_started_before(self, partitions: list[str], *, run_id: str) -> set[str]:
        """Days of ``partitions`` that a run other than ``run_id`` began to write.

        A run records a day's ``raw_events`` (status exported) before it writes any file of the day,
        so this also finds days whose writer was killed before the instance heard of any file (its
        files, or even its complete manifest, may be in the destination). One paged query.
        """
        started: set[str] = set()
        for record in self._records(self.keys.raw_events, list(partitions)):
            pk = record.partition_key
            if record.run_id == run_id or pk in started:
                continue
            event = record.asset_materialization
            if _is_v1(event) or _value(event, STATUS_KEY) == STATUS_EXPORTED:
                started.add(pk)
        return started

    def exported_rows(self, event_type: str, partitions: list[str]) -> dict[str, int]:
        """Rows of ``event_type`` exported by the newest successful export of each of ``partitions``
        (days never exported, or whose newest record failed, are absent). One paged query."""
        rows: dict[str, int] = {}
        seen: set[str] = set()
        for record in self._records(self.keys.export(event_type), list(partitions)):
            pk = record.partition_key
            if pk in seen:
                continue
            seen.add(pk)
            event = record.asset_materialization
            if _is_v1(event):
                value = _of_day(event, "rows", pk)  # a v1 range record: {day: rows}
                if value is None and not isinstance(_value(event, "rows"), dict):
                    value = _value(event, "dagster/row_count")  # a v1 one-day record
                if value is not None:
                    rows[pk] = int(value)
            elif _value(event, STATUS_KEY) == STATUS_EXPORTED:
                rows[pk] = int(_value(event, "dagster/row_count") or 0)
        return rows

    def previous_manifests(self, partitions: list[str]) -> dict[str, dict]:
        """The newest complete manifest recorded for each of ``partitions`` that has one
        (``{day: manifest}``; version-1 records included). One paged query on the manifest asset."""
        found: dict[str, dict] = {}
        for record in self._records(self.keys.manifest, list(partitions)):
            pk = record.partition_key
            if pk in found:
                continue
            event = record.asset_materialization
            if not _is_v1(event) and _value(event, STATUS_KEY) != STATUS_EXPORTED:
                continue
            manifest = _value(event, "manifest")
            if _is_v1(event) and isinstance(manifest, dict) and isinstance(manifest.get(pk), dict):
                manifest = manifest[pk]  # a v1 range record: {day: manifest}
            if isinstance(manifest, dict) and manifest.get("status") != "replacing":
                found[pk] = manifest
        return found

    def exported_before(self, partition: str, *, run_id: str) -> bool:
        """True when a run other than ``run_id`` wrote files of ``partition`` (GCS overwrite: refuse)."""
        for key in [self.keys.manifest, *self.keys.exports.values()]:
            for record in self._records(key, partition):
                if record.run_id != run_id and _of_day(record.asset_materialization, FILES_KEY, partition):
                    return True
        return False

    def generations(self, key: dg.AssetKey, partition: str) -> dict[str, int]:
        """GCS generations recorded for ``key``'s objects of ``partition`` (newest record wins)."""
        candidates = [r for r in (self._newest(key, partition), self._newest(key, partition, observations=True)) if r]
        newest = max(candidates, key=lambda r: r.storage_id, default=None)
        if newest is None:
            return {}
        event = newest.asset_materialization or newest.asset_observation
        return {k: int(v) for k, v in (_of_day(event, GENERATIONS_KEY, partition) or {}).items()}

    # ------------------------------------------------------------------ source facts
    def rows_received(self, partition: str) -> int | None:
        """Rows the source delivered for ``partition`` in its newest successful export, if any."""
        for record in self._records(self.keys.raw_events, partition):
            event = record.asset_materialization
            if _is_v1(event):
                staged = _of_day(event, V1_STAGED_KEY, partition) or {}
                if "source_rows" in staged and not staged.get("error"):
                    return int(staged["source_rows"])
                continue
            if _value(event, STATUS_KEY) == STATUS_EXPORTED:
                return int(_value(event, ROWS_RECEIVED_KEY) or 0)
        return None

    # ------------------------------------------------------------------ partial writes
    def record_partial_write(self, key: dg.AssetKey, partition: str, files: list[dict],
                             generations: dict[str, int] | None, reason: str, *,
                             superseded: list[str] | None = None, deleted: list[str] | None = None) -> None:
        """Keep what a failed write already did, as an asset observation of the day.

        The paths uploaded (a later manifest lists them as superseded), on GCS their generations
        (the next run's preconditions must match), and for a manifest the superseded paths it
        named and those already deleted.
        """
        metadata = {VERSION_KEY: LEDGER_VERSION, "reason": reason,
                    FILES_KEY: dg.MetadataValue.json(files)}
        if generations is not None:
            metadata[GENERATIONS_KEY] = dg.MetadataValue.json(generations)
        if superseded is not None:
            metadata[SUPERSEDED_KEY] = dg.MetadataValue.json(superseded)
        if deleted is not None:
            metadata[DELETED_KEY] = dg.MetadataValue.json(deleted)
        self.instance.report_runless_asset_event(dg.AssetObservation(asset_key=key, partition=partition, metadata=metadata))
