"""Backfill runs over a range of days: one extraction, per-day exports and manifests, bad days isolated."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import day_window, last_complete_days
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import check_evaluations, make_job, run_sync

DAYS = [d.isoformat() for d in last_complete_days(4)[:3]]


def _manifest(job, pk) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk / "_manifest.json"


def _latest(instance, key: dg.AssetKey, pk: str):
    """The newest materialization record of ``key`` for day ``pk``."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]), limit=1).records
    assert records, (key, pk)
    return records[0]


def test_range_run_exports_each_day_with_its_own_manifest(tmp_path):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 800, "seed": 5})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    assert defs.resolve_assets_def(keys.export("track")).backfill_policy == dg.BackfillPolicy.multi_run(31)
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, DAYS[0], DAYS[-1])
        assert result.success, failure_messages(result)
        assert len(instance.get_runs()) == 1
        # one materialization per day per asset, all in one run
        for key in keys.day_assets:
            events = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
            assert sorted(e.partition for e in events) == DAYS, key
        for pk in DAYS:
            doc = json.loads(_manifest(job, pk).read_text())
            expected = DemoSource(job.app_token, 800, 5).expected_counts(date.fromisoformat(pk))
            assert doc["partition"] == pk
            assert rows_by_event_type(doc) == {et: expected[et] for et in job.event_types}
            assert all(f["path"].startswith(pk) for f in doc["files"])
            # one extraction covered the whole range; the manifest's window is the day's own
            assert doc["source"]["extraction_window"]["from"].startswith(DAYS[0])
            assert doc["source"]["extraction_window"]["to"].startswith(
                (date.fromisoformat(DAYS[-1]) + timedelta(days=1)).isoformat())
            assert doc["source"]["window_from"].startswith(pk) and doc["window"]["from"].startswith(pk)
            assert doc["run_id"] == result.run_id
            # each day's records carry that day's own figures (not the range's)
            track = _latest(instance, keys.export("track"), pk).asset_materialization.metadata
            assert track["dagster/row_count"].value == rows_by_event_type(doc)["track"]
            assert track["dagster/uri"].value.endswith(f"/{pk}/track.parquet")
            assert [f["path"] for f in track["userpilot/files"].value] == [f"{pk}/track.parquet"]
            manifest_md = _latest(instance, keys.manifest, pk).asset_materialization.metadata
            assert manifest_md["userpilot/status"].value == "exported"
            assert manifest_md["dagster/row_count"].value == sum(rows_by_event_type(doc).values()) == 800
            assert manifest_md["dagster/uri"].value == _manifest(job, pk).as_uri()
        exported = check_evaluations(instance, keys.manifest, "day_exported")
        assert sorted(exported) == DAYS and all(e.passed for e in exported.values())


def test_bad_day_in_a_range_does_not_cost_the_good_days(tmp_path):
    folder = tmp_path / "chunks"
    folder.mkdir()
    src = DemoSource("NX-demo0001", 600, 5)
    for pk in DAYS:
        start, end = day_window(date.fromisoformat(pk))
        frame = pl.concat([pl.from_arrow(t) for t in src.iter_blocks(start, end)])
        if pk == DAYS[1]:  # a malformed interaction name on the middle day
            frame = frame.with_columns(
                pl.when(pl.col("event_type") == "interaction").then(pl.lit("broken")).otherwise(pl.col("event_name")).alias("event_name")
            )
        frame.write_parquet(folder / f"export-{pk}.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(folder)})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, DAYS[0], DAYS[-1])
        assert not result.success
        [text] = failure_messages(result)
        first_line, *rest = text.splitlines()
        assert first_line.startswith(f"sync job 'demo', partition(s) {DAYS[1]}: 1 of 3 partition(s) failed and got no manifest")
        assert "the other 2 were exported completely" in first_line
        assert f"; {DAYS[1]}: event type 'interaction': " in first_line  # the first failed day's cause
        assert rest[0].startswith("Fix the source data") and rest[1].startswith(f"  {DAYS[1]}: ") and "event_name" in text
        assert DAYS[0] not in text and DAYS[2] not in text
        assert _manifest(job, DAYS[0]).exists() and _manifest(job, DAYS[2]).exists()
        assert not _manifest(job, DAYS[1]).exists()
        assert not (_manifest(job, DAYS[1]).parent).exists()  # nothing of the bad day was written
        # every day gets its own record: the good days exported with their files, the bad day failed
        for key in keys.day_assets:
            for pk in (DAYS[0], DAYS[2]):
                md = _latest(instance, key, pk).asset_materialization.metadata
                assert md["userpilot/status"].value == "exported", (key, pk)
            bad = _latest(instance, key, DAYS[1]).asset_materialization.metadata
            assert bad["userpilot/status"].value == "failed", key
            assert "event_name" in str(bad["reason"].value), key
            assert not (bad["userpilot/files"].value if "userpilot/files" in bad else [])
        for pk in (DAYS[0], DAYS[2]):
            files = _latest(instance, keys.manifest, pk).asset_materialization.metadata["userpilot/files"].value
            assert files and all(f["path"].startswith(f"{pk}/") for f in files)
        # the day_exported check: passed for each good day, failed for the bad day (with why)
        exported = check_evaluations(instance, keys.manifest, "day_exported")
        assert set(exported) == set(DAYS)
        assert exported[DAYS[0]].passed and exported[DAYS[2]].passed
        assert not exported[DAYS[1]].passed and exported[DAYS[1]].severity == dg.AssetCheckSeverity.ERROR
        assert "event_name" in exported[DAYS[1]].metadata["reason"].value
        assert exported[DAYS[1]].metadata["rows"].value == 0
        good = json.loads(_manifest(job, DAYS[2]).read_text())
        assert rows_by_event_type(good)["interaction"] > 0
        assert exported[DAYS[2]].metadata["rows"].value == sum(rows_by_event_type(good).values())


def test_connection_check_job_writes_a_marker(tmp_path):
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_check_destination").execute_in_process(instance=instance)
        assert result.success
        assert instance.get_run_by_id(result.run_id).tags["userpilot_sync/sync_job"] == "demo"
    marker = Path(job.destination.path) / "userpilot_events" / job.sync_folder / "_userpilot_sync_check" / "demo.json"
    assert json.loads(marker.read_text())["sync_job"] == "demo"


def test_range_wide_counts_never_read_as_a_days_figure(tmp_path):
    """Rows the source delivered outside the extraction's window belong to the range, not a day."""
    folder = tmp_path / "chunks"
    folder.mkdir()
    days = DAYS
    src = DemoSource("NX-demo0001", 300, 5)
    frames = []
    for pk in days + [(date.fromisoformat(days[-1]) + timedelta(days=1)).isoformat()]:  # one day too many
        start, end = day_window(date.fromisoformat(pk))
        frames.append(pl.concat([pl.from_arrow(t) for t in src.iter_blocks(start, end)]))
    pl.concat(frames).write_parquet(folder / "export.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(folder)})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, days[0], days[-1])
        assert result.success, failure_messages(result)
        outside = frames[-1].height
        for pk in days:
            source = json.loads(_manifest(job, pk).read_text())["source"]
            assert "rows_outside_window" not in source
            assert source["extraction_window"]["rows_outside_window"] == outside > 0
            raw = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", "raw_events"]),
                                                                        asset_partitions=[pk]), limit=1).records[0]
            md = raw.asset_materialization.metadata
            assert md["extraction_rows_outside_window"].value == outside
            assert md["source_facts"].value["window_from"].startswith(pk)
