"""Read export chunk files (parquet, ndjson, csv, avro; optionally gzip) as Arrow batches.

Used by the local-files source and the Bulk Data Export API source. Files are streamed in
batches of ``batch_rows`` rows; no chunk is read whole into memory. Unreadable files raise
:class:`~userpilot_sync.errors.SourceError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import fastavro
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from userpilot_sync.errors import SourceError
from userpilot_sync.schema.events import EVENT_COLUMNS

CHUNK_FORMATS = ("parquet", "ndjson", "csv", "avro")
_SUFFIXES = {
    ".parquet": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
    ".csv": "csv",
    ".avro": "avro",
}
DEFAULT_BATCH_ROWS = 65_536


def chunk_format(path: Path) -> str | None:
    """The chunk format of a file name (``.gz`` allowed for ndjson/csv), or None."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1].lower()) if suffixes else None


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _records_to_batch(records: list[dict]) -> pa.RecordBatch:
    """Records (dicts) as one batch whose columns are the union of every record's keys.

    Keys missing from a record are null (not dropped because the first record lacks them);
    objects become JSON text (sorted keys); a column whose values have mixed Python types (1920
    and "1920") is kept as text, which normalisation then converts.
    """
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        for key in rec:
            if key not in columns:
                columns[key] = [None] * i
        for key, values in columns.items():
            value = rec.get(key)
            if isinstance(value, (dict, list)):
                value = json.dumps(value, sort_keys=True, separators=(",", ":"))
            values.append(value)
    arrays, names = [], []
    for key, values in columns.items():
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays.append(array)
        names.append(key)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _iter_ndjson(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    records: list[dict] = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"chunk {path.name}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise SourceError(f"chunk {path.name}: line {lineno} is not a JSON object")
            records.append(rec)
            if len(records) >= batch_rows:
                yield _records_to_batch(records)
                records = []
    if records:
        yield _records_to_batch(records)


def _iter_csv(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    # Every known column is read as text; normalisation converts types leniently.
    convert = pacsv.ConvertOptions(
        column_types={c.name: pa.string() for c in EVENT_COLUMNS},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    read = pacsv.ReadOptions(block_size=1 << 22)
    stream = pa.input_stream(str(path), compression="detect")
    reader = pacsv.open_csv(stream, read_options=read, convert_options=convert)
    for batch in reader:
        if batch.num_rows:
            yield batch


def _iter_avro(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    with open(path, "rb") as fh:
        records: list[dict] = []
        for rec in fastavro.reader(fh):
            records.append(dict(rec))
            if len(records) >= batch_rows:
                yield _records_to_batch(records)
                records = []
        if records:
            yield _records_to_batch(records)


def iter_chunk_batches(path: Path, fmt: str | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream one chunk file as record batches of at most ``batch_rows`` rows (csv: by block).

    Raises SourceError when the file is missing, of an unknown format or unreadable.
    """
    path = Path(path)
    fmt = fmt or chunk_format(path)
    if fmt not in CHUNK_FORMATS:
        raise SourceError(f"chunk {path.name}: unknown format (expected one of {', '.join(CHUNK_FORMATS)})")
    if not path.is_file():
        raise SourceError(f"chunk {path}: file is missing")
    try:
        if fmt == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        elif fmt == "ndjson":
            yield from _iter_ndjson(path, batch_rows)
        elif fmt == "csv":
            yield from _iter_csv(path, batch_rows)
        else:
            yield from _iter_avro(path, batch_rows)
    except SourceError:
        raise
    except (OSError, ValueError, pa.ArrowException, EOFError, StopIteration) as exc:
        raise SourceError(f"chunk {path.name}: unreadable {fmt} file ({type(exc).__name__}: {exc})") from None
