"""File writers for each export format, deterministic and streaming.

Formats (the sync job's ``formats``):

* ``parquet`` — zstd (default), snappy, gzip or none; row groups of ``ROW_GROUP_ROWS`` rows;
  ``inserted_at`` as ``timestamp[us, UTC]``; ``metadata`` as JSON text.
* ``ndjson`` — one JSON object per line, gzip or none; ``inserted_at`` as ISO-8601 text with
  six fractional digits and ``Z`` (every timestamp column of the documented files likewise);
  ``metadata`` (``properties`` in the snapshots) as a JSON object (or null).
* ``csv`` — header line, gzip or none; ``inserted_at`` as in ndjson; ``metadata`` as JSON
  text; null and ``""`` are one value, both written as an empty unquoted field.
* ``avro`` — deflate, snappy or none (fastavro); nullable columns as ``["null", T]``;
  ``inserted_at`` as ``timestamp-micros``; ``metadata`` as JSON text.

Determinism: rows are re-batched into fixed-size groups (independent of upstream batch
boundaries), gzip streams carry mtime 0 and no file name, Avro files use a fixed sync marker,
and nothing writes wall-clock time into a file body. Same input + same locked dependencies ->
byte-identical files.

Files are rotated into parts when ``max_rows`` rows or (approximately, after the row group
that crosses it) ``max_bytes`` bytes are reached.

An export with no rows has **no file** (no part): 0-row files break readers of a table folder or
a date range (an empty NDJSON file fails polars ``read_ndjson`` and pyarrow's JSON reader, a 0-row
deflate Avro file fails polars ``read_avro``), so an empty export is accounted for by the manifest
alone (``status: empty``, ``rows: 0``, no entry in ``files``); see docs/reading.md.

Timestamps must carry a time zone (the pipeline's are UTC): a naive timestamp column is refused
by every writer, since Avro would shift it by the host's UTC offset and the other formats would
label it UTC without knowing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import fastavro
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from userpilot_sync.config.model import FormatSpec
from userpilot_sync.errors import DestinationError

ROW_GROUP_ROWS = 65_536
AVRO_SYNC_MARKER = b"userpilot_sync\x00\x01"  # 16 bytes, fixed for byte-identical files
TIMESTAMP_TEXT = "%Y-%m-%dT%H:%M:%S%.6fZ"
CONTENT_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "avro": "application/avro",
    "json": "application/json",
}


@dataclass(frozen=True)
class LocalPart:
    """One written part file: local path, rows, size in bytes and sha256 (hex)."""

    path: Path
    rows: int
    bytes: int
    sha256: str


def _text_frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    stamps = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime)]
    if stamps:
        frame = frame.with_columns(pl.col(c).dt.strftime(TIMESTAMP_TEXT) for c in stamps)
    return frame


#: Columns holding JSON object text: NDJSON writes them as objects, the other formats as text.
JSON_TEXT_COLUMNS = ("metadata", "properties")


def ndjson_lines(table: pa.Table) -> bytes:
    """NDJSON text of a table (``metadata``/``properties`` spliced in as a JSON object), UTF-8,
    one line per row."""
    frame = _text_frame(table)
    cols = frame.columns
    json_col = next((c for c in JSON_TEXT_COLUMNS if c in cols), None)
    if json_col is None:
        encoded = frame.select(pl.struct(pl.all()).struct.json_encode().alias("line"))
    else:
        i = cols.index(json_col)
        before, after = cols[:i], cols[i + 1 :]
        parts: list[pl.Expr] = []
        if before:
            parts.append(pl.struct(before).struct.json_encode().str.head(-1))
            parts.append(pl.lit(f',"{json_col}":'))
        else:
            parts.append(pl.lit(f'{{"{json_col}":'))
        parts.append(pl.col(json_col).fill_null("null"))
        if after:
            parts.append(pl.lit(","))
            parts.append(pl.struct(after).struct.json_encode().str.tail(-1))
        else:
            parts.append(pl.lit("}"))
        encoded = frame.select(pl.concat_str(parts).alias("line"))
    lines = encoded.get_column("line").to_list()
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _avro_schema(schema: pa.Schema, name: str) -> dict:
    fields = []
    for f in schema:
        if pa.types.is_timestamp(f.type):
            t: object = {"type": "long", "logicalType": "timestamp-micros"}
        elif pa.types.is_integer(f.type):
            t = "int" if f.type.bit_width <= 32 else "long"
        else:
            t = "string"
        fields.append({"name": f.name, "type": ["null", t] if f.nullable else t})
    return {"type": "record", "name": name, "namespace": "io.userpilot_sync", "fields": fields}


def _naive_timestamps(schema: pa.Schema | pa.StructType, parent: str = "") -> list[str]:
    """Names of the timestamp columns (nested fields too) that have no time zone."""
    naive = []
    for f in schema:
        name = f"{parent}{f.name}"
        if pa.types.is_timestamp(f.type) and f.type.tz is None:
            naive.append(name)
        elif pa.types.is_struct(f.type):
            naive.extend(_naive_timestamps(f.type, f"{name}."))
    return naive


def check_timestamps(schema: pa.Schema, name: str) -> None:
    """Refuse timestamp columns without a time zone before anything is written.

    Raises DestinationError naming ``name`` (the export) and the columns: an Avro
    ``timestamp-micros`` of a naive value would be shifted by the host's UTC offset, and the
    other formats would label local times as UTC.
    """
    naive = _naive_timestamps(schema)
    if naive:
        raise DestinationError(
            f"export {name}: timestamp column(s) {naive} have no time zone; the writers only accept "
            "time-zone-aware timestamps (the pipeline's are UTC). Convert them first, e.g. "
            "pl.col(c).dt.replace_time_zone('UTC') when the values are UTC. Nothing was written."
        )


class _PartWriter:
    """Writes one part file of one format; ``size`` is the bytes written so far."""

    def __init__(self, path: Path, spec: FormatSpec, schema: pa.Schema, name: str):
        check_timestamps(schema, name)
        if spec.format == "delta":  # staged as Parquet; destination/delta.py commits these rows to the table
            spec = FormatSpec(format="parquet", compression=spec.compression)
        self.path = path
        self.spec = spec
        self.schema = schema
        self.rows = 0
        self._raw: BinaryIO = open(path, "wb")
        self._stream: BinaryIO = self._raw
        self._parquet: pq.ParquetWriter | None = None
        self._avro = None
        self._header_written = False
        if spec.format == "parquet":
            compression = None if spec.compression == "none" else spec.compression
            self._parquet = pq.ParquetWriter(
                self._raw, schema, compression=compression or "none", use_dictionary=True,
                write_statistics=True, store_schema=True,
            )
        elif spec.format in ("ndjson", "csv") and spec.compression == "gzip":
            self._stream = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)  # type: ignore[assignment]
        elif spec.format == "avro":
            codec = {"none": "null"}.get(spec.compression or "none", spec.compression)
            self._avro = fastavro.write.Writer(
                self._raw, fastavro.parse_schema(_avro_schema(schema, name)), codec=codec,
                sync_marker=AVRO_SYNC_MARKER,
            )

    @property
    def size(self) -> int:
        return self._raw.tell()

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        fmt = self.spec.format
        if fmt == "parquet":
            assert self._parquet is not None
            self._parquet.write_table(table, row_group_size=ROW_GROUP_ROWS)
        elif fmt == "ndjson":
            self._stream.write(ndjson_lines(table))
        elif fmt == "csv":
            buf = io.BytesIO()
            frame = _text_frame(table)
            # null and "" are one value in CSV: both are written as an empty, unquoted field (polars
            # would quote "" as `""`, which some warehouses load as "" and others as null).
            frame = frame.with_columns(
                pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c)
                for c, t in frame.schema.items() if t == pl.String
            )
            frame.write_csv(buf, include_header=not self._header_written, null_value="")
            self._header_written = True
            self._stream.write(buf.getvalue())
        else:
            assert self._avro is not None
            for record in table.to_pylist():
                self._avro.write(record)
            self._avro.flush()

    def close(self) -> LocalPart:
        fmt = self.spec.format
        if fmt == "parquet":
            assert self._parquet is not None
            self._parquet.close()
        elif fmt == "avro":
            assert self._avro is not None
            self._avro.flush()
        elif fmt == "csv" and not self._header_written:
            self._stream.write((",".join(self.schema.names) + "\n").encode())
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()
        with open(self.path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        return LocalPart(self.path, self.rows, self.path.stat().st_size, digest)


class PartsWriter:
    """Streams rows into one format's part files under ``work_dir`` (see :func:`write_parts`).

    ``write(table)`` accepts tables of any size and chunking; rows are re-batched into groups of
    ``ROW_GROUP_ROWS`` (or ``max_rows``) exactly as one call of :func:`write_parts` over the same
    rows would, so the bytes do not depend on how the rows were handed in. ``close()`` returns the
    parts (none for an export with no rows: an empty export has no file). Not thread-safe:
    one writer per thread. Raises DestinationError, before writing anything, when a timestamp
    column has no time zone.
    """

    def __init__(self, schema: pa.Schema, spec: FormatSpec, work_dir: Path, name: str,
                 max_rows: int | None = None, max_bytes: int | None = None):
        check_timestamps(schema, name)
        self.schema = schema
        self.spec = spec
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.group = min(ROW_GROUP_ROWS, max_rows) if max_rows else ROW_GROUP_ROWS
        self.parts: list[LocalPart] = []
        self._writer: _PartWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def _new_writer(self) -> _PartWriter:
        path = self.work_dir / f"{self.name}.{len(self.parts):05d}.{self.spec.extension}"
        return _PartWriter(path, self.spec, self.schema, self.name)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Append rows (columns exactly ``schema``'s names and types)."""
        batches = table.to_batches() if isinstance(table, pa.Table) else [table]
        for batch in batches:
            if batch.num_rows == 0:
                continue
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        while self._pending_rows >= self.group:
            pending = pa.Table.from_batches(self._pending, schema=self.schema)
            self._emit(pending.slice(0, self.group).combine_chunks())
            rest = pending.slice(self.group)
            self._pending = rest.to_batches()
            self._pending_rows = rest.num_rows

    def _emit(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._writer = self._new_writer()
            writer = self._writer
            take = table.num_rows
            if self.max_rows:
                take = min(take, self.max_rows - writer.rows)
            writer.write(table.slice(0, take))
            table = table.slice(take)
            if (self.max_rows and writer.rows >= self.max_rows) or (self.max_bytes and writer.size >= self.max_bytes):
                self.parts.append(writer.close())
                self._writer = None

    def close(self) -> list[LocalPart]:
        """Write what is pending and close the last part. Returns every part, in order."""
        if self._pending_rows:
            self._emit(pa.Table.from_batches(self._pending, schema=self.schema).combine_chunks())
            self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self.parts.append(self._writer.close())
            self._writer = None
        return self.parts  # [] when no row was written: an empty export has no file

    def abort(self) -> None:
        """Close without finishing (after an error); the caller removes ``work_dir``."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None


def write_parts(
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    spec: FormatSpec,
    work_dir: Path,
    name: str,
    max_rows: int | None = None,
    max_bytes: int | None = None,
) -> list[LocalPart]:
    """Write the rows of ``batches`` in one format as one or more part files under ``work_dir``.

    Returns ``[]`` when ``batches`` hold no rows (an empty export has no file).
    Part files are named ``<name>.<n>.<extension>`` locally; the layout names them on upload.
    Raises DestinationError, before writing anything, when a timestamp column has no time zone.
    """
    writer = PartsWriter(schema, spec, work_dir, name, max_rows=max_rows, max_bytes=max_bytes)
    try:
        for batch in batches:
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
