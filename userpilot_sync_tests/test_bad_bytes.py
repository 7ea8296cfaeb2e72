"""Bad bytes and files: text that is not UTF-8, CSV values with newlines, naive timestamps.

* Invalid UTF-8 in any chunk format (Parquet string or binary column, CSV, NDJSON, Avro), with and
  without ``internal_event_id``: a SourceError naming the sync job, the day, the chunk and the
  column; nothing exported; never a polars panic.
* CSV chunks of any size whose quoted values hold newlines ingest with exact row counts.
* The writers refuse timestamps without a time zone (Avro would shift them by the host offset).
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
from pathlib import Path

import fastavro
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userpilot_sync.config.model import FormatSpec
from userpilot_sync.destination.formats import write_parts
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.errors import DestinationError, SourceError
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.source.chunks import iter_chunk_batches
from userpilot_sync.source.normalize import normalize_arrow
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job

BAD = b"caf\xe9"  # Latin-1 "café": not UTF-8
ROWS = [
    {"app_token": "NX-demo0001", "event_type": "page_view", "event_name": "", "user_id": "u1",
     "hostname": "app.example", "inserted_at": "2026-03-09T10:00:00Z"},
    {"app_token": "NX-demo0001", "event_type": "track", "event_name": "clicked", "user_id": "u2",
     "hostname": "app.example", "inserted_at": "2026-03-09T11:00:00Z"},
]
IDS = ["0" * 32, "1" * 32]


def _rows(with_id: bool) -> list[dict]:
    return [dict(r, internal_event_id=i) if with_id else dict(r) for r, i in zip(ROWS, IDS)]


# ------------------------------------------------------------------------------ chunk writers
def _parquet_string(folder: Path, rows: list[dict], column: str) -> Path:
    """A Parquet chunk whose string column (UTF8 logical type) holds invalid bytes in row 2."""
    table = pa.Table.from_pylist(rows)
    values = [r[column].encode() for r in rows[:-1]] + [BAD]
    bad = pa.array(values, type=pa.binary()).view(pa.string())  # no validation: as a broken writer would
    table = table.set_column(table.schema.get_field_index(column), column, bad)
    path = folder / "export-part1.parquet"
    pq.write_table(table, path)
    assert pq.read_schema(path).field(column).type == pa.string()
    return path


def _parquet_binary(folder: Path, rows: list[dict], column: str) -> Path:
    """A Parquet chunk whose column is plain binary (no string annotation) with invalid bytes."""
    table = pa.Table.from_pylist(rows)
    values = [r[column].encode() for r in rows[:-1]] + [BAD]
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, type=pa.binary()))
    path = folder / "export-part1.parquet"
    pq.write_table(table, path)
    return path


def _csv(folder: Path, rows: list[dict], column: str) -> Path:
    header = list(rows[0])
    lines = [",".join(header).encode()]
    for i, r in enumerate(rows):
        lines.append(b",".join(BAD if (k == column and i == len(rows) - 1) else str(r[k]).encode() for k in header))
    path = folder / "export-part1.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _ndjson(folder: Path, rows: list[dict], column: str) -> Path:
    lines = [json.dumps(r).encode() for r in rows[:-1]]
    last = json.dumps(dict(rows[-1], **{column: "@@BAD@@"})).encode().replace(b"@@BAD@@", BAD)
    path = folder / "export-part1.ndjson.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines + [last]) + b"\n"))
    return path


def _avro(folder: Path, rows: list[dict], column: str) -> Path:
    """An Avro chunk (codec null) whose string field holds invalid bytes in the last record."""
    schema = {"type": "record", "name": "event", "fields": [{"name": k, "type": "string"} for k in rows[0]]}
    placeholder = "cafX"  # as long as BAD: the blocks stay valid when the bytes are swapped
    records = [dict(r) for r in rows]
    records[-1][column] = placeholder
    buf = io.BytesIO()
    fastavro.writer(buf, schema, records, codec="null")
    data = buf.getvalue()
    assert data.count(placeholder.encode()) == 1
    path = folder / "export-part1.avro"
    path.write_bytes(data.replace(placeholder.encode(), BAD))
    return path


WRITERS = {
    "parquet": _parquet_string,
    "parquet_binary": _parquet_binary,
    "csv": _csv,
    "ndjson": _ndjson,
    "avro": _avro,
}


def _exported_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "exports"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize("with_id", [False, True], ids=["without_id", "with_id"])
@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("column", ["user_id", "hostname"])
def test_invalid_utf8_names_job_day_chunk_and_column_and_exports_nothing(tmp_path, kind, with_id, column):
    src = tmp_path / "chunks"
    src.mkdir()
    chunk = WRITERS[kind](src, _rows(with_id), column)
    job = make_job(tmp_path, source={"kind": "files", "path": str(src)})
    with pytest.raises(SourceError) as err:  # a polars panic (BaseException) would fail the test
        sync_partition(job, PARTITION, tmp_path / "staging", now=NOW)
    text = str(err.value)
    assert text.startswith(f"sync job 'demo', partition {PARTITION}, chunk {chunk.name}: "), text
    assert f"column {column!r} has 1 value(s) that are not valid UTF-8 text, e.g. {BAD!r}" in text, text
    assert "nothing was exported for this partition" in text
    assert _exported_files(tmp_path) == []
    staging = tmp_path / "staging"
    assert not staging.exists() or not [p for p in staging.rglob("*.parquet")]


def test_invalid_utf8_in_struct_metadata_names_the_column():
    struct = pa.array([{"plan": "pro"}, {"plan": "caf"}], type=pa.struct([("plan", pa.string())]))
    children = struct.field(0).cast(pa.binary()).to_pylist()
    children[1] = BAD
    bad = pa.StructArray.from_arrays([pa.array(children, pa.binary()).view(pa.string())], names=["plan"])
    table = pa.Table.from_pylist(ROWS).append_column("metadata", bad)
    with pytest.raises(SourceError, match=r"^chunk x.parquet: column 'metadata' has 1 value\(s\) that are not valid UTF-8"):
        normalize_arrow(table, where="chunk x.parquet")


def test_ndjson_escaped_lone_surrogate_is_refused_but_emoji_is_kept(tmp_path):
    path = tmp_path / "export-part1.ndjson"
    good = dict(ROWS[0], metadata={"note": "\U0001F600 ok"})
    path.write_text(json.dumps(good) + "\n" + json.dumps(ROWS[1]).replace('"u2"', '"u\\udce9"') + "\n")
    batches = list(iter_chunk_batches(path))
    assert batches[0].schema.field("user_id").type == pa.binary()
    with pytest.raises(SourceError, match=r"^chunk export-part1.ndjson: column 'user_id' has 1 value\(s\)"):
        normalize_arrow(batches[0], where="chunk export-part1.ndjson")
    path.write_text(json.dumps(good) + "\n")
    frame, _ = normalize_arrow(next(iter_chunk_batches(path)), where=path.name)
    # the emoji survives as the same JSON text an ASCII-escaping writer gives (unchanged behaviour)
    assert frame.get_column("metadata").to_list() == ['{"note":"\\ud83d\\ude00 ok"}']


def test_valid_binary_columns_are_read_as_text(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    user_ids = pa.array([r["user_id"].encode() for r in ROWS], type=pa.binary())
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", user_ids)
    path = tmp_path / "export-part1.parquet"
    pq.write_table(table, path)
    frame, _ = normalize_arrow(next(iter_chunk_batches(path)), where=path.name)
    assert frame.schema["user_id"] == pl.Utf8
    assert frame.get_column("user_id").to_list() == ["u1", "u2"]


def test_unknown_columns_with_bad_bytes_are_dropped_and_reported_not_read():
    table = pa.Table.from_pylist(ROWS).append_column(
        "debug_blob", pa.array([b"ok", BAD], type=pa.binary()).view(pa.string())
    )
    frame, report = normalize_arrow(table, where="chunk x.parquet")
    assert frame.height == 2
    assert "debug_blob" not in frame.columns
    assert report.unknown_columns == {"debug_blob"}


# ------------------------------------------------------------------------------ CSV with newlines
def _csv_with_newlines(path: Path, rows: int) -> int:
    """The product's own CSV writer (polars) with multi-line quoted values; returns the file size."""
    frame = pl.DataFrame({
        "app_token": ["NX-demo0001"] * rows,
        "event_type": ["track"] * rows,
        "event_name": [f"line one of {i}\nline two, \"quoted\"\r\nline three" for i in range(rows)],
        "user_id": [f"user-{i:06d}" for i in range(rows)],
        "inserted_at": ["2026-03-09T10:00:00.000000Z"] * rows,
        "metadata": ['{\n  "plan": "pro",\n  "seats": 3\n}'] * rows,
    })
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(frame.write_csv().encode(), mtime=0))
    else:
        frame.write_csv(path)
    return len(frame.write_csv().encode())


@pytest.mark.parametrize("name", ["export-part1.csv", "export-part1.csv.gz"])
def test_a_6_mb_csv_chunk_with_quoted_newlines_ingests_with_exact_row_counts(tmp_path, name):
    rows = 60_000
    path = tmp_path / name
    size = _csv_with_newlines(path, rows)
    assert size > 6 * 1024 * 1024  # larger than the reader's 4 MiB block: values cross block boundaries
    counts = [b.num_rows for b in iter_chunk_batches(path)]
    assert sum(counts) == rows
    assert len(counts) > 1
    frames = [normalize_arrow(b, where=name)[0] for b in iter_chunk_batches(path)]
    frame = pl.concat(frames)
    assert frame.height == rows
    assert frame.get_column("user_id").to_list() == [f"user-{i:06d}" for i in range(rows)]
    assert frame.get_column("event_name")[rows - 1] == f'line one of {rows - 1}\nline two, "quoted"\r\nline three'
    assert frame.get_column("metadata").unique().to_list() == ['{\n  "plan": "pro",\n  "seats": 3\n}']


def test_csv_chunk_with_quoted_newlines_exports_every_row(tmp_path):
    src = tmp_path / "chunks"
    src.mkdir()
    _csv_with_newlines(src / "export-part1.csv", 2_000)
    job = make_job(tmp_path, source={"kind": "files", "path": str(src)}, formats=[{"format": "csv"}])
    result = sync_partition(job, PARTITION, tmp_path / "staging", now=NOW)
    assert rows_by_event_type(result.manifest)["track"] == 2_000
    written = [f for f in result.files if f.event_type == "track"]
    assert sum(f.rows for f in written) == 2_000
    # the product's own CSV output reads back with the same count
    exported = [tmp_path / "exports" / "userpilot_events" / job.sync_folder / f.path for f in written]
    assert sum(b.num_rows for p in exported for b in iter_chunk_batches(p)) == 2_000


# ------------------------------------------------------------------------------ naive timestamps
@pytest.mark.parametrize("fmt", ["avro", "parquet", "csv", "ndjson"])
def test_writers_refuse_naive_timestamps(tmp_path, fmt):
    table = pa.table({
        "event_type": ["track"],
        "inserted_at": pa.array([dt.datetime(2026, 3, 9, 10, 0)], type=pa.timestamp("us")),
    })
    with pytest.raises(DestinationError) as err:
        write_parts(table.to_batches(), table.schema, FormatSpec(format=fmt), tmp_path / "work", "track")
    assert str(err.value).startswith("export track: timestamp column(s) ['inserted_at'] have no time zone")
    assert not (tmp_path / "work").exists()


def test_avro_writes_utc_timestamps_unshifted(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/New_York")  # a host far from UTC: nothing may depend on it
    time.tzset()
    try:
        instant = dt.datetime(2026, 3, 9, 10, 0, 0, 123456, tzinfo=dt.timezone.utc)
        table = pa.table({"inserted_at": pa.array([instant], type=pa.timestamp("us", tz="UTC"))})
        (part,) = write_parts(table.to_batches(), table.schema, FormatSpec(format="avro"), tmp_path, "track")
        with open(part.path, "rb") as fh:
            (record,) = list(fastavro.reader(fh))
        assert record["inserted_at"] == instant
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
