"""Delta Lake output (opt-in ``formats: [{format: delta}]``): one Delta table per event type.

Where: ``<prefix>/<sync folder>/_delta/<event_type>/`` (:func:`table_path`), next to the files of
the other formats and never inside them (the hive layout's table folders are ``<ext>/<event_type>``).
The table's columns are the export's (``schema.events.export_arrow_schema``) plus ``date``, the
partition column: the UTC day as a Delta ``date`` (Arrow ``date32``), not text, so readers can
filter ranges (``date >= '2026-03-01'``) and Delta prunes partitions on it.

How a day is written: once every event type of the day validated (the export step's order: the
IO manager writes a day only after ``pipeline.prepare_days``), the rows of one event type of the
day — read back from the local Parquet parts ``export.prepare_export`` encoded for the ``delta``
format (``formats.PartsWriter`` stages a ``delta`` spec as Parquet), streamed batch by batch, so
memory stays bounded — replace the day in the table with one atomic commit: ``write_deltalake(...,
mode="overwrite", predicate="date = '<day>'")``. A re-export therefore never duplicates rows; a day
whose export now has no rows becomes empty in the table (the commit removes its files). The
commit carries ``userpilot_sync.*`` values in its metadata (sync job, partition, run id, rows), so
``DeltaTable.history()`` names every export and replace. The manifest, written after every
commit of the day, gives each table's version (``event_types.<type>.delta_version`` and the
``delta`` section, :meth:`DeltaCommit.to_dict`).

What is not deterministic: Delta names its data files (uuids) and writes commit times, so Delta
files are exempt from the byte identity of the other formats; row identity holds (the table's
rows of a day equal the day's Parquet export, ``date`` aside).

Credentials: the sync job's destination credentials, handed to delta-rs as ``storage_options``
(:func:`storage_options`): S3 the same access key, secret, session token (also of an assumed
``role_arn``), region and ``endpoint_url`` as the write-only storage (``AWS_ALLOW_HTTP`` for a
loopback endpoint), SSE settings; GCS the service-account file of ``credentials_file_env`` (else
Google's default chain); a local folder is a path. Delta reads its own log and lists ``_delta/``,
so a sync job may only write Delta when its destination says ``read_access: true``
(``config/model.py``; docs/destinations.md, "Delta Lake", gives the permission set).

Never deleted by the exporter: files of ``_delta/`` are not in the ledger's file lists, never
``superseded`` and never deleted (:func:`is_delta_path`); expired log files are kept too
(``cleanup_expired_logs=False``: deleting would need another permission). ``VACUUM`` is the
table owner's call. Checkpoints are written every 100 commits (Delta's default), which overwrites
``_delta_log/_last_checkpoint``; on GCS with ``overwrite: refuse`` (no delete permission, so no
overwrite) checkpoints are not written.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import FileRecord
from userpilot_sync.errors import DestinationError

if TYPE_CHECKING:
    from userpilot_sync.config.model import FormatSpec, SyncJob
    from userpilot_sync.export import PreparedExport

#: The format name in ``formats`` and in the ledger's records.
DELTA_FORMAT = "delta"
#: Folder of the Delta tables, relative to the sync folder.
DELTA_FOLDER = "_delta"
#: The partition column every table has (the UTC day, Delta type ``date``).
PARTITION_COLUMN = "date"
#: Delta's Parquet codec for each ``compression`` of the ``delta`` format.
_CODECS = {"zstd": "ZSTD", "snappy": "SNAPPY", "gzip": "GZIP", "none": "UNCOMPRESSED"}
BATCH_ROWS = 65_536


def table_path(event_type: str) -> str:
    """The table of ``event_type``, relative to the sync folder: ``_delta/<event_type>``."""
    return f"{DELTA_FOLDER}/{event_type}"


def is_delta_path(path: str) -> bool:
    """Whether ``path`` (relative to the sync folder) lies in the Delta tables' folder, which the
    exporter's cleanup (superseded files, deletes) never touches."""
    return path == DELTA_FOLDER or path.startswith(DELTA_FOLDER + "/")


def table_schema(export_schema: pa.Schema) -> pa.Schema:
    """A table's Arrow schema: the export's columns, then ``date`` (date32, not null)."""
    return export_schema.append(pa.field(PARTITION_COLUMN, pa.date32(), nullable=False))


def table_uri(job: "SyncJob", event_type: str) -> str:
    """Where delta-rs finds the table of ``event_type``: ``s3://bucket/<key>``,
    ``gs://bucket/<key>`` or the local folder's absolute path."""
    dest = job.destination
    key = layout_for(job).key(table_path(event_type))
    if dest.kind == "s3":
        return f"s3://{dest.bucket}/{key}"
    if dest.kind == "gcs":
        return f"gs://{dest.bucket}/{key}"
    return str(Path(dest.path).absolute() / key)


# ---------------------------------------------------------------------------------- credentials
def storage_options(job: "SyncJob", *, credentials_from: Any = None,
                    environ: dict[str, str] | None = None) -> dict[str, str]:
    """delta-rs ``storage_options`` for the sync job's destination, from the same credentials as
    its write-only storage (secrets included: never log the result).

    S3: the identity of :func:`~userpilot_sync.destination.s3.build_s3_client` (``credentials_from``:
    a dagster-aws ``S3Resource`` or anything with its attribute names; else the AWS chain; with
    ``role_arn`` the assumed role's temporary credentials), ``region`` (default ``us-east-1``),
    ``endpoint_url`` (``AWS_ALLOW_HTTP`` when it is plain http, which the config allows on loopback
    only), ``sse``/``kms_key_id``. GCS: ``google_service_account`` = the file named by
    ``credentials_file_env``, else nothing (delta-rs uses Google's default chain). Local: none.
    Raises DestinationError (a role that cannot be assumed, a missing variable).
    """
    environ = os.environ if environ is None else environ
    dest = job.destination
    if dest.kind == "s3":
        return _s3_options(dest, credentials_from, environ)
    if dest.kind == "gcs":
        options: dict[str, str] = {}
        if dest.credentials_file_env:
            path = environ.get(dest.credentials_file_env)
            if not path:
                raise DestinationError(
                    f"GCS destination gs://{dest.bucket}: environment variable {dest.credentials_file_env} "
                    "(the service-account file for credentials_file_env) is not set")
            options["google_service_account"] = path
        return options
    return {}


def _s3_options(dest: Any, src: Any, environ: dict[str, str]) -> dict[str, str]:
    from userpilot_sync.destination.s3 import boto3_session

    session, region = boto3_session(dest, src, environ)
    options = {"AWS_REGION": region or session.region_name or "us-east-1"}
    credentials = session.get_credentials()
    if credentials is not None:  # else delta-rs looks for credentials itself (environment, instance role)
        frozen = credentials.get_frozen_credentials()
        options.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = frozen.token
    if dest.endpoint_url:
        options["AWS_ENDPOINT_URL"] = dest.endpoint_url
        if dest.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if dest.sse != "none":
        options["aws_server_side_encryption"] = dest.sse
        if dest.kms_key_id:
            options["aws_sse_kms_key_id"] = dest.kms_key_id
    return options


def permission_set(job: "SyncJob") -> str:
    """The permissions Delta needs on ``_delta/`` of the sync job's destination, in words."""
    from userpilot_sync.config.model import delta_permission_set

    return delta_permission_set(job)


# ---------------------------------------------------------------------------------- commits
@dataclass(frozen=True)
class DeltaCommit(FileRecord):
    """One day of one event type committed to its Delta table (or, ``version`` None, a dry run).

    Travels with the export's file records (``format`` ``delta``, ``path`` the table folder,
    ``rows`` the day's rows, ``bytes`` its data files' size, no sha256) up to the manifest, which
    lists it under ``delta`` instead of ``files`` (``manifest.build_manifest``).
    """

    version: int | None = None
    uri: str = ""
    partition: str = ""
    files_added: int = 0
    files_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The table's entry in the manifest's ``delta`` section."""
        return {"table": self.path, "uri": self.uri, "version": self.version,
                "partition_column": PARTITION_COLUMN, "partition": self.partition,
                "predicate": predicate(self.partition), "mode": "overwrite", "compression": self.compression,
                "rows": self.rows, "bytes": self.bytes, "files_added": self.files_added,
                "files_removed": self.files_removed}


def predicate(partition: str) -> str:
    """The replace predicate of one day (``partition`` is a checked ``YYYY-MM-DD``)."""
    return f"{PARTITION_COLUMN} = '{date.fromisoformat(partition).isoformat()}'"


def _batches(prepared: "PreparedExport", parts: list, schema: pa.Schema, day: date) -> Iterator[pa.RecordBatch]:
    """The export's rows from its local Parquet parts, in order, with the ``date`` column."""
    export_schema = schema.remove(schema.get_field_index(PARTITION_COLUMN))
    for part in parts:
        with pq.ParquetFile(part.path) as parquet:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                columns = [batch.column(name).cast(field.type) for name, field in zip(export_schema.names, export_schema)]
                days = pa.array([day] * batch.num_rows, pa.date32())
                yield pa.RecordBatch.from_arrays([*columns, days], schema=schema)


def _cloud_storages() -> tuple[type, ...]:
    """The S3 and GCS storage classes whose modules are loaded (an instance of one implies its module)."""
    found = []
    for module, name in (("userpilot_sync.destination.s3", "S3Storage"), ("userpilot_sync.destination.gcs", "GcsStorage")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


class DeltaWriter:
    """Commits prepared exports to the sync job's Delta tables (one per event type).

    ``credentials_from``: see :func:`storage_options`; ``run_id`` goes into each commit's metadata.
    """

    #: Seconds the storage options (temporary credentials of an assumed role included) are reused.
    OPTIONS_TTL_S = 600

    def __init__(self, job: "SyncJob", *, credentials_from: Any = None, run_id: str | None = None):
        self.job = job
        self.credentials_from = credentials_from
        self.run_id = run_id
        self._options: dict[str, str] | None = None
        self._options_at = 0.0

    def storage_options(self) -> dict[str, str]:
        """:func:`storage_options` of the sync job, built again after :attr:`OPTIONS_TTL_S` seconds
        (an assumed role's credentials last an hour; a long range run outlives them)."""
        now = time.monotonic()
        if self._options is None or now - self._options_at > self.OPTIONS_TTL_S:
            self._options = storage_options(self.job, credentials_from=self.credentials_from)
            self._options_at = now
        return self._options

    def commit(self, prepared: "PreparedExport", spec: "FormatSpec", storage: Any) -> DeltaCommit:
        """Replace ``prepared``'s day in its event type's table; returns the commit's record.

        ``storage`` is the export's storage: a destination storage (local, S3, GCS) means commit;
        anything else (a preview's recording storage, a test double) means a dry run, and the table
        is not touched (``version`` None). The local parts are removed after the commit. Raises
        DestinationError naming the sync job, partition, event type and table (with the
        permissions Delta needs when access was denied).
        """
        from userpilot_sync.destination.storage import LocalStorage

        job = self.job
        et, day = prepared.event_type, prepared.partition
        rel = table_path(et)
        uri = table_uri(job, et)
        parts = prepared.local_parts(DELTA_FORMAT)
        rows = sum(p.rows for p in parts)
        record = dict(path=rel, event_type=et, format=DELTA_FORMAT, compression=spec.compression or "zstd", part=0,
                      rows=rows, sha256="", uri=storage.uri(layout_for(job).key(rel)), partition=day)
        if not isinstance(storage, (LocalStorage, *_cloud_storages())):
            return DeltaCommit(bytes=sum(p.bytes for p in parts), version=None, **record)
        try:
            result = self._write(prepared, spec, parts, uri)
        except DestinationError:
            raise
        except Exception as exc:  # delta-rs: DeltaError, OSError, ... (messages carry no secrets)
            raise self._error(prepared, uri, exc) from None
        for part in parts:
            part.path.unlink(missing_ok=True)
        return DeltaCommit(**record, **result)

    def _write(self, prepared: "PreparedExport", spec: "FormatSpec", parts: list, uri: str) -> dict[str, Any]:
        from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties, WriterProperties, write_deltalake
        from deltalake.exceptions import TableNotFoundError

        job = self.job
        dest = job.destination
        options = self.storage_options()
        if dest.kind == "local":
            Path(uri).mkdir(parents=True, exist_ok=True)
        schema = table_schema(prepared.arrow_schema)
        day = date.fromisoformat(prepared.partition)
        token = uuid.uuid4().hex
        try:
            table: Any = DeltaTable(uri, storage_options=options)
        except TableNotFoundError:
            table = uri  # the first commit creates the table
        reader = pa.RecordBatchReader.from_batches(schema, _batches(prepared, parts, schema, day))
        checkpoints = not (dest.kind == "gcs" and dest.overwrite == "refuse")
        write_deltalake(
            table, reader, partition_by=[PARTITION_COLUMN], mode="overwrite", predicate=predicate(prepared.partition),
            schema_mode="merge",  # a changed exclude_columns adds columns; removed ones stay, null in new days
            storage_options=options if isinstance(table, str) else None,
            name=f"{job.name}_{prepared.event_type}",
            description=f"Userpilot {prepared.event_type} events of sync job {job.name} (userpilot_sync), one "
                        f"partition per UTC day",
            writer_properties=WriterProperties(compression=_CODECS[spec.compression or "zstd"]),
            commit_properties=CommitProperties(custom_metadata={
                "userpilot_sync.sync_job": job.name, "userpilot_sync.partition": prepared.partition,
                "userpilot_sync.run_id": self.run_id or "", "userpilot_sync.rows": str(prepared.rows),
                "userpilot_sync.commit": token}),
            post_commithook_properties=PostCommitHookProperties(create_checkpoint=checkpoints,
                                                                cleanup_expired_logs=False),
        )
        if isinstance(table, str):
            table = DeltaTable(uri, storage_options=options)
        else:
            table.update_incremental()
        version = table.version()
        metrics: dict[str, Any] = {}
        for entry in table.history(limit=20):  # our commit, whatever another writer committed after it
            if entry.get("userpilot_sync.commit") == token:
                version = entry["version"]
                metrics = entry.get("operationMetrics") or {}
                break
        size = 0
        actions = pa.table(table.get_add_actions(flatten=True))  # the day's data files now
        if actions.num_rows:
            mine = actions.filter(pc.equal(actions[f"partition.{PARTITION_COLUMN}"], pa.scalar(day, pa.date32())))
            size = int(pc.sum(mine["size_bytes"]).as_py() or 0)
        return {"version": int(version), "bytes": size, "files_added": int(metrics.get("num_added_files", 0)),
                "files_removed": int(metrics.get("num_removed_files", 0))}

    def _error(self, prepared: "PreparedExport", uri: str, exc: Exception) -> DestinationError:
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())  # one line, no terminal colours
        if len(text) > 400:
            text = text[:400] + "..."
        denied = any(w in text.lower() for w in ("accessdenied", "forbidden", "403", "permission", "privileges", "401"))
        hint = (f"; Delta needs {permission_set(self.job)} (docs/destinations.md, 'Delta Lake')" if denied else "")
        return DestinationError(
            f"sync job {self.job.name!r}, partition {prepared.partition}, event type {prepared.event_type!r}: the "
            f"Delta commit to {uri} failed ({type(exc).__name__}: {text}){hint}. The day's earlier rows in the table "
            f"are unchanged (a commit is atomic); re-export the day.")
