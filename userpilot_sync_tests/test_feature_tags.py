"""Feature tags: escape_id, the breakdown (against DuckDB), definitions, names, split_by_id."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from userpilot_sync.documented.feature_tags import (
    BREAKDOWN_SCHEMA,
    DEFINITIONS_SCHEMA,
    breakdown_table,
    definitions_table,
    escape_id,
    feature_tag_names,
    labeled_event_ids,
    split_by_id,
)
from userpilot_sync.errors import ValidationError
from userpilot_sync.export import PreparedExport
from userpilot_sync.schema.events import export_arrow_schema
from userpilot_sync.source.demo import FEATURE_TAGS
from userpilot_sync.source.lookups import demo_lookup_table, lookup_arrow_schema
from userpilot_sync.staging import IpcFileWriter

SCHEMA = export_arrow_schema("track_feature")
DAY = datetime(2026, 3, 9, tzinfo=timezone.utc)
LONG_ID = "é" * 150  # 300 bytes of UTF-8
HOSTILE_IDS = ["../x", "a/b", "5_00001", "5", "ünïcødé 名前", LONG_ID, "a.b", "%41"]
NAME_RE = re.compile(r"^[A-Za-z0-9%~-]+$")


def _rows(spec: list[tuple[str, str | None, str | None]]) -> pa.Table:
    """track_feature export rows (Event Schema) from (event_name, user_id, company_id)."""
    n = len(spec)
    cols = {f.name: [None] * n for f in SCHEMA}
    cols.update(
        app_token=["NX-1a2b3c4d"] * n,
        event_type=["track_feature"] * n,
        event_name=[s[0] for s in spec],
        user_id=[s[1] for s in spec],
        company_id=[s[2] for s in spec],
        inserted_at=[DAY + timedelta(seconds=i) for i in range(n)],
        internal_event_id=[f"{i:016x}" for i in range(n)],
        source=["web-client"] * n,
    )
    return pa.table(cols, schema=SCHEMA)


def _demo_like(n: int = 600, seed: int = 7) -> pa.Table:
    rng = random.Random(seed)
    tags = list(FEATURE_TAGS) + ["9999"]  # 9999: a tag without a definition
    spec = []
    for _ in range(n):
        user = rng.choice([None, "", *(f"user-{u:03d}" for u in range(40))])
        company = rng.choice([None, "", *(f"company-{c:02d}" for c in range(8))])
        spec.append((rng.choice(tags), user, company))
    return _rows(spec)


def _hostile() -> pa.Table:
    rng = random.Random(11)
    spec = [(rng.choice(HOSTILE_IDS), rng.choice(["u1", "u2", "u3", None, ""]), rng.choice(["c1", "c2", None]))
            for _ in range(300)]
    return _rows(spec)


def _batches(table: pa.Table, size: int) -> list[pa.RecordBatch]:
    return table.to_batches(max_chunksize=size)


def _duckdb_breakdown(table: pa.Table) -> list[tuple]:
    con = duckdb.connect()
    con.register("t", table)
    return con.execute(
        "SELECT event_name, count(*), count(DISTINCT NULLIF(user_id, '')), "
        "count(DISTINCT NULLIF(company_id, '')) FROM t GROUP BY 1 ORDER BY 1"
    ).fetchall()


def _prepared(tmp_path: Path, table: pa.Table, pieces: int = 3, *, batch_rows: int = 37) -> PreparedExport:
    """A PreparedExport of ``table`` split over ``pieces`` Arrow IPC files (written like export.py)."""
    size = -(-table.num_rows // pieces)
    files = []
    for i in range(pieces):
        path = tmp_path / f"{i:05d}.arrow"
        writer = IpcFileWriter(path, SCHEMA)
        try:
            for batch in table.slice(i * size, size).to_batches(max_chunksize=batch_rows):
                writer.write_table(pa.Table.from_batches([batch], schema=SCHEMA))
        finally:
            writer.close()
        files.append(str(path))
    return PreparedExport(
        sync_job="demo", partition="2026-03-09", event_type="track_feature", files=files,
        rows=table.num_rows, rows_staged=table.num_rows, filtered_out=0, duplicates_dropped=0,
        exclude_columns=[],
    )


# ------------------------------------------------------------------------------ escape_id
@pytest.mark.parametrize("value, expected", [
    ("abc-123", "abc-123"),
    ("1201", "1201"),
    ("a_b", "a%5Fb"),
    ("a.b", "a%2Eb"),
    ("a/b", "a%2Fb"),
    ("../x", "%2E%2E%2Fx"),
    ("é", "%C3%A9"),
    ("%", "%25"),
    ("~", "%7E"),
    ("a b", "a%20b"),
])
def test_escape_id_values(value, expected):
    assert escape_id(value) == expected


def test_escape_id_long_ids_are_cut_and_hashed():
    out = escape_id(LONG_ID)
    digest = hashlib.sha256(LONG_ID.encode()).hexdigest()[:16]
    assert len(out) == 117 and out.endswith("~" + digest)
    assert out[:100] == ("%C3%A9" * 17)[:100]
    # 120 escaped bytes stay whole, 121 are cut
    assert escape_id("a" * 120) == "a" * 120
    assert len(escape_id("a" * 121)) == 117
    # same 100-byte prefix, different ids -> different names
    assert escape_id(LONG_ID) != escape_id(LONG_ID + "x")


def test_escape_id_is_injective_and_safe():
    assert escape_id("5_00001") != escape_id("5")
    rng = random.Random(3)
    alphabet = "aZ09-_.~%/ é名\x00"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(5_000)}
    ids |= {"x" * n for n in range(1, 200)} | set(HOSTILE_IDS)
    names = {escape_id(i) for i in ids}
    assert len(names) == len(ids)
    assert all(NAME_RE.match(n) and len(n.encode()) <= 120 for n in names)


def test_escape_id_refuses_empty_and_non_strings():
    with pytest.raises(ValueError):
        escape_id("")
    with pytest.raises(TypeError):
        escape_id(5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ breakdown
@pytest.mark.parametrize("make", [_demo_like, _hostile], ids=["demo", "hostile"])
@pytest.mark.parametrize("batch_rows", [1_000, 64, 7])
def test_breakdown_equals_duckdb_group_by(make, batch_rows):
    table = make()
    names = feature_tag_names(demo_lookup_table("features_events"))
    out = breakdown_table(_batches(table, batch_rows), names, sync_job="demo", partition="2026-03-09")
    assert out.schema == BREAKDOWN_SCHEMA
    got = [(r["feature_tag_id"], r["events"], r["unique_users"], r["unique_companies"]) for r in out.to_pylist()]
    assert got == _duckdb_breakdown(table)
    assert [r["name"] for r in out.to_pylist()] == [names.get(r[0]) for r in got]
    assert sum(r[1] for r in got) == table.num_rows


def test_breakdown_counts_a_user_once_across_batches_and_names_unknown_tags_null():
    table = _rows([("1201", "u1", "c1"), ("1201", "u1", "c1"), ("1201", "u2", None),
                   ("9999", "", ""), ("9999", None, None), ("1201", "u1", "c2")])
    batches = _batches(table, 2)  # 1201's u1 in three batches
    out = breakdown_table(batches, {"1201": "Create report button", "1202": "Export menu"},
                          sync_job="demo", partition="2026-03-09")
    assert out.to_pylist() == [
        {"feature_tag_id": "1201", "name": "Create report button", "events": 4, "unique_users": 2, "unique_companies": 2},
        {"feature_tag_id": "9999", "name": None, "events": 2, "unique_users": 0, "unique_companies": 0},
    ]


def test_breakdown_handles_hostile_ids_exactly():
    table = _rows([("5", "u1", "c1"), ("5_00001", "u1", "c1"), ("../x", "u2", None), (LONG_ID, "u3", "c3"),
                   ("a/b", None, "c4"), ("5", "u2", "c1")])
    out = breakdown_table(_batches(table, 4), {}, sync_job="demo", partition="2026-03-09")
    assert out.column("feature_tag_id").to_pylist() == ["../x", "5", "5_00001", "a/b", LONG_ID]
    assert out.column("events").to_pylist() == [1, 2, 1, 1, 1]
    assert out.column("unique_users").to_pylist() == [1, 2, 1, 0, 1]
    assert out.column("name").null_count == 5


def test_breakdown_of_no_rows_is_empty():
    out = breakdown_table([], {}, sync_job="demo", partition="2026-03-09")
    assert out.schema == BREAKDOWN_SCHEMA and out.num_rows == 0
    out = breakdown_table(_batches(_rows([]), 10), {}, sync_job="demo", partition="2026-03-09")
    assert out.num_rows == 0


def test_breakdown_refuses_empty_tag_ids_and_other_event_types():
    table = _rows([("", "u1", "c1"), ("1201", "u1", "c1")])
    with pytest.raises(ValidationError) as err:
        breakdown_table(_batches(table, 10), {}, sync_job="demo", partition="2026-03-09")
    message = str(err.value)
    assert "sync job 'demo', partition 2026-03-09, file feature_tags_breakdown: column 'feature_tag_id'" in message
    assert "re-materialize the partition" in message
    wrong = _rows([("1201", "u1", "c1")]).set_column(1, "event_type", pa.array(["track"], pa.string()))
    with pytest.raises(ValidationError, match="file feature_tags_breakdown: column 'event_type'"):
        breakdown_table(wrong.to_batches(), {}, sync_job="demo", partition="2026-03-09")
    with pytest.raises(ValidationError, match=r"lack column\(s\) \['user_id'\]"):
        breakdown_table(_rows([("1201", "u1", "c1")]).drop(["user_id"]).to_batches(), {},
                        sync_job="demo", partition="2026-03-09")


# ------------------------------------------------------------------------------ names, definitions
def _features_events(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    schema = lookup_arrow_schema("features_events")
    return pa.Table.from_pylist(
        [{"id": i, "name": n, "type": t, "category": "Product", "description": f"about {i}", "attributes": "{}"}
         for i, n, t in rows], schema=schema)


def test_names_and_labeled_ids_come_from_features_events():
    table = _features_events([("1201", "Create report", "feature_tag"), ("1202", None, "feature_tag"),
                              ("Signed Up", "Signed Up", "labeled_event"), ("Clicked", "Clicked", "tracked_event")])
    assert feature_tag_names(table) == {"1201": "Create report", "1202": None}
    assert labeled_event_ids(table) == {"Signed Up"}
    assert feature_tag_names(None) == {} and labeled_event_ids(None) == set()
    demo = demo_lookup_table("features_events")
    assert feature_tag_names(demo) == FEATURE_TAGS
    assert labeled_event_ids(demo) == {"Signed Up", "Upgraded Plan"}  # the demo defines two labeled events


def test_definitions_from_the_demo_lookup():
    out = definitions_table(demo_lookup_table("features_events"), sync_job="demo", partition="2026-03-09")
    assert out.schema == DEFINITIONS_SCHEMA
    assert out.column_names == ["id", "name", "description", "category"]
    assert out.column("id").to_pylist() == sorted(FEATURE_TAGS)
    assert dict(zip(out.column("id").to_pylist(), out.column("name").to_pylist())) == FEATURE_TAGS
    assert set(out.column("category").to_pylist()) == {"Product"}


def test_definitions_sort_plainly_and_refuse_duplicate_ids():
    table = _features_events([("9", "nine", "feature_tag"), ("10", "ten", "feature_tag"),
                              ("Signed Up", "Signed Up", "labeled_event")])
    out = definitions_table(table, sync_job="demo", partition="2026-03-09")
    assert out.to_pylist() == [
        {"id": "10", "name": "ten", "description": "about 10", "category": "Product"},
        {"id": "9", "name": "nine", "description": "about 9", "category": "Product"},
    ]
    dup = _features_events([("1201", "a", "feature_tag"), ("1201", "b", "feature_tag")])
    with pytest.raises(ValidationError) as err:
        definitions_table(dup, sync_job="demo", partition="2026-03-09")
    message = str(err.value)
    assert "sync job 'demo', partition 2026-03-09, file feature_tags_definitions: column 'id'" in message
    assert "'1201'" in message and "refresh the lookups" in message
    empty = _features_events([("", "a", "feature_tag")])
    with pytest.raises(ValidationError, match="file feature_tags_definitions: column 'id'"):
        definitions_table(empty, sync_job="demo", partition="2026-03-09")


# ------------------------------------------------------------------------------ split_by_id
def _multiset(table: pa.Table) -> Counter:
    return Counter(tuple(sorted(r.items(), key=lambda kv: kv[0])) for r in table.to_pylist())


@pytest.mark.parametrize("batch_rows", [3, 37, 10_000])
def test_split_by_id_partitions_the_export(tmp_path, batch_rows):
    table = pa.concat_tables([_hostile(), _demo_like(200)])
    prepared = _prepared(tmp_path, table, pieces=3, batch_rows=batch_rows)
    parts = list(split_by_id(prepared))
    assert [p[0] for p in parts] == sorted(set(table.column("event_name").to_pylist()))
    assert all(t.schema == prepared.arrow_schema for _, t in parts)
    assert _multiset(pa.concat_tables([t for _, t in parts])) == _multiset(table)
    ids = table.column("internal_event_id").to_pylist()
    names = table.column("event_name").to_pylist()
    for event_name, part in parts:
        assert set(part.column("event_name").to_pylist()) == {event_name}
        expected = [i for i, n in zip(ids, names) if n == event_name]  # original order
        assert part.column("internal_event_id").to_pylist() == expected
        assert part.num_rows == names.count(event_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.arrow", "00001.arrow", "00002.arrow"]  # work file gone


def test_split_by_id_filters_ids(tmp_path):
    table = _hostile()
    prepared = _prepared(tmp_path, table, pieces=2, batch_rows=50)
    wanted = {"5", "a/b", LONG_ID, "absent"}
    parts = list(split_by_id(prepared, wanted))
    assert [p[0] for p in parts] == ["5", "a/b", LONG_ID]
    names = table.column("event_name").to_pylist()
    assert [t.num_rows for _, t in parts] == [names.count(i) for i in ("5", "a/b", LONG_ID)]
    assert list(split_by_id(prepared, set())) == []
    assert list(split_by_id(prepared, {"absent"})) == []


def test_split_by_id_removes_its_work_file_when_closed_early(tmp_path):
    prepared = _prepared(tmp_path, _hostile(), pieces=2)
    parts = split_by_id(prepared)
    first, table = next(parts)
    assert first == "%41" and set(table.column("event_name").to_pylist()) == {"%41"}
    assert any(p.name.startswith(".split-") for p in tmp_path.iterdir())
    parts.close()
    assert not any(p.name.startswith(".split-") for p in tmp_path.iterdir())
    assert table.column("event_name").to_pylist() == ["%41"] * table.num_rows  # still readable


def test_split_by_id_of_an_empty_export(tmp_path):
    prepared = _prepared(tmp_path, _rows([]), pieces=2)
    assert list(split_by_id(prepared)) == []
    no_files = PreparedExport(sync_job="demo", partition="2026-03-09", event_type="track_feature", files=[],
                              rows=0, rows_staged=0, filtered_out=0, duplicates_dropped=0, exclude_columns=[])
    assert list(split_by_id(no_files)) == []
