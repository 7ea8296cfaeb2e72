"""The Dagster definitions: load, asset metadata, schedules, in-process runs, guards."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from userpilot_sync.config.loader import load_sync_jobs
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import last_complete_days
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import make_job

REPO = Path(__file__).resolve().parents[1]
PK = last_complete_days(1)[0].isoformat()  # yesterday (UTC): always inside the window


def test_shipped_definitions_load():
    from userpilot_sync.definitions import defs

    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    keys = {k.to_user_string() for k in loaded.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"demo/raw_events", "demo/manifest", "demo/definitions", *(f"demo/{et}" for et in EVENT_TYPES)}


def test_assets_carry_kinds_owners_descriptions_and_lineage(tmp_path):
    defs = build_definitions([make_job(tmp_path, owners=["team:data"])], tmp_path / "staging")
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        spec = graph.get(key)
        assert spec.group_name == "demo"
        assert spec.kinds, key
        assert spec.owners == ["team:data"], key
        assert spec.description and "\n" not in spec.description, key
        if key.path[-1] == "definitions":  # lookups are current state, not per day
            assert spec.partitions_def is None
            continue
        assert isinstance(spec.partitions_def, dg.DailyPartitionsDefinition)
        assert spec.partitions_def.timezone == "UTC"
    manifest = graph.get(dg.AssetKey(["demo", "manifest"]))
    assert manifest.parent_keys == {dg.AssetKey(["demo", et]) for et in EVENT_TYPES}
    for et in EVENT_TYPES:
        assert graph.get(dg.AssetKey(["demo", et])).parent_keys == {dg.AssetKey(["demo", "raw_events"])}
    raw = defs.resolve_assets_def(dg.AssetKey(["demo", "raw_events"]))
    assert raw.op.pool == "userpilot_export_NX_demo0001"


def test_daily_schedule_targets_yesterday_and_demo_is_stopped(tmp_path):
    shipped = load_sync_jobs(REPO / "sync_jobs")
    defs = build_definitions(shipped, tmp_path / "staging")
    schedule = defs.resolve_schedule_def("demo_daily_sync")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    tick = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=tick, repository_def=defs.get_repository_def()
    ) as ctx:
        data = schedule.evaluate_tick(ctx)
    assert [r.partition_key for r in data.run_requests] == ["2026-03-09"]
    assert data.run_requests[0].tags["userpilot_sync/partition_lock"] == "demo.2026-03-09"


def _run(defs, instance, pk=PK):
    return defs.resolve_job_def("demo_sync").execute_in_process(partition_key=pk, instance=instance, raise_on_error=False)


def _failure_text(result) -> str:
    from userpilot_sync.cli import failure_messages

    return "\n".join(failure_messages(result))


def test_materialize_partition_records_metadata_and_manifest(tmp_path):
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = _run(defs, instance)
        assert result.success, _failure_text(result)
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        assert set(mats) == {"demo/raw_events", "demo/manifest", *(f"demo/{et}" for et in EVENT_TYPES)}
        track = mats["demo/track"].materialization.metadata
        assert track["dagster/row_count"].value > 0
        assert track["dagster/uri"].value.endswith(f"/{PK}/track.parquet")
        assert track["bytes"].value > 0
        cols = [c.name for c in track["dagster/column_schema"].schema.columns]
        assert cols[:3] == ["app_token", "event_type", "event_name"]
        manifest_path = Path(job.destination.path) / "userpilot_events" / job.sync_folder / PK / "_manifest.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["run_id"] == result.run_id
        assert manifest["event_types"]["track"] == track["dagster/row_count"].value
        assert sum(manifest["event_types"].values()) == 3000
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["known_values"].passed and checks["not_unexpectedly_empty"].passed
        # staging of the partition is removed once its manifest is written
        assert not (tmp_path / "staging" / "demo" / PK).exists()


def test_changed_destination_fails_before_writing(tmp_path):
    with dg.instance_for_test() as instance:
        assert _run(build_definitions([make_job(tmp_path)], tmp_path / "staging"), instance).success
        moved = make_job(tmp_path, destination={"kind": "local", "path": str(tmp_path / "elsewhere"), "prefix": "x"})
        result = _run(build_definitions([moved], tmp_path / "staging"), instance)
        assert not result.success
        assert "destination changed since the first export" in _failure_text(result)
        assert "create a new sync job" in _failure_text(result)
        assert not (tmp_path / "elsewhere").exists()


def test_disabled_sync_job_refuses_runs_and_keeps_files(tmp_path):
    with dg.instance_for_test() as instance:
        assert _run(build_definitions([make_job(tmp_path)], tmp_path / "staging"), instance).success
        exported = sorted(p for p in (tmp_path / "exports").rglob("*") if p.is_file())
        before = {p: p.read_bytes() for p in exported}
        disabled = make_job(tmp_path, enabled=False)
        defs = build_definitions([disabled], tmp_path / "staging")
        assert defs.resolve_schedule_def("demo_daily_sync").default_status == dg.DefaultScheduleStatus.STOPPED
        result = _run(defs, instance)
        assert not result.success and "is disabled" in _failure_text(result)
        assert {p: p.read_bytes() for p in exported} == before


def test_window_refusal_in_a_run(tmp_path):
    with dg.instance_for_test() as instance:
        result = _run(build_definitions([make_job(tmp_path)], tmp_path / "staging"), instance, pk="2025-01-02")
        assert not result.success and "older than the 365-day window" in _failure_text(result)
        assert not (tmp_path / "exports").exists()


def test_manifest_follows_a_subset_materialization(tmp_path):
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert _run(defs, instance).success
        # baseline tick: nothing changed since the full run was handled
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0
        subset = defs.resolve_job_def("demo_sync").execute_in_process(
            partition_key=PK, instance=instance, raise_on_error=False,
            asset_selection=[dg.AssetKey(["demo", "raw_events"]), dg.AssetKey(["demo", "track"])],
        )
        assert subset.success, _failure_text(subset)
        evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert evaluation.get_requested_partitions(dg.AssetKey(["demo", "manifest"])) == {PK}
        assert evaluation.total_requested == 1


def test_definitions_asset_writes_demo_lookups(tmp_path):
    import pyarrow.parquet as pq

    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_definitions_refresh").execute_in_process(instance=instance)
        assert result.success
    folder = Path(job.destination.path) / "userpilot_events" / job.sync_folder / "definitions"
    flows = pq.read_table(folder / "flows.parquet").to_pylist()
    assert {f["id"] for f in flows} == {"448", "449", "450"}
    features = pq.read_table(folder / "features_events.parquet").to_pylist()
    assert {"1201", "1206"} <= {f["id"] for f in features}


def test_empty_day_after_a_non_empty_one_is_a_warning(tmp_path):
    import polars as pl

    from userpilot_sync.partitions import day_window
    from userpilot_sync.source.demo import DemoSource

    first, second = last_complete_days(2)
    folder = tmp_path / "chunks"
    folder.mkdir()
    start, end = day_window(first)
    pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 300, 1).iter_blocks(start, end)]).write_parquet(
        folder / "export-part1.parquet"
    )
    job = make_job(tmp_path, source={"kind": "files", "path": str(folder)})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert _run(defs, instance, pk=first.isoformat()).success
        result = _run(defs, instance, pk=second.isoformat())
        assert result.success  # an empty day is exported, not an error ...
        check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "not_unexpectedly_empty")
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN  # ... but it is reported
        assert check.metadata["empty_days_after_non_empty"].value == {second.isoformat(): 300}
    manifest = json.loads(
        (Path(job.destination.path) / "userpilot_events" / job.sync_folder / second.isoformat() / "_manifest.json").read_text()
    )
    assert manifest["source"]["source_rows"] == 0 and len(manifest["files"]) == 7
    assert all(f["rows"] == 0 for f in manifest["files"])


def test_dg_check_defs_passes():
    import subprocess
    import sys

    dg_cli = Path(sys.executable).parent / "dg"
    out = subprocess.run([str(dg_cli), "check", "defs"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr
