"""Lenient reading of export chunks: sparse NDJSON, mixed types, struct metadata, bad metadata."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userpilot_sync.errors import SourceError
from userpilot_sync.source.chunks import iter_chunk_batches
from userpilot_sync.source.normalize import normalize_arrow

BASE = {"app_token": "NX-demo0001", "event_type": "page_view", "event_name": "", "user_id": "u1",
        "inserted_at": "2026-03-09T10:00:00Z"}


def _read(path) -> pl.DataFrame:
    frames = [normalize_arrow(b, where=path.name)[0] for b in iter_chunk_batches(path)]
    return pl.concat(frames)


def test_sparse_ndjson_keeps_columns_missing_from_the_first_line(tmp_path):
    path = tmp_path / "export-part1.ndjson"
    lines = [dict(BASE)] + [dict(BASE, hostname="app.example", screen_width=1920 + i, metadata={"b": 1, "a": i})
                            for i in range(3)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    frame = _read(path)
    assert frame.get_column("hostname").to_list() == [None, "app.example", "app.example", "app.example"]
    assert frame.get_column("screen_width").to_list() == [None, 1920, 1921, 1922]
    assert frame.get_column("metadata").to_list() == [None, '{"a":0,"b":1}', '{"a":1,"b":1}', '{"a":2,"b":1}']


def test_mixed_value_types_in_one_column_are_read_as_text_then_converted(tmp_path):
    path = tmp_path / "export-part1.ndjson"
    path.write_text("\n".join(json.dumps(dict(BASE, screen_width=w)) for w in (1920, "1080", None)) + "\n")
    assert _read(path).get_column("screen_width").to_list() == [1920, 1080, None]


def test_struct_metadata_gives_the_same_text_as_ndjson_objects(tmp_path):
    path = tmp_path / "export-part1.parquet"
    table = pa.Table.from_pylist([
        dict(BASE, metadata={"b": None, "a": 1}),
        dict(BASE, metadata={"b": 2, "a": None}),
    ])
    pq.write_table(table, path)
    # struct fields in file order, nulls for keys a row lacks -> sorted keys, no null members
    assert _read(path).get_column("metadata").to_list() == ['{"a":1}', '{"b":2}']


def test_metadata_that_is_not_a_json_object_is_a_clear_error(tmp_path):
    path = tmp_path / "export-part1.csv"
    path.write_text("app_token,event_type,event_name,inserted_at,metadata\n"
                    "NX-demo0001,page_view,,2026-03-09T10:00:00Z,not json {\n")
    with pytest.raises(SourceError, match=r"export-part1.csv: column 'metadata' has 1 value\(s\) that are not a JSON object"):
        _read(path)


def test_epoch_integer_timestamps_name_the_chunk(tmp_path):
    path = tmp_path / "export-part9.parquet"
    pq.write_table(pa.Table.from_pylist([dict(BASE, inserted_at=1_700_000_000)]), path)
    with pytest.raises(SourceError, match=r"export-part9.parquet: column 'inserted_at' has type Int64"):
        _read(path)
