"""Backfill runs over a range of days: one extraction, per-day exports and manifests, bad days isolated."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import day_window, last_complete_days
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import make_job

DAYS = [d.isoformat() for d in last_complete_days(4)[:3]]


def _range_run(defs, instance, start, end):
    return defs.resolve_job_def("demo_sync").execute_in_process(
        instance=instance, raise_on_error=False,
        tags={"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end},
    )


def _manifest(job, pk) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk / "_manifest.json"


def test_range_run_exports_each_day_with_its_own_manifest(tmp_path):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 800, "seed": 5})
    defs = build_definitions([job], tmp_path / "staging")
    assert defs.resolve_assets_def(dg.AssetKey(["demo", "track"])).backfill_policy == dg.BackfillPolicy.multi_run(31)
    with dg.instance_for_test() as instance:
        result = _range_run(defs, instance, DAYS[0], DAYS[-1])
        assert result.success, failure_messages(result)
        # one materialization per day per asset, all in one run
        track = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(["demo", "track"])]
        assert sorted(e.partition for e in track) == DAYS
        for pk in DAYS:
            doc = json.loads(_manifest(job, pk).read_text())
            expected = DemoSource(job.app_token, 800, 5).expected_counts(__import__("datetime").date.fromisoformat(pk))
            assert doc["event_types"] == dict(sorted(expected.items(), key=lambda kv: kv[0])) or doc["event_types"] == {
                et: expected[et] for et in doc["event_types"]
            }
            assert all(f["path"].startswith(pk) for f in doc["files"])
            # one extraction covered the whole range; the manifest's window is the day's own
            assert doc["source"]["extraction_window"]["from"].startswith(DAYS[0])
            assert doc["source"]["window_from"].startswith(pk) and doc["window"]["from"].startswith(pk)
            assert doc["run_id"] == result.run_id


def test_bad_day_in_a_range_does_not_cost_the_good_days(tmp_path):
    folder = tmp_path / "chunks"
    folder.mkdir()
    src = DemoSource("NX-demo0001", 600, 5)
    for pk in DAYS:
        start, end = day_window(__import__("datetime").date.fromisoformat(pk))
        frame = pl.concat([pl.from_arrow(t) for t in src.iter_blocks(start, end)])
        if pk == DAYS[1]:  # a malformed interaction name on the middle day
            frame = frame.with_columns(
                pl.when(pl.col("event_type") == "interaction").then(pl.lit("broken")).otherwise(pl.col("event_name")).alias("event_name")
            )
        frame.write_parquet(folder / f"export-{pk}.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(folder)})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = _range_run(defs, instance, DAYS[0], DAYS[-1])
        assert not result.success
        text = "\n".join(failure_messages(result))
        assert DAYS[1] in text and "got no manifest" in text and "event_name" in text
        assert _manifest(job, DAYS[0]).exists() and _manifest(job, DAYS[2]).exists()
        # the good days keep their manifest records in the instance; the check names the bad day
        recorded = {
            r.partition_key
            for r in instance.fetch_materializations(dg.AssetKey(["demo", "manifest"]), limit=10).records
        }
        assert recorded == set(DAYS)  # Dagster records every day of a ranged output ...
        manifest_mat = instance.fetch_materializations(dg.AssetKey(["demo", "manifest"]), limit=1).records[0]
        assert set(manifest_mat.asset_materialization.metadata["userpilot/files"].value) == {DAYS[0], DAYS[2]}
        check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "all_days_exported")
        assert not check.passed and set(check.metadata["failed"].value) == {DAYS[1]}
        assert not _manifest(job, DAYS[1]).exists()
        good = json.loads(_manifest(job, DAYS[2]).read_text())
        assert good["event_types"]["interaction"] > 0


def test_connection_check_job_writes_a_marker(tmp_path):
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_check_destination").execute_in_process(instance=instance)
        assert result.success
    marker = Path(job.destination.path) / "userpilot_events" / job.sync_folder / "_userpilot_sync_check" / "demo.json"
    assert json.loads(marker.read_text())["sync_job"] == "demo"
