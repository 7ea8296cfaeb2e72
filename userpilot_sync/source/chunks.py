"""Read export chunk files (parquet, ndjson, csv, avro; optionally gzip) as Arrow batches.

Used by the local-files source and the Bulk Data Export API source. Files are streamed in
batches of ``batch_rows`` rows; no chunk is read whole into memory. Unreadable files raise
:class:`~userpilot_sync.errors.SourceError` naming the file.

Text that is not valid UTF-8 is not an error *here*: every reader hands the bytes on as they are
(Parquet and CSV string columns unchecked, NDJSON and Avro values as ``binary``), and
:func:`~userpilot_sync.source.normalize.normalize_arrow` refuses them with an error that names
the sync job, the partition, the chunk and the column. CSV values may contain quoted newlines,
in chunks of any size.
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
    # Bytes that are not UTF-8 become lone surrogates ("surrogateescape") and reach normalisation
    # as binary values (see _raw_bytes), where they are refused naming job, day, chunk and column.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
    return open(path, encoding="utf-8", errors="surrogateescape")


def _is_utf8(text: str) -> bool:
    """False when ``text`` holds lone surrogates (bytes that were not UTF-8, or ``\\udc80`` escapes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raw_bytes(text: str) -> bytes:
    """The original bytes of text decoded with ``surrogateescape`` (lone surrogates kept, invalid UTF-8)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte produced (a JSON "\\ud800" escape)
        return text.encode("utf-8", "surrogatepass")


def _json_value(value: dict | list) -> str | bytes:
    """JSON text of an object/array (sorted keys); its raw bytes when it holds text that is not UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if "\\ud" in text:  # escaped surrogates: a pair (e.g. an emoji) or a lone one (not UTF-8)
        raw = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if not _is_utf8(raw):
            return _raw_bytes(raw)
    return text


def _records_to_batch(records: list[dict], where: str = "chunk") -> pa.RecordBatch:
    """Records (dicts) as one batch whose columns are the union of every record's keys.

    Keys missing from a record are null (not dropped because the first record lacks them);
    objects become JSON text (sorted keys); a column whose values have mixed Python types (1920
    and "1920") is kept as text, which normalisation then converts. A column holding text that
    is not UTF-8 (lone surrogates, see :func:`_open_text`) or bytes is ``binary``: normalisation
    checks and converts it. Raises SourceError (naming ``where``) for a key that is not UTF-8.
    """
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        for key in rec:
            if key not in columns:
                columns[key] = [None] * i
        for key, values in columns.items():
            value = rec.get(key)
            if isinstance(value, (dict, list)):
                value = _json_value(value)
            values.append(value)
    arrays, names = [], []
    for key, values in columns.items():
        if not _is_utf8(key):
            raise SourceError(
                f"{where}: the column name {_raw_bytes(key)!r} is not valid UTF-8 text; the chunk is corrupt "
                "or was not written as UTF-8"
            )
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
            if any(isinstance(v, bytes) or (isinstance(v, str) and not _is_utf8(v)) for v in values):
                array = pa.array(
                    [v if v is None or isinstance(v, bytes) else _raw_bytes(str(v)) for v in values],
                    type=pa.binary(),
                )
            else:
                array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays.append(array)
        names.append(key)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _iter_ndjson(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    records: list[dict] = []
    where = f"chunk {path.name}"
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
                yield _records_to_batch(records, where)
                records = []
    if records:
        yield _records_to_batch(records, where)


def _iter_csv(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    # Every known column is read as text; normalisation converts types leniently and checks that
    # the text is UTF-8 (check_utf8=False here: its error would name neither the column nor the day).
    convert = pacsv.ConvertOptions(
        column_types={c.name: pa.string() for c in EVENT_COLUMNS},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        check_utf8=False,
    )
    read = pacsv.ReadOptions(block_size=1 << 22)
    # Quoted values may hold newlines (the product's own CSV writes them): without this, a value
    # spanning a block boundary (4 MiB) fails to parse.
    parse = pacsv.ParseOptions(newlines_in_values=True)
    stream = pa.input_stream(str(path), compression="detect")
    reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
    for batch in reader:
        if batch.num_rows:
            yield batch


def _iter_avro(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    where = f"chunk {path.name}"
    with open(path, "rb") as fh:
        records: list[dict] = []
        # strings that are not UTF-8 reach normalisation as binary values (see _open_text)
        for rec in fastavro.reader(fh, handle_unicode_errors="surrogateescape"):
            records.append(dict(rec))
            if len(records) >= batch_rows:
                yield _records_to_batch(records, where)
                records = []
        if records:
            yield _records_to_batch(records, where)


def iter_chunk_batches(path: Path, fmt: str | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream one chunk file as record batches of at most ``batch_rows`` rows (csv: by block).

    Raises SourceError when the file is missing, of an unknown format or unreadable. Text that is
    not valid UTF-8 is passed on unchecked (string or binary columns) for
    :func:`~userpilot_sync.source.normalize.normalize_arrow` to refuse with the full context.
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
