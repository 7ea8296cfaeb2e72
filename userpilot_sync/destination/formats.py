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
from typing import BinaryIO, Iterable, Iterator

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


def rebatch(batches: Iterable[pa.RecordBatch], size: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may be smaller), whatever the input boundaries."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending, schema=schema)
            yield table.slice(0, size).combine_chunks()
            rest = table.slice(size)
            pending = rest.to_batches()
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(pending, schema=schema).combine_chunks()


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

    Always returns at least one part (an empty export is a file with 0 rows and the schema).
    Part files are named ``<name>.<n>.<extension>`` locally; the layout names them on upload.
    Raises DestinationError, before writing anything, when a timestamp column has no time zone.
    """
    check_timestamps(schema, name)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    group = min(ROW_GROUP_ROWS, max_rows) if max_rows else ROW_GROUP_ROWS
    parts: list[LocalPart] = []
    writer: _PartWriter | None = None

    def new_writer() -> _PartWriter:
        return _PartWriter(work_dir / f"{name}.{len(parts):05d}.{spec.extension}", spec, schema, name)

    for table in rebatch(batches, group, schema):
        while table.num_rows:
            if writer is None:
                writer = new_writer()
            take = table.num_rows
            if max_rows:
                take = min(take, max_rows - writer.rows)
            writer.write(table.slice(0, take))
            table = table.slice(take)
            if (max_rows and writer.rows >= max_rows) or (max_bytes and writer.size >= max_bytes):
                parts.append(writer.close())
                writer = None
    if writer is not None:
        parts.append(writer.close())
    if not parts:
        parts.append(new_writer().close())
    return parts
