"""One partition end to end through the core (no Dagster): values, independence, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.errors import SourceError, ValidationError, WindowError
from userpilot_sync.partitions import day_window
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import DAY, NOW, PARTITION, make_job


def _day_folder(job) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / PARTITION


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_partition_exports_match_generator_counts_and_manifest(tmp_path, demo_job, staging_root):
    result = sync_partition(demo_job, PARTITION, staging_root, now=NOW)
    expected = DemoSource(demo_job.app_token, 3000, 7).expected_counts(DAY)
    folder = _day_folder(demo_job)
    names = sorted(p.name for p in folder.iterdir())
    documented = ["all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions"]
    assert names == sorted([f"{et}.parquet" for et in EVENT_TYPES] + [f"{n}.parquet" for n in documented]
                           + ["_manifest.json"])
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest == result.manifest
    assert rows_by_event_type(manifest) == {et: expected[et] for et in EVENT_TYPES}
    assert manifest["source"]["source_rows"] == 3000
    assert manifest["source"]["rows_outside_window"] == 0
    assert len(manifest["files"]) == 7 + len(documented)
    for entry in manifest["files"]:
        path = folder.parent / entry["path"]
        assert entry["sha256"] == _sha256(path)
        assert entry["bytes"] == path.stat().st_size
        rows = expected[entry["event_type"]] if "file" not in entry else manifest["userpilot_files"][entry["file"]]["rows"]
        assert entry["rows"] == pq.ParquetFile(path).metadata.num_rows == rows
    assert manifest["window"] == {"from": "2026-03-09T00:00:00+00:00", "to": "2026-03-10T00:00:00+00:00"}
    assert manifest["manifest_version"] == 2 and manifest["partition"] == PARTITION
    assert manifest["status"] == "complete" and "3000 rows exported in 7 of 7 event types" in manifest["status_reason"]
    for et, entry in manifest["event_types"].items():
        assert entry["status"] == "complete" and "reason" not in entry
        assert entry["rows_received"] == entry["rows"] + entry["duplicates_dropped"] + entry["filtered_out"]


def test_duckdb_reads_the_same_rows(tmp_path, demo_job, staging_root):
    sync_partition(demo_job, PARTITION, staging_root, now=NOW)
    folder = _day_folder(demo_job)
    start, end = day_window(DAY)
    source = pl.concat([pl.from_arrow(t) for t in DemoSource(demo_job.app_token, 3000, 7).iter_blocks(start, end)])
    for et in EVENT_TYPES:
        path = folder / f"{et}.parquet"
        ids = duckdb.sql(f"select internal_event_id from read_parquet('{path}') order by inserted_at, internal_event_id").fetchall()
        expected = source.filter(pl.col("event_type") == et).sort(["inserted_at", "internal_event_id"])
        assert [r[0] for r in ids] == expected.get_column("internal_event_id").to_list()
        ts_type = (duckdb.sql(f"select typeof(inserted_at) from read_parquet('{path}') limit 1").fetchall() or [None])[0]
        if ts_type:
            assert ts_type[0] == "TIMESTAMP WITH TIME ZONE"
    row = duckdb.sql(
        f"select event_name, entity_type, entity_id, interaction_status from read_parquet('{folder}/interaction.parquet') limit 1"
    ).fetchall()[0]
    assert row[0] == f"{row[1]}:{row[2]}:{row[3]}"


def test_rerun_is_byte_identical(tmp_path, demo_job, staging_root):
    first = sync_partition(demo_job, PARTITION, staging_root, now=NOW, run_id="a")
    hashes = {p.name: _sha256(p) for p in _day_folder(demo_job).glob("*.parquet")}
    second = sync_partition(demo_job, PARTITION, staging_root, now=NOW, run_id="b")
    assert {p.name: _sha256(p) for p in _day_folder(demo_job).glob("*.parquet")} == hashes
    assert first.manifest["files"] == second.manifest["files"]
    assert second.manifest["run_id"] == "b"


def test_window_refusals_write_nothing(tmp_path, demo_job, staging_root):
    with pytest.raises(WindowError, match="has not ended yet"):
        sync_partition(demo_job, "2026-03-10", staging_root, now=NOW)
    with pytest.raises(WindowError, match="older than the 365-day window"):
        sync_partition(demo_job, "2025-03-09", staging_root, now=NOW)
    assert not Path(demo_job.destination.path).exists()


# ------------------------------------------------------------------------------ bad input
def _chunks(tmp_path: Path, mutate=None, extra_rows: list[dict] | None = None) -> Path:
    """The demo day as two Parquet chunk files (optionally mutated) in a source folder."""
    start, end = day_window(DAY)
    frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 3000, 7).iter_blocks(start, end)])
    if mutate:
        frame = mutate(frame)
    if extra_rows:
        frame = pl.concat([frame, pl.DataFrame(extra_rows, schema=frame.schema)], how="vertical")
    folder = tmp_path / "chunks"
    folder.mkdir(exist_ok=True)
    half = frame.height // 2
    frame.slice(0, half).write_parquet(folder / "export-part1.parquet")
    frame.slice(half).write_parquet(folder / "export-part2.parquet")
    return folder


def _files_job(tmp_path, folder):
    return make_job(tmp_path, source={"kind": "files", "path": str(folder)})


def _assert_nothing_for_partition(job, other_day_files: dict[str, str] | None = None):
    folder = _day_folder(job)
    assert not (folder / "_manifest.json").exists()
    for path, digest in (other_day_files or {}).items():
        assert _sha256(Path(path)) == digest


def _export_other_day(tmp_path, staging_root) -> dict[str, str]:
    """Export 2026-03-08 from the demo source first, to show a failing day leaves it untouched."""
    job = make_job(tmp_path)
    sync_partition(job, "2026-03-08", staging_root, now=NOW)
    folder = Path(job.destination.path) / "userpilot_events" / job.sync_folder / "2026-03-08"
    return {str(p): _sha256(p) for p in folder.iterdir()}


def test_files_source_gives_same_exports_as_demo(tmp_path, staging_root):
    demo = sync_partition(make_job(tmp_path / "a"), PARTITION, staging_root / "a", now=NOW)
    files = sync_partition(_files_job(tmp_path / "b", _chunks(tmp_path)), PARTITION, staging_root / "b", now=NOW)
    # the same events give the same files; only what the lookups add differs (a files source has
    # none: no definitions file, breakdown names null)
    from_lookups = {"feature_tags_breakdown", "feature_tags_definitions"}
    assert [f for f in demo.manifest["files"] if f.get("file") not in from_lookups] == \
        [f for f in files.manifest["files"] if f.get("file") not in from_lookups]
    assert files.manifest["userpilot_files"]["feature_tags_definitions"]["status"] == "absent"


def test_rows_outside_the_day_are_counted_not_exported(tmp_path, staging_root):
    start, end = day_window(DAY)
    late = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 3000, 7).iter_blocks(end, end.replace(hour=1))])
    folder = _chunks(tmp_path)
    late.write_parquet(folder / "export-part3.parquet")
    result = sync_partition(_files_job(tmp_path, folder), PARTITION, staging_root, now=NOW)
    assert result.manifest["source"]["rows_outside_window"] == late.height > 0
    assert sum(rows_by_event_type(result.manifest).values()) == 3000


def test_exact_duplicates_are_dropped(tmp_path, staging_root):
    folder = _chunks(tmp_path, mutate=lambda f: pl.concat([f, f.slice(0, 25)]))
    result = sync_partition(_files_job(tmp_path, folder), PARTITION, staging_root, now=NOW)
    assert result.manifest["source"]["duplicates_dropped"] == 25
    assert sum(rows_by_event_type(result.manifest).values()) == 3000


@pytest.mark.parametrize(
    "name, mutate, match",
    [
        (
            "unknown_event_type",
            lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("page_leave")).otherwise(pl.col("event_type")).alias("event_type")),
            r"column 'event_type' .*'page_leave'",
        ),
        (
            "wrong_dtype",
            lambda f: f.with_columns(pl.col("screen_width").cast(pl.Utf8)).with_columns(
                pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("wide")).otherwise(pl.col("screen_width")).alias("screen_width")),
            r"column 'screen_width' .*'wide'",
        ),
        (
            "malformed_interaction",
            lambda f: f.with_columns(
                pl.when(pl.col("event_type") == "interaction").then(pl.lit("checklist-2-SEEN")).otherwise(pl.col("event_name")).alias("event_name")),
            r"event type 'interaction'.*\n.*column 'event_name'.*checklist-2-SEEN",
        ),
        (
            "same_id_different_content",
            lambda f: pl.concat([f, f.filter(pl.col("event_type") == "track").head(1).with_columns(pl.lit('{"changed":1}').alias("metadata"))]),
            r"column 'internal_event_id' has 2 row\(s\) sharing an id with different content",
        ),
    ],
)
def test_bad_input_fails_partition_without_manifest(tmp_path, staging_root, name, mutate, match):
    others = _export_other_day(tmp_path, staging_root)
    job = _files_job(tmp_path, _chunks(tmp_path, mutate=mutate))
    with pytest.raises((ValidationError, SourceError)) as err:
        sync_partition(job, PARTITION, staging_root, now=NOW)
    text = str(err.value)
    assert "sync job 'demo'" in text and PARTITION in text
    import re

    assert re.search(match, text), text
    _assert_nothing_for_partition(job, others)


def test_missing_and_unreadable_chunks_are_clear_errors(tmp_path, staging_root):
    job = _files_job(tmp_path, tmp_path / "nowhere")
    with pytest.raises(SourceError, match="does not exist"):
        sync_partition(job, PARTITION, staging_root, now=NOW)
    folder = _chunks(tmp_path)
    (folder / "export-part2.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=r"chunk export-part2.parquet: unreadable parquet file"):
        sync_partition(_files_job(tmp_path, folder), PARTITION, staging_root, now=NOW)
    _assert_nothing_for_partition(job)
    # nothing half-staged is left behind either
    assert not any(p.name.startswith(".staging-") for p in (staging_root / "demo").iterdir())
