"""IO managers: staging (raw events on local disk) and destinations (local, S3, GCS).

* :class:`StagingIOManager` — ``<job>/raw_events`` outputs are already on disk (the stager wrote
  them); it records nothing else and loads the :class:`~userpilot_sync.staging.StagedDay`
  record for downstream export assets.
* :class:`DestinationIOManager` — one per sync job. Export assets hand it a
  :class:`~userpilot_sync.export.PreparedExport` (validated, ordered files in staging); it
  streams them out in every format of the sync job through the destination's storage and adds
  the materialization metadata. The manifest asset hands it the manifest document, written
  last. It never loads anything from the customer's bucket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dagster as dg

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.layout import Layout
from userpilot_sync.destination.manifest import FileRecord
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.writer import layout_for, write_export, write_manifest
from userpilot_sync.errors import SourceError
from userpilot_sync.export import PreparedExport
from userpilot_sync.partitions import parse_partition
from userpilot_sync.defs.state import COUNTS_KEY, FILES_KEY, FINGERPRINT_KEY, destination_fingerprint
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


@dataclass(frozen=True)
class LookupTables:
    """Lookup tables by kind (flows, checklists, ...), handed to the destination IO manager."""

    tables: dict


class StagingIOManager(dg.IOManager):
    """Hands staged partitions from ``<job>/raw_events`` to the export assets."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def handle_output(self, context: dg.OutputContext, obj: StagedDay) -> None:
        # The stager already wrote the data and its staged.json record.
        return None

    def load_input(self, context: dg.InputContext) -> StagedDay:
        sync_job = context.asset_key.path[0]
        partition = context.asset_partition_key
        folder = partition_dir(self.root, sync_job, partition)
        if not (folder / "staged.json").exists():
            raise SourceError(
                f"sync job {sync_job!r}, partition {partition}: no staged raw events (staging is removed once a "
                f"partition's manifest is written). Materialize {sync_job}/raw_events together with the exports "
                f"of this partition."
            )
        return StagedDay.load(folder)


class DestinationIOManager(dg.IOManager):
    """Writes one sync job's exports and manifests to its destination (write-only)."""

    def __init__(self, job: SyncJob, staging_root: Path):
        self.job = job
        self.staging_root = Path(staging_root)
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = build_storage(self.job)
        return self._storage

    @property
    def layout(self) -> Layout:
        return layout_for(self.job)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if isinstance(obj, PreparedExport):
            self._write_export(context, obj)
        elif isinstance(obj, dict) and obj.get("manifest_version"):
            self._write_manifest(context, obj)
        elif isinstance(obj, LookupTables):
            self._write_definitions(context, obj)
        else:  # pragma: no cover - wiring error
            raise TypeError(f"DestinationIOManager cannot write {type(obj).__name__}")

    def _write_export(self, context: dg.OutputContext, prepared: PreparedExport) -> None:
        work = partition_dir(self.staging_root, self.job.name, prepared.partition) / "write" / prepared.event_type
        written = write_export(prepared, self.job, self.storage, work)
        total_bytes = sum(f.bytes for f in written.files)
        first = written.keys[0] if written.keys else self.layout.root
        context.add_output_metadata(
            {
                "dagster/row_count": prepared.rows,
                "dagster/uri": self.storage.uri(first),
                "dagster/column_schema": column_schema(prepared.event_type, prepared.exclude_columns),
                "bytes": total_bytes,
                "files": len(written.files),
                "formats": ", ".join(f.label for f in self.job.formats),
                "partition": prepared.partition,
                "duplicates_dropped": prepared.duplicates_dropped,
                "filtered_out": prepared.filtered_out,
                FILES_KEY: dg.MetadataValue.json([f.to_dict() for f in written.files]),
                COUNTS_KEY: dg.MetadataValue.json(
                    {
                        "rows": prepared.rows,
                        "rows_staged": prepared.rows_staged,
                        "filtered_out": prepared.filtered_out,
                        "duplicates_dropped": prepared.duplicates_dropped,
                        "unknown_sources": prepared.unknown_sources,
                        "unknown_statuses": prepared.unknown_statuses,
                        "entity_types": prepared.entity_types,
                    }
                ),
                FINGERPRINT_KEY: destination_fingerprint(self.job),
            }
        )

    def _write_manifest(self, context: dg.OutputContext, manifest: dict) -> None:
        key = write_manifest(manifest, self.job, self.storage)
        deleted = []
        if manifest.get("deleted"):
            for path in manifest["deleted"]:
                self.storage.delete(self.layout.key(path))
                deleted.append(path)
        partition = manifest["partition"]
        removed = self._clean_staging(partition)
        context.add_output_metadata(
            {
                "dagster/uri": self.storage.uri(key),
                "dagster/row_count": sum(manifest["event_types"].values()),
                "files": len(manifest["files"]),
                "bytes": sum(f["bytes"] for f in manifest["files"]),
                "source_rows": manifest["source"].get("source_rows", 0),
                "superseded": dg.MetadataValue.json(manifest["superseded"]),
                "deleted": dg.MetadataValue.json(deleted),
                "staging_removed": dg.MetadataValue.json(removed),
                FILES_KEY: dg.MetadataValue.json(manifest["files"]),
                "manifest": dg.MetadataValue.json(manifest),
                FINGERPRINT_KEY: destination_fingerprint(self.job),
            }
        )

    def _write_definitions(self, context: dg.OutputContext, lookups: LookupTables) -> None:
        from userpilot_sync.source.lookups import write_definitions

        work = self.staging_root / self.job.name
        work.mkdir(parents=True, exist_ok=True)
        written = write_definitions(self.job, self.storage, lookups.tables, work_dir=work)
        context.add_output_metadata(
            {
                "dagster/row_count": sum(f.rows for f in written),
                "dagster/uri": self.storage.uri(self.layout.key("definitions")),
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


def files_from_metadata(value) -> list[FileRecord]:
    """FileRecords from a ``userpilot/files`` metadata value."""
    if isinstance(value, str):
        value = json.loads(value)
    return [FileRecord(**f) for f in (value or [])]
