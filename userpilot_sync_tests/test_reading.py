"""The readers' guide (docs/reading.md): its DuckDB, polars and pyarrow snippets, run as written
against real exports (3 days, every format, both layouts; the middle day has no ``track`` events),
give the rows the manifests count; and the traps the guide names are real.
"""

from __future__ import annotations

import glob
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pytest

from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_reading import (
    DAYS,
    EMPTY_DAY,
    TRICKY_NAME,
    TRICKY_SESSION,
    export_days,
    fenced_snippets,
    manifest_rows,
    write_chunks,
)

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "reading.md"
SNIPPETS = {name: code for name, code in fenced_snippets(GUIDE.read_text(), "python").items()
            if not name.startswith("spark-")}
#: Snippets that read ``track`` over the range (``df`` or ``table``), by the checks beyond row counts.
TRACK_READS = ["duckdb-parquet", "duckdb-ndjson", "duckdb-csv", "duckdb-userpilot-layout", "polars-parquet",
               "polars-ndjson", "polars-csv", "polars-avro", "pyarrow-parquet", "pyarrow-ndjson", "pyarrow-csv"]
ALL_TYPES_READS = ["duckdb-all-event-types", "polars-all-event-types", "pyarrow-all-event-types"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    chunks = write_chunks(root / "chunks")
    hive, hive_manifests = export_days(root / "hive", chunks, "hive")
    userpilot, userpilot_manifests = export_days(root / "userpilot", chunks, "userpilot", [{"format": "parquet"}])
    assert [m["event_types"]["track"]["rows"] == 0 for m in hive_manifests] == [False, True, False]
    return {"hive": (hive, hive_manifests), "userpilot": (userpilot, userpilot_manifests)}


def _run(name: str, exports) -> pl.DataFrame:
    """Run one snippet of the guide as written; its result (``df`` or ``table``) as a polars frame."""
    namespace = {"sync": exports["hive"][0].as_posix(), "sync_userpilot": exports["userpilot"][0].as_posix()}
    exec(compile(SNIPPETS[name], f"docs/reading.md#{name}", "exec"), namespace)
    result = namespace.get("df", namespace.get("table"))
    return pl.from_arrow(result) if isinstance(result, pa.Table) else result


def test_every_snippet_of_the_guide_is_run():
    assert set(SNIPPETS) == {"manifest-files", *TRACK_READS, *ALL_TYPES_READS}


def test_an_empty_export_has_no_file_and_its_manifest_accounts_for_it(exports):
    for layout, (sync, manifests) in exports.items():
        empty = manifests[DAYS.index(EMPTY_DAY)]
        assert empty["event_types"]["track"] == {**empty["event_types"]["track"], "status": "empty", "rows": 0}
        assert not [f for f in empty["files"] if f["event_type"] == "track"]
        track_files = [p for p in sync.rglob("*") if p.is_file() and (p.name.startswith("track.")
                                                                      or p.parent.parent.name == "track")]
        assert track_files and not [p for p in track_files if EMPTY_DAY.isoformat() in p.as_posix()], layout
        # every file on disk is listed in a manifest (nothing else was written)
        listed = {f["path"] for m in manifests for f in m["files"]}
        on_disk = {p.relative_to(sync).as_posix() for p in sync.rglob("*") if p.is_file() and p.name != "_manifest.json"}
        assert on_disk == listed, layout


def test_manifest_snippet(exports):
    _run("manifest-files", exports)  # checks sha256 and rows itself


@pytest.mark.parametrize("name", TRACK_READS)
def test_track_over_a_range_with_an_empty_day(exports, name):
    layout = "userpilot" if "userpilot" in name else "hive"
    df = _run(name, exports)
    assert df.height == manifest_rows(exports[layout][1], "track")
    if name not in ("duckdb-userpilot-layout", "polars-ndjson", "polars-csv", "polars-avro"):
        # the hive partition column (polars reads it for Parquet only); the empty day has no folder
        assert sorted(df.get_column("date").cast(pl.String).unique().to_list()) == [DAYS[0].isoformat(),
                                                                                    DAYS[2].isoformat()]
    if name.endswith("-csv"):
        assert df.filter(pl.col("session") == TRICKY_SESSION).height == 1  # "007" stayed text
        assert df.filter(pl.col("event_name") == TRICKY_NAME).height == 1  # quotes, comma, newline intact
    if name == "polars-ndjson":
        assert [v for v in df.select(pl.col("metadata").str.json_path_match("$.note")).to_series() if v] == ["late key"]
    if name in ("pyarrow-ndjson", "duckdb-ndjson"):
        assert "note" in [f.name for f in df.schema["metadata"].fields]


@pytest.mark.parametrize("name", ALL_TYPES_READS)
def test_all_event_types_keep_interactions_columns(exports, name):
    manifests = exports["hive"][1]
    df = _run(name, exports)
    assert df.height == sum(manifest_rows(manifests, et) for et in EVENT_TYPES)
    assert df.get_column("entity_type").drop_nulls().len() == manifest_rows(manifests, "interaction")


# ---------------------------------------------------------------------------------- the traps are real
def test_the_traps_the_guide_names(exports):
    sync = exports["hive"][0].as_posix()
    up = exports["userpilot"][0].as_posix()
    # polars: the metadata struct comes from the first file, also with infer_schema_length=None
    files = sorted(glob.glob(f"{sync}/ndjson.gz/track/*/*.ndjson.gz"))
    for length in (100, None):
        assert "note" not in [f.name for f in pl.read_ndjson(files, infer_schema_length=length).schema["metadata"].fields]
    # pyarrow.dataset: the first file's schema
    assert "note" not in ds.dataset(f"{sync}/ndjson.gz/track", format="json").schema.field("metadata").type.names
    # inference turns "007" into 7
    assert pl.scan_csv(f"{sync}/csv/track/*/*.csv").collect_schema()["session"] == pl.Int64
    assert ds.dataset(f"{sync}/csv/track", format="csv").schema.field("session").type == pa.int64()
    # pyarrow.csv without newlines_in_values: a block boundary inside the quoted value fails
    [last] = glob.glob(f"{sync}/csv/track/date={DAYS[2].isoformat()}/*.csv")
    at = Path(last).read_bytes().find(b"then\nsaved")
    with pytest.raises(pa.ArrowInvalid, match="Expected 20 columns"):
        pcsv.read_csv(last, read_options=pcsv.ReadOptions(block_size=at))
    fixed = pcsv.read_csv(last, read_options=pcsv.ReadOptions(block_size=at),
                          parse_options=pcsv.ParseOptions(newlines_in_values=True))
    assert fixed.num_rows == exports["hive"][1][2]["event_types"]["track"]["rows"]
    # one read over every event type: the first file's columns (DuckDB), or an error (polars)
    with pytest.raises(duckdb.BinderException):
        duckdb.sql(f"SELECT entity_type FROM read_parquet('{sync}/parquet/*/*/*.parquet')").fetchall()
    with pytest.raises(pl.exceptions.SchemaError):
        pl.scan_parquet(f"{sync}/parquet/*/*/*.parquet").collect()
    assert "entity_type" not in ds.dataset(f"{sync}/parquet", format="parquet").schema.names
    # a track* glob also reads track_feature
    kinds = duckdb.sql(f"SELECT DISTINCT event_type FROM read_parquet('{up}/*/track*.parquet') ORDER BY 1").fetchall()
    assert kinds == [("track",), ("track_feature",)]
