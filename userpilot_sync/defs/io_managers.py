"""IO managers: staging (raw events on local disk) and destinations (local, S3, GCS).

Every output covers one or more partitions: a run launched for one day covers one, a backfill
run (backfill policy ``multi_run``) covers a range of days. Values are therefore keyed by
partition, and so is the metadata that later steps read back from the instance
(``userpilot/files``, ``userpilot/counts``, ``userpilot/generations``, ``userpilot/failed``).
Dagster records one materialization per partition of the range, each with the whole output's
metadata; the per-day entries inside it are the per-day record.

* :class:`StagingIOManager` — ``<job>/raw_events`` outputs are already on disk (the stager wrote
  them); it loads the :class:`~userpilot_sync.staging.StagedDay` records for downstream exports.
* :class:`DestinationIOManager` — one per sync job. Export assets hand it an
  :class:`ExportBatch` (validated, ordered files in staging, per day); it streams them out in
  every format of the sync job through the destination's storage. The manifest asset hands it a
  :class:`ManifestBatch`, written last. It never loads anything from the customer's bucket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.layout import Layout
from userpilot_sync.destination.manifest import FileRecord
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.superseded import delete_superseded
from userpilot_sync.destination.writer import layout_for, write_export, write_manifest
from userpilot_sync.defs.state import (
    COUNTS_KEY,
    FAILED_KEY,
    FILES_KEY,
    FINGERPRINT_KEY,
    GENERATIONS_KEY,
    destination_fingerprint,
    metadata_value,
)
from userpilot_sync.export import PreparedExport
from userpilot_sync.partitions import parse_partition
from userpilot_sync.schema.events import export_columns
from userpilot_sync.staging import StagedDay, partition_dir, remove_staged


def column_schema(event_type: str, exclude_columns) -> dg.TableSchema:
    """The export's columns as a Dagster TableSchema (shown in the UI)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=str(c.arrow_type),
                description=c.description,
                constraints=dg.TableColumnConstraints(nullable=c.nullable),
            )
            for c in export_columns(event_type, exclude_columns)
        ]
    )


@dataclass
class ExportBatch:
    """Prepared exports of one event type, per partition; ``failed`` maps bad days to the error."""

    event_type: str
    exports: dict[str, PreparedExport]
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestBatch:
    """Manifests to write, per partition; ``failed`` maps days that get no manifest to why."""

    manifests: dict[str, dict]
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LookupTables:
    """Lookup tables by kind (flows, checklists, ...), handed to the destination IO manager."""

    tables: dict


class StagingIOManager(dg.IOManager):
    """Hands staged partitions from ``<job>/raw_events`` to the export assets."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        # The stager already wrote the data and its staged.json records.
        return None

    def load_input(self, context: dg.InputContext) -> dict[str, StagedDay]:
        """Staged days of the run's partitions; days without staging (refused, or staging already
        removed) are left out and reported by the export asset."""
        sync_job = context.asset_key.path[0]
        staged = {}
        for partition in context.asset_partition_keys:
            folder = partition_dir(self.root, sync_job, partition)
            if (folder / "staged.json").exists():
                staged[partition] = StagedDay.load(folder)
        return staged


def _instance(context: dg.OutputContext) -> dg.DagsterInstance:
    return context.step_context.instance


class DestinationIOManager(dg.IOManager):
    """Writes one sync job's exports, manifests and definitions to its destination (write-only)."""

    def __init__(self, job: SyncJob, staging_root: Path):
        self.job = job
        self.staging_root = Path(staging_root)

    @property
    def layout(self) -> Layout:
        return layout_for(self.job)

    def _storage(self, context: dg.OutputContext, partitions: list[str]) -> tuple[Storage, dict[str, dict[str, int]]]:
        """A storage for this output, with the GCS generations recorded for its partitions."""
        recorded: dict[str, dict[str, int]] = {}
        if self.job.destination.kind == "gcs":
            instance = _instance(context)
            for pk in partitions:
                # the newest record wins: a materialization, or the observation a failed write left
                flt = dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[pk])
                candidates = [
                    *instance.fetch_materializations(flt, limit=1).records,
                    *instance.fetch_observations(flt, limit=1).records,
                ]
                newest = max(candidates, key=lambda r: r.storage_id, default=None)
                event = None if newest is None else (newest.asset_materialization or newest.asset_observation)
                recorded[pk] = dict((metadata_value(event, GENERATIONS_KEY) or {}).get(pk, {}))
        merged = {k: v for gens in recorded.values() for k, v in gens.items()}
        return build_storage(self.job, generations=merged), recorded

    @staticmethod
    def _generations_by_partition(storage: Storage, keys_by_pk: dict[str, list[str]], recorded) -> dict:
        written = getattr(storage, "written", None)
        if written is None:
            return {}
        out = {}
        for pk, keys in keys_by_pk.items():
            gens = dict(recorded.get(pk, {}))
            gens.update({k: written[k] for k in keys if k in written})
            for k in getattr(storage, "deleted", []):
                gens.pop(k, None)
            out[pk] = gens
        return out

    def _record_partial_writes(self, context: dg.OutputContext, storage: Storage, keys_by_pk, recorded,
                               uploaded: dict[str, list[FileRecord]] | None = None) -> None:
        """After a failed write, keep what was already uploaded as an asset observation: the paths
        (so a later manifest lists them as superseded) and, on GCS, their generations (so the next
        run's preconditions match)."""
        generations = self._generations_by_partition(storage, keys_by_pk, recorded)
        for pk in sorted(set(generations) | set(uploaded or {})):
            metadata = {"reason": "write failed after some uploads; kept for the next run"}
            if generations.get(pk, {}) != recorded.get(pk, {}):
                metadata[GENERATIONS_KEY] = dg.MetadataValue.json({pk: generations[pk]})
            if (uploaded or {}).get(pk):
                metadata[FILES_KEY] = dg.MetadataValue.json({pk: [f.to_dict() for f in uploaded[pk]]})
            if len(metadata) > 1:
                _instance(context).report_runless_asset_event(
                    dg.AssetObservation(asset_key=context.asset_key, partition=pk, metadata=metadata)
                )

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if isinstance(obj, ExportBatch):
            self._write_exports(context, obj)
        elif isinstance(obj, ManifestBatch):
            self._write_manifests(context, obj)
        elif isinstance(obj, LookupTables):
            self._write_definitions(context, obj)
        else:  # pragma: no cover - wiring error
            raise TypeError(f"DestinationIOManager cannot write {type(obj).__name__}")

    # ------------------------------------------------------------------ exports
    def _write_exports(self, context: dg.OutputContext, batch: ExportBatch) -> None:
        storage, recorded = self._storage(context, sorted(batch.exports))
        files: dict[str, list[dict]] = {}
        counts: dict[str, dict] = {}
        keys_by_pk: dict[str, list[str]] = {}
        for pk in sorted(batch.exports):
            prepared = batch.exports[pk]
            work = partition_dir(self.staging_root, self.job.name, pk) / "write" / prepared.event_type
            uploaded: list[FileRecord] = []
            try:
                written = write_export(prepared, self.job, storage, work, uploaded=uploaded)
            except Exception:
                # object keys carry the partition (".../<day>/..." or ".../date=<day>/...")
                keys_by_pk[pk] = [k for k in getattr(storage, "written", {}) if pk in k]
                self._record_partial_writes(context, storage, keys_by_pk, recorded, {pk: uploaded})
                raise
            files[pk] = [f.to_dict() for f in written.files]
            keys_by_pk[pk] = written.keys
            counts[pk] = {
                "rows": prepared.rows,
                "rows_staged": prepared.rows_staged,
                "filtered_out": prepared.filtered_out,
                "duplicates_dropped": prepared.duplicates_dropped,
                "unknown_sources": prepared.unknown_sources,
                "unknown_statuses": prepared.unknown_statuses,
                "entity_types": prepared.entity_types,
            }
        all_files = [f for pk in files for f in files[pk]]
        exclude = next(iter(batch.exports.values())).exclude_columns if batch.exports else self.job.filters.exclude_columns
        one_day = len(context.asset_partition_keys) == 1
        if one_day and all_files:
            uri = storage.uri(self.layout.key(all_files[0]["path"]))
        else:
            uri = storage.uri(self.layout.root)
        metadata = {
            "rows": sum(c["rows"] for c in counts.values()),
            "dagster/uri": uri,
            "dagster/column_schema": column_schema(batch.event_type, exclude),
            "bytes": sum(f["bytes"] for f in all_files),
            "files": len(all_files),
            "formats": ", ".join(f.label for f in self.job.formats),
            "partitions": ", ".join(sorted(files)) if len(files) <= 3 else f"{min(files)}..{max(files)} ({len(files)} days)",
            "duplicates_dropped": sum(c["duplicates_dropped"] for c in counts.values()),
            "filtered_out": sum(c["filtered_out"] for c in counts.values()),
            FILES_KEY: dg.MetadataValue.json(files),
            COUNTS_KEY: dg.MetadataValue.json(counts),
            FAILED_KEY: dg.MetadataValue.json(batch.failed),
            FINGERPRINT_KEY: destination_fingerprint(self.job),
        }
        if one_day and batch.exports:
            # Dagster gives every partition of a ranged output the same metadata, so the per-day
            # row count is only set for one-day outputs (ranges: see userpilot/counts per day).
            metadata["dagster/row_count"] = metadata["rows"]
        gens = self._generations_by_partition(storage, keys_by_pk, recorded)
        if gens:
            metadata[GENERATIONS_KEY] = dg.MetadataValue.json(gens)
        context.add_output_metadata(metadata)

    # ------------------------------------------------------------------ manifests
    def _write_manifests(self, context: dg.OutputContext, batch: ManifestBatch) -> None:
        storage, recorded = self._storage(context, sorted(batch.manifests))
        keys_by_pk: dict[str, list[str]] = {}
        files: dict[str, list[dict]] = {}
        deleted: dict[str, list[str]] = {}
        removed: list[str] = []
        allow_deletes = bool(getattr(self.job.destination, "allow_deletes", False))
        for pk in sorted(batch.manifests):
            manifest = batch.manifests[pk]
            try:
                key = write_manifest(manifest, self.job, storage)
            except Exception:
                self._record_partial_writes(context, storage, keys_by_pk, recorded)
                raise
            keys_by_pk[pk] = [key]
            files[pk] = manifest["files"]
            deleted[pk] = delete_superseded(storage, self.layout, manifest["deleted"], allow_deletes=allow_deletes)
            removed.extend(self._clean_staging(pk))
        manifests = list(batch.manifests.values())
        metadata = {
            "rows": sum(sum(m["event_types"].values()) for m in manifests),
            "files": sum(len(m["files"]) for m in manifests),
            "bytes": sum(f["bytes"] for m in manifests for f in m["files"]),
            "source_rows": sum(m["source"].get("source_rows", 0) for m in manifests),
            "superseded": dg.MetadataValue.json({pk: m["superseded"] for pk, m in batch.manifests.items()}),
            "deleted": dg.MetadataValue.json(deleted),
            "staging_removed": dg.MetadataValue.json(removed),
            FILES_KEY: dg.MetadataValue.json(files),
            FAILED_KEY: dg.MetadataValue.json(batch.failed),
            FINGERPRINT_KEY: destination_fingerprint(self.job),
        }
        if len(context.asset_partition_keys) == 1 and len(manifests) == 1:
            metadata["dagster/row_count"] = metadata["rows"]
            metadata["dagster/uri"] = storage.uri(keys_by_pk[manifests[0]["partition"]][0])
            metadata["manifest"] = dg.MetadataValue.json(manifests[0])
        else:
            metadata["dagster/uri"] = storage.uri(self.layout.root)
        gens = self._generations_by_partition(storage, keys_by_pk, recorded)
        if gens:
            metadata[GENERATIONS_KEY] = dg.MetadataValue.json(gens)
        context.add_output_metadata(metadata)

    # ------------------------------------------------------------------ definitions
    def _write_definitions(self, context: dg.OutputContext, lookups: LookupTables) -> None:
        from userpilot_sync.source.lookups import write_definitions

        work = self.staging_root / self.job.name
        work.mkdir(parents=True, exist_ok=True)
        storage = build_storage(self.job)
        written = write_definitions(self.job, storage, lookups.tables, work_dir=work)
        context.add_output_metadata(
            {
                "dagster/row_count": sum(f.rows for f in written),
                "dagster/uri": storage.uri(self.layout.key("definitions")),
                "bytes": sum(f.bytes for f in written),
                "files": dg.MetadataValue.json([f.__dict__ for f in written]),
                FINGERPRINT_KEY: destination_fingerprint(self.job),
            }
        )

    def _clean_staging(self, partition: str) -> list[str]:
        """Remove staged data once the manifest is written (or older than keep_staging_days)."""
        keep = self.job.keep_staging_days
        removed = []
        if keep == 0:
            if remove_staged(self.staging_root, self.job.name, partition):
                removed.append(partition)
            return removed
        cutoff = parse_partition(partition) - timedelta(days=keep)
        job_dir = self.staging_root / self.job.name
        for folder in sorted(job_dir.glob("????-??-??")) if job_dir.is_dir() else []:
            try:
                day = parse_partition(folder.name)
            except ValueError:
                continue
            if day < cutoff and remove_staged(self.staging_root, self.job.name, folder.name):
                removed.append(folder.name)
        return removed

    def load_input(self, context: dg.InputContext):
        raise NotImplementedError(
            "exports are never read back from the destination (write-only); depend on the export's asset key "
            "with deps= instead of loading it"
        )


def files_from_metadata(value, partition: str) -> list[FileRecord]:
    """FileRecords of one partition from a ``userpilot/files`` metadata value ({partition: [...]})."""
    if isinstance(value, str):
        value = json.loads(value)
    return [FileRecord(**f) for f in (value or {}).get(partition, [])]
