"""IO managers: each writes one kind of thing to a sync job's destination, and records it per day.

* :class:`ExportIOManager` writes the files of one event type (an :class:`ExportBatch`);
* :class:`DocumentedIOManager` writes one documented file of Userpilot's (a :class:`DocumentedBatch`);
* :class:`ManifestIOManager` publishes each day's manifest (a :class:`ManifestBatch`), last, and
  then deletes the superseded files it names where the sync job allows deletes;
* :class:`LookupsIOManager` writes the lookup tables (:class:`LookupTables`).

An output covers one day, or every day of a backfill range. Dagster records one materialization
per day of the range; each IO manager puts that day's own figures on it
(``step_context.add_asset_metadata(..., partition_key=day)``), in the ledger's format
(``defs/ledger.py``). Days of a range that were refused or failed before writing get a record
with ``userpilot/status`` saying so and no files. Nothing is ever loaded back from the
customer's bucket (``load_input`` refuses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from userpilot_sync.defs.failures import failure, tag_run
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.ledger import (
    DELETED_KEY,
    FILES_KEY,
    GENERATIONS_KEY,
    STATUS_EXPORTED,
    SUPERSEDED_KEY,
    Ledger,
    record_metadata,
)
from userpilot_sync.defs.resources import DestinationResource
from userpilot_sync.destination.documented import write_documented
from userpilot_sync.destination.journal import UploadJournal, clean_leftover_uploads
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import FileRecord, rows_by_event_type
from userpilot_sync.destination.storage import Storage
from userpilot_sync.destination.superseded import delete_superseded
from userpilot_sync.destination.writer import write_export, write_manifest
from userpilot_sync.errors import UserpilotSyncError
from userpilot_sync.documented.day import DocumentedFile
from userpilot_sync.export import PreparedExport
from userpilot_sync.faults import pause_point
from userpilot_sync.schema.events import export_columns


@dataclass
class ReplacingManifests:
    """The ``replacing`` manifests of the days a step re-exports (``destination/manifest.py``).

    Shared by every export output and the manifest output of one step: the first
    :class:`ExportIOManager` that writes a day writes its ``replacing`` manifest first
    (``announced`` records the day), so no file of the day is replaced while its old complete
    manifest still stands. ``generations`` carries the manifest objects' GCS generations (loaded
    from the ledger, updated by each write) to the manifest output.
    """

    manifests: dict[str, dict]
    generations: dict[str, int] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)


@dataclass
class ExportBatch:
    """Validated exports of one event type, by day, for the :class:`ExportIOManager`.

    ``not_exported`` maps days of the output that get no files to ``(status, reason)``;
    the IO manager fills ``written`` (day -> file records) as each day's upload completes.
    ``replacing``: the step's re-exported days (written before a day's first file).
    """

    event_type: str
    exports: dict[str, PreparedExport]
    not_exported: dict[str, tuple[str, str]] = field(default_factory=dict)
    written: dict[str, list[FileRecord]] = field(default_factory=dict)
    replacing: ReplacingManifests | None = None


@dataclass
class DocumentedBatch:
    """One documented file (``all_users``, ...) of each day, for the :class:`DocumentedIOManager`.

    ``files`` maps days to their :class:`~userpilot_sync.documented.day.DocumentedFile`;
    ``taken`` the paths the day's other files use (no per-tag name may replace one);
    ``not_exported``, ``written`` and ``replacing`` as in :class:`ExportBatch`.
    """

    name: str
    files: dict[str, DocumentedFile]
    not_exported: dict[str, tuple[str, str]] = field(default_factory=dict)
    written: dict[str, list[FileRecord]] = field(default_factory=dict)
    replacing: ReplacingManifests | None = None
    taken: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class ManifestBatch:
    """Complete manifests to publish, by day; ``not_exported`` and ``replacing`` as in
    :class:`ExportBatch`.

    The IO manager fills ``published`` (day -> the manifest's URI).
    """

    manifests: dict[str, dict]
    not_exported: dict[str, tuple[str, str]] = field(default_factory=dict)
    published: dict[str, str] = field(default_factory=dict)
    replacing: ReplacingManifests | None = None


@dataclass(frozen=True)
class LookupTables:
    """Lookup tables by kind (flows, checklists, ...), for the :class:`LookupsIOManager`."""

    tables: dict


def column_schema(event_type: str, exclude_columns) -> dg.TableSchema:
    """The export's columns as a Dagster TableSchema (Userpilot Event Schema; shown in the UI)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=c.name, type=str(c.arrow_type), description=c.description,
                           constraints=dg.TableColumnConstraints(nullable=c.nullable))
            for c in export_columns(event_type, exclude_columns)
        ]
    )


def _file_entries(storage: Storage, layout, files: list[FileRecord]) -> list[dict]:
    return [{**f.to_dict(), "uri": storage.uri(layout.key(f.path))} for f in files]


class _DestinationIOManager(dg.ConfigurableIOManager):
    """Shared plumbing: the sync job, its destination and the ledger of earlier runs."""

    destination: DestinationResource
    #: Local folder for encoded files before upload (under the staging root).
    work_dir: str

    @property
    def job(self):
        return self.destination.job

    def _ledger(self, context: dg.OutputContext) -> Ledger:
        return Ledger(context.step_context.instance, SyncJobKeys(self.job))

    def _storage_for(self, context: dg.OutputContext, days: list[str]) -> tuple[Storage, dict[str, dict[str, int]]]:
        """A storage with the GCS generations the ledger recorded for ``days`` of this asset."""
        recorded: dict[str, dict[str, int]] = {}
        if self.job.destination.kind == "gcs":
            ledger = self._ledger(context)
            recorded = {pk: ledger.generations(context.asset_key, pk) for pk in days}
        merged = {k: v for gens in recorded.values() for k, v in gens.items()}
        try:
            return self._storage(context, generations=merged), recorded
        except UserpilotSyncError as exc:
            label = days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}" if days else None
            raise self._fail(context, label, str(exc)) from None

    def _storage(self, context: dg.OutputContext, generations: dict[str, int] | None = None) -> Storage:
        """The destination's storage, its pending writes journaled under the staging root, after
        cleaning what killed writers of this sync job left (``destination/journal.py``; logged)."""
        journal = UploadJournal.for_sync_job(self.work_dir, self.job.name)
        storage = self.destination.storage(generations=generations, journal=journal)
        clean_leftover_uploads(journal, storage,
                               log=lambda line: context.log.warning(f"sync job {self.job.name!r}: {line}"))
        return storage

    @staticmethod
    def _generations(storage: Storage, recorded: dict[str, int], keys: list[str]) -> dict[str, int] | None:
        written = getattr(storage, "written", None)
        if written is None:
            return None
        gens = dict(recorded)
        gens.update({k: written[k] for k in keys if k in written})
        for k in getattr(storage, "deleted", []):
            gens.pop(k, None)
        return gens

    def _fail(self, context: dg.OutputContext, label: str | None, cause: str) -> dg.Failure:
        """A one-line-cause failure, also put on the run as its ``userpilot_sync/failure`` tag."""
        exc = failure(self.job.name, label, cause)
        tag_run(context.step_context.instance, context.run_id, exc)
        # Dagster runs IO managers outside the step's generator: the step cannot see this failure
        days = []
        if context.has_asset_partitions:
            days = [label] if label in context.asset_partition_keys else list(context.asset_partition_keys)
        if days:
            from userpilot_sync.defs.notifications import notify_run_days

            notify_run_days(context.step_context.instance, SyncJobKeys(self.job), context.run_id, exported={},
                            failed={pk: exc.description for pk in days}, problems={},
                            log=context.log.warning)
        return exc

    def _record_day(self, context: dg.OutputContext, partition: str, metadata: dict) -> None:
        context.step_context.add_asset_metadata(metadata, asset_key=context.asset_key, partition_key=partition)

    def _record_not_exported(self, context: dg.OutputContext, not_exported: dict[str, tuple[str, str]],
                             recorded: dict[str, dict[str, int]]) -> None:
        for pk, (status, reason) in sorted(not_exported.items()):
            if pk not in context.asset_partition_keys:
                continue
            extra = {"reason": reason}
            if self.job.destination.kind == "gcs":  # the newest record must keep the preconditions
                extra[GENERATIONS_KEY] = recorded.get(pk) or self._ledger(context).generations(context.asset_key, pk)
            self._record_day(context, pk, record_metadata(self.job, status, **extra))

    def _announce(self, context: dg.OutputContext, replacing: ReplacingManifests | None, pk: str,
                  storage: Storage) -> None:
        """Write day ``pk``'s ``replacing`` manifest once per step, before its first file."""
        if replacing is None or pk not in replacing.manifests or pk in replacing.announced:
            return
        layout = layout_for(self.job)
        key = layout.key(layout.manifest_path(pk))
        generations = getattr(storage, "generations", None)
        if generations is not None and key in replacing.generations:
            generations[key] = replacing.generations[key]
        write_manifest(replacing.manifests[pk], self.job, storage)
        replacing.announced.add(pk)
        written = getattr(storage, "written", None)
        if written is not None and key in written:  # GCS: the next write of the manifest must match
            replacing.generations[key] = written[key]
            self._ledger(context).record_partial_write(
                SyncJobKeys(self.job).manifest, pk, [], {key: written[key]},
                reason=f"replacing manifest written by run {context.run_id}")
        context.log.info(f"sync job {self.job.name!r}, partition {pk}: manifest set to 'replacing' before the "
                         f"day's files are replaced")

    def _upload_days(self, context: dg.OutputContext, storage: Storage, recorded: dict[str, dict[str, int]],
                     items: dict, written_out: dict[str, list[FileRecord]], replacing: ReplacingManifests | None,
                     write, *, what, work_name):
        """Write ``items`` (day -> what to write) day by day with ``write(day, item, work_dir,
        uploaded)``; yields ``(day, item, file records)`` after each day's upload (also kept in
        ``written_out``). On a failure, what reached the bucket (this day's files so far, the days
        done) is recorded in the ledger, and a one-line-cause dg.Failure is raised."""
        layout = layout_for(self.job)
        for pk in sorted(items):
            item = items[pk]
            work = Path(self.work_dir) / self.job.name / pk / "write" / work_name(item)
            uploaded: list[FileRecord] = []
            try:
                self._announce(context, replacing, pk, storage)
                files = write(pk, item, work, uploaded)
            except Exception as exc:
                ledger = self._ledger(context)
                keys = [k for k in getattr(storage, "written", {}) if pk in k]
                ledger.record_partial_write(context.asset_key, pk, _file_entries(storage, layout, uploaded),
                                            self._generations(storage, recorded.get(pk, {}), keys),
                                            reason="the upload failed after these files were written")
                for done in sorted(written_out):  # days of this output already complete
                    done_keys = [layout.key(f.path) for f in written_out[done]]
                    ledger.record_partial_write(context.asset_key, done, _file_entries(storage, layout, written_out[done]),
                                                self._generations(storage, recorded.get(done, {}), done_keys),
                                                reason="written by a run that failed later")
                label = (what(item) if replacing is None or pk in replacing.announced or pk not in replacing.manifests
                         else "the 'replacing' manifest")
                if isinstance(exc, UserpilotSyncError):
                    raise self._fail(context, pk, f"{label}: {exc}") from None
                raise self._fail(context, pk, f"{label}: {type(exc).__name__}: {exc}") from exc
            written_out[pk] = files
            yield pk, item, files

    def load_input(self, context: dg.InputContext):
        raise NotImplementedError(
            f"sync job {self.job.name!r}: exports are never read back from the destination (write-only)"
        )


class ExportIOManager(_DestinationIOManager):
    """Writes one event type's exports in every format of the sync job, day by day.

    Per day it records ``dagster/row_count`` (rows exported), ``dagster/uri`` (the first file),
    ``bytes``, ``files``, ``rows_received`` (rows of the event type the source delivered),
    ``duplicates_dropped``, ``filtered_out`` and ``userpilot/files`` (every file: path, uri,
    format, compression, part, rows, bytes, sha256). With the ``delta`` format also
    ``delta_version`` and ``userpilot/delta`` (the day's commit; the table is not a file of
    ``userpilot/files``). A failed upload keeps what was uploaded as an observation (ledger) and
    raises DestinationError.
    """

    def handle_output(self, context: dg.OutputContext, batch: ExportBatch) -> None:
        storage, recorded = self._storage_for(context, sorted(batch.exports))
        layout = layout_for(self.job)
        delta = None
        if any(f.format == "delta" for f in self.job.formats):
            from userpilot_sync.destination.delta import DeltaWriter

            delta = DeltaWriter(self.job, credentials_from=self.destination.aws, run_id=context.run_id)

        def write(pk, prepared, work, uploaded):
            return write_export(prepared, self.job, storage, work, uploaded=uploaded, delta=delta).files

        for pk, prepared, written_files in self._upload_days(
                context, storage, recorded, batch.exports, batch.written, batch.replacing, write,
                what=lambda prepared: f"event type {prepared.event_type!r}",
                work_name=lambda prepared: prepared.event_type):
            # a Delta commit is recorded apart: its table is never a superseded file (destination/delta.py)
            tables = [f for f in written_files if f.format == "delta"]
            written_files = [f for f in written_files if f.format != "delta"]
            files = _file_entries(storage, layout, written_files)
            metadata = record_metadata(
                self.job, STATUS_EXPORTED,
                **{FILES_KEY: files},
            )
            metadata.update({
                "dagster/row_count": prepared.rows,
                "dagster/uri": files[0]["uri"] if files else tables[0].uri if tables else storage.uri(layout.root),
                "bytes": sum(f.bytes for f in written_files),
                "files": len(written_files),
                "rows_received": prepared.rows_staged,
                "duplicates_dropped": prepared.duplicates_dropped,
                "filtered_out": prepared.filtered_out,
            })
            if tables:
                metadata["delta_version"] = tables[0].version
                metadata["userpilot/delta"] = dg.MetadataValue.json(tables[0].to_dict())
            gens = self._generations(storage, recorded.get(pk, {}), [layout.key(f.path) for f in written_files])
            if gens is not None:
                metadata[GENERATIONS_KEY] = dg.MetadataValue.json(gens)
            self._record_day(context, pk, metadata)
        self._record_not_exported(context, batch.not_exported, recorded)
        context.add_output_metadata({
            "dagster/column_schema": column_schema(batch.event_type, self.job.filters.exclude_columns),
            "formats": ", ".join(f.label for f in self.job.formats),
        })


class DocumentedIOManager(_DestinationIOManager):
    """Writes one documented file (``all_users``, ``feature_tags_breakdown``, per-tag files, ...)
    in every format of the sync job, day by day.

    Per day it records ``dagster/row_count``, ``dagster/uri`` (the first file), ``bytes``,
    ``files``, ``userpilot/status`` (exported), ``userpilot_file_status`` (complete | empty |
    absent, with ``reason``), snapshot facts (``history_start``) and ``userpilot/files``. A failed
    upload keeps what was uploaded as an observation (ledger) and raises DestinationError.
    """

    def handle_output(self, context: dg.OutputContext, batch: DocumentedBatch) -> None:
        storage, recorded = self._storage_for(context, sorted(batch.files))
        layout = layout_for(self.job)

        def write(pk, doc, work, uploaded):
            return write_documented(doc, self.job, pk, storage, work, taken=batch.taken.get(pk, set()),
                                    uploaded=uploaded)

        for pk, doc, written in self._upload_days(context, storage, recorded, batch.files, batch.written,
                                                  batch.replacing, write, what=lambda doc: f"file {doc.name}",
                                                  work_name=lambda doc: doc.name):
            files = _file_entries(storage, layout, written)
            metadata = record_metadata(self.job, STATUS_EXPORTED, **{FILES_KEY: files})
            metadata.update({
                "dagster/row_count": doc.rows,
                "dagster/uri": files[0]["uri"] if files else storage.uri(layout.root),
                "bytes": sum(f.bytes for f in written),
                "files": len(written),
                "userpilot_file_status": doc.status,
                **({"reason": doc.reason} if doc.reason else {}),
                **{k: str(v) for k, v in doc.facts.items() if v is not None},
            })
            gens = self._generations(storage, recorded.get(pk, {}), [layout.key(f.path) for f in written])
            if gens is not None:
                metadata[GENERATIONS_KEY] = dg.MetadataValue.json(gens)
            self._record_day(context, pk, metadata)
        self._record_not_exported(context, batch.not_exported, recorded)
        if batch.files:
            schema = next((d.schema for d in batch.files.values() if d.schema is not None), None)
            if schema is not None:
                context.add_output_metadata({"dagster/column_schema": dg.TableSchema(columns=[
                    dg.TableColumn(name=f.name, type=str(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable))
                    for f in schema])})


class ManifestIOManager(_DestinationIOManager):
    """Publishes each day's manifest (written after every data file of the day), then deletes the
    superseded files it lists where the sync job allows deletes.

    Per day it records ``dagster/uri`` (the manifest), ``dagster/row_count`` (rows exported, all
    event types), ``files``, ``bytes``, ``rows_received``, ``userpilot/files``,
    ``userpilot/superseded``, ``userpilot/deleted`` and the manifest itself. Raises
    DestinationError when an upload or a delete fails.
    """

    def handle_output(self, context: dg.OutputContext, batch: ManifestBatch) -> None:
        storage, recorded = self._storage_for(context, sorted(batch.manifests))
        if batch.replacing is not None and getattr(storage, "generations", None) is not None:
            storage.generations.update(batch.replacing.generations)  # written by this step's replacing manifests
        layout = layout_for(self.job)
        allow_deletes = bool(getattr(self.job.destination, "allow_deletes", False))
        done: dict[str, tuple[str, list[str]]] = {}  # day -> (manifest key, paths deleted)

        def keep_for_next_run(current: str, key: str | None, deleted_now: list[str]) -> None:
            # Dagster records nothing of this output when it fails: keep, per day, what is already
            # in the bucket (published manifests, deletes done, generations) as ledger observations
            ledger = self._ledger(context)
            for pk, (manifest_key, deleted) in [*done.items(), (current, (key, deleted_now))]:
                manifest = batch.manifests[pk]
                files = [{**f, "uri": storage.uri(layout.key(f["path"]))} for f in manifest["files"]] if manifest_key else []
                ledger.record_partial_write(
                    context.asset_key, pk, files,
                    self._generations(storage, recorded.get(pk, {}), [manifest_key] if manifest_key else []),
                    reason="published by a run whose manifest step failed later" if pk != current
                    else "the manifest step of this day failed",
                    superseded=manifest["superseded"] if manifest_key else None, deleted=deleted)

        for pk in sorted(batch.manifests):
            manifest = batch.manifests[pk]
            key = None
            deleted_now: list[str] = []
            try:
                pause_point("before_manifest")
                key = write_manifest(manifest, self.job, storage)
                deleted = delete_superseded(storage, layout, manifest["deleted"], allow_deletes=allow_deletes,
                                            deleted=deleted_now)
            except Exception as exc:
                keep_for_next_run(pk, key, deleted_now)
                what = "manifest" if key is None else "the manifest was written, deleting superseded files failed"
                if isinstance(exc, UserpilotSyncError):
                    raise self._fail(context, pk, f"{what}: {exc}") from None
                raise self._fail(context, pk, f"{what}: {type(exc).__name__}: {exc}") from exc
            done[pk] = (key, deleted)
            batch.published[pk] = storage.uri(key)
            files = manifest["files"]
            metadata = record_metadata(
                self.job, STATUS_EXPORTED,
                **{FILES_KEY: [{**f, "uri": storage.uri(layout.key(f["path"]))} for f in files],
                   SUPERSEDED_KEY: manifest["superseded"], DELETED_KEY: deleted},
            )
            metadata.update({
                "dagster/uri": storage.uri(key),
                "dagster/row_count": sum(rows_by_event_type(manifest).values()),
                "manifest_status": manifest["status"],
                "files": len(files),
                "bytes": sum(f["bytes"] for f in files),
                "rows_received": manifest["source"].get("source_rows", 0),
                "manifest": dg.MetadataValue.json(manifest),
            })
            gens = self._generations(storage, recorded.get(pk, {}), [key])
            if gens is not None:
                metadata[GENERATIONS_KEY] = dg.MetadataValue.json(gens)
            self._record_day(context, pk, metadata)
        self._record_not_exported(context, batch.not_exported, recorded)


class LookupsIOManager(_DestinationIOManager):
    """Writes the lookup tables to ``<sync folder>/lookups/<kind>.parquet`` (not partitioned).

    Records ``dagster/row_count`` (all tables), ``dagster/uri`` (the lookups folder), ``bytes``
    and every file (kind, path, rows, bytes, sha256). Raises DestinationError.
    """

    def handle_output(self, context: dg.OutputContext, lookups: LookupTables) -> None:
        from userpilot_sync.destination.lookups import write_lookups

        work = Path(self.work_dir) / self.job.name
        work.mkdir(parents=True, exist_ok=True)
        try:
            storage = self._storage(context)
            written = write_lookups(self.job, storage, lookups.tables, work_dir=work)
        except UserpilotSyncError as exc:
            raise self._fail(context, None, f"lookups: {exc}") from None
        layout = layout_for(self.job)
        metadata = record_metadata(self.job, STATUS_EXPORTED,
                                   **{FILES_KEY: [{**f.__dict__, "uri": storage.uri(layout.key(f.path))} for f in written]})
        metadata.update({
            "dagster/row_count": sum(f.rows for f in written),
            "dagster/uri": storage.uri(layout.key("lookups")),
            "bytes": sum(f.bytes for f in written),
            "files": len(written),
        })
        context.add_output_metadata(metadata)
