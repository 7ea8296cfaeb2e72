"""The Dagster definitions: load, asset metadata, schedules, in-process runs, guards."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync.config.loader import load_sync_jobs
from userpilot_sync.config.model import DEFAULT_USERPILOT_FILES
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import sync_window_partitions
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days, utc_today
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import make_job, run_sync

REPO = Path(__file__).resolve().parents[1]
PK = last_complete_days(1)[0].isoformat()  # yesterday (UTC): always inside the window
DOCUMENTED_KEYS = {f"demo/{name}" for name in DEFAULT_USERPILOT_FILES}
DAY_KEYS = {"demo/raw_events", "demo/manifest", *(f"demo/{et}" for et in EVENT_TYPES), *DOCUMENTED_KEYS}


def test_shipped_definitions_load():
    from userpilot_sync.definitions import defs

    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    keys = {k.to_user_string() for k in loaded.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {*DAY_KEYS, "demo/lookups"}
    for name in ("demo_sync", "demo_lookups_refresh", "demo_check_destination"):
        assert loaded.resolve_job_def(name).name == name
    for old in ("demo_definitions_refresh",):
        with pytest.raises(Exception):
            loaded.resolve_job_def(old)
    assert loaded.resolve_sensor_def("userpilot_partition_window").minimum_interval_seconds == 300


def test_assets_carry_kinds_owners_descriptions_and_lineage(tmp_path):
    job = make_job(tmp_path, owners=["team:data"])
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        spec = graph.get(key)
        assert spec.kinds, key
        assert spec.owners == ["team:data"], key
        assert spec.description and "\n" not in spec.description, key
        if key == keys.lookups:  # lookups are current state, not per day, in their own group
            assert spec.group_name == "demo_lookups"
            assert spec.partitions_def is None
            continue
        assert spec.group_name == "demo", key
        assert isinstance(spec.partitions_def, dg.DynamicPartitionsDefinition), key
        assert spec.partitions_def.name == "userpilot_days_demo"
    manifest = graph.get(keys.manifest)
    assert manifest.parent_keys == {dg.AssetKey(["demo", et]) for et in EVENT_TYPES} | set(keys.documented_files.values())
    for et in EVENT_TYPES:
        assert graph.get(dg.AssetKey(["demo", et])).parent_keys == {keys.raw_events}
    # lineage of Userpilot's documented files: what each is computed from
    assert graph.get(keys.documented("all_users")).parent_keys == {keys.raw_events, keys.export("identify_user")}
    assert graph.get(keys.documented("all_companies")).parent_keys == {keys.raw_events, keys.export("identify_company")}
    assert graph.get(keys.documented("feature_tags_breakdown")).parent_keys == {keys.export("track_feature")}
    assert graph.get(keys.documented("feature_tags_definitions")).parent_keys == set()
    # a day is one unit: one multi-asset, not subsettable, holding every day asset and check
    day = defs.resolve_assets_def(keys.raw_events)
    assert day.op.name == "demo_day"
    assert day.keys == set(keys.day_assets)
    assert day.can_subset is False
    assert day.op.pool == "userpilot_export_NX_demo0001"
    assert day.backfill_policy == dg.BackfillPolicy.multi_run(job.backfill_days_per_run)
    assert day.check_keys == {
        dg.AssetCheckKey(keys.raw_events, "not_unexpectedly_empty"),
        dg.AssetCheckKey(keys.manifest, "day_exported"),
        *(dg.AssetCheckKey(k, "known_values") for k in keys.exports.values()),
        *(dg.AssetCheckKey(k, "expected_volume") for k in keys.exports.values()),
        dg.AssetCheckKey(keys.documented("all_users"), "snapshot_current"),
        dg.AssetCheckKey(keys.documented("all_companies"), "snapshot_current"),
    }


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
        # the tick made sure the day exists as a partition before requesting it
        partitions = instance.get_dynamic_partitions("userpilot_days_demo")
        assert partitions[-1] == "2026-03-09" and partitions[0] == "2025-03-10"
    assert [r.partition_key for r in data.run_requests] == ["2026-03-09"]
    tags = data.run_requests[0].tags
    assert tags["userpilot_sync/sync_job"] == "demo" and tags["userpilot_sync/trigger"] == "daily"
    assert "userpilot_sync/partition_lock" not in tags  # the export step takes the per-day lock itself


def _run(defs, instance, pk=PK, **kwargs):
    return run_sync(defs, instance, pk, **kwargs)


def _failure_text(result) -> str:
    from userpilot_sync.cli import failure_messages

    return "\n".join(failure_messages(result))


def _folder(job, pk=PK) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def test_materialize_partition_records_metadata_and_manifest(tmp_path):
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = _run(defs, instance)
        assert result.success, _failure_text(result)
        events = result.get_asset_materialization_events()
        assert all(e.partition == PK for e in events)
        mats = {m.asset_key.to_user_string(): m.materialization for m in events}
        assert set(mats) == DAY_KEYS
        track = mats["demo/track"].metadata
        assert track["dagster/row_count"].value > 0
        assert track["dagster/uri"].value.endswith(f"/{PK}/track.parquet")
        assert track["bytes"].value > 0 and track["files"].value == 1
        assert track["userpilot/status"].value == "exported"
        assert [f["uri"] for f in track["userpilot/files"].value] == [track["dagster/uri"].value]
        cols = [c.name for c in track["dagster/column_schema"].schema.columns]
        assert cols[:3] == ["app_token", "event_type", "event_name"]
        manifest_path = _folder(job) / "_manifest.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["run_id"] == result.run_id
        assert rows_by_event_type(manifest)["track"] == track["dagster/row_count"].value
        assert sum(rows_by_event_type(manifest).values()) == 3000
        assert track["bytes"].value == next(f["bytes"] for f in manifest["files"] if f["event_type"] == "track")
        manifest_md = mats["demo/manifest"].metadata
        assert manifest_md["dagster/uri"].value == manifest_path.as_uri()
        assert manifest_md["dagster/row_count"].value == 3000 and manifest_md["files"].value == 7 + len(DOCUMENTED_KEYS)
        users = mats["demo/all_users"].metadata  # a documented file's own record of the day
        assert users["dagster/row_count"].value == manifest["userpilot_files"]["all_users"]["rows"] > 0
        assert users["userpilot/status"].value == "exported" and users["history_start"].value == PK
        raw = mats["demo/raw_events"].metadata
        assert raw["rows_received"].value == raw["dagster/row_count"].value == 3000
        # one evaluation per check and asset, each for the day
        evaluations = result.get_asset_check_evaluations()
        assert all(c.partition == PK for c in evaluations)
        by_check = {}
        for c in evaluations:
            by_check.setdefault(c.check_name, []).append(c)
        assert sorted(c.asset_key.path[-1] for c in by_check["known_values"]) == sorted(EVENT_TYPES)
        assert all(c.passed for c in by_check["known_values"])
        [empty] = by_check["not_unexpectedly_empty"]
        assert empty.passed and empty.metadata["rows_received"].value == 3000
        [exported] = by_check["day_exported"]
        assert exported.passed and exported.metadata["rows"].value == 3000 and exported.metadata["files"].value == 7 + len(DOCUMENTED_KEYS)
        # staging of the partition is removed once its manifest is written
        assert not (tmp_path / "staging" / "demo" / PK).exists()


def test_changed_destination_fails_before_writing(tmp_path):
    with dg.instance_for_test() as instance:
        assert _run(build_definitions([make_job(tmp_path)], tmp_path / "staging"), instance).success
        moved = make_job(tmp_path, destination={"kind": "local", "path": str(tmp_path / "elsewhere"), "prefix": "x"})
        result = _run(build_definitions([moved], tmp_path / "staging"), instance)
        assert not result.success
        text = _failure_text(result)
        # one line naming the sync job and the partition first, no step-key prefix
        assert text.startswith(f"sync job 'demo', partition {PK}: the destination changed since the first export")
        assert "create a new sync job" in text
        assert not (tmp_path / "elsewhere").exists()
        assert result.get_asset_materialization_events() == []


def test_disabled_sync_job_refuses_runs_and_keeps_files(tmp_path):
    with dg.instance_for_test() as instance:
        assert _run(build_definitions([make_job(tmp_path)], tmp_path / "staging"), instance).success
        exported = sorted(p for p in (tmp_path / "exports").rglob("*") if p.is_file())
        before = {p: p.read_bytes() for p in exported}
        disabled = make_job(tmp_path, enabled=False)
        defs = build_definitions([disabled], tmp_path / "staging")
        assert defs.resolve_schedule_def("demo_daily_sync").default_status == dg.DefaultScheduleStatus.STOPPED
        result = _run(defs, instance)
        assert not result.success
        text = _failure_text(result)
        assert text.startswith(f"sync job 'demo', partition {PK}: the sync job is disabled")
        assert {p: p.read_bytes() for p in exported} == before
        assert result.get_asset_materialization_events() == []


def test_window_refusal_in_a_run(tmp_path):
    """A day outside the window that is still a partition (the window rolled after the run was
    requested) is refused by the step; days that are not partitions cannot be requested at all."""
    job = make_job(tmp_path)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    today = utc_today().isoformat()
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.DagsterUnknownPartitionError):
            run_sync(defs, instance, "2025-01-02")  # run_sync rolled the window: not a partition
        assert "2025-01-02" not in instance.get_dynamic_partitions(keys.partitions_name)
        instance.add_dynamic_partitions(keys.partitions_name, ["2025-01-02", today])
        job_def = defs.resolve_job_def("demo_sync")
        result = job_def.execute_in_process(partition_key="2025-01-02", instance=instance, raise_on_error=False)
        assert not result.success
        assert _failure_text(result).startswith("sync job 'demo', partition 2025-01-02: older than the 365-day window")
        result = job_def.execute_in_process(partition_key=today, instance=instance, raise_on_error=False)
        assert not result.success
        assert _failure_text(result).startswith(f"sync job 'demo', partition {today}: the UTC day has not ended yet")
        assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("selection", [["demo/track"], ["demo/raw_events", "demo/track"],
                                       sorted(DAY_KEYS - {"demo/manifest"})])
def test_a_subset_of_a_day_is_refused_before_a_run(tmp_path, selection):
    """A day is one unit: whatever part of it is selected, Dagster refuses before a run exists."""
    job = make_job(tmp_path)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    selected = [dg.AssetKey.from_user_string(s) for s in selection]
    with dg.instance_for_test() as instance:
        sync_window_partitions(instance, keys)
        with pytest.raises(dg.DagsterInvalidSubsetError):
            defs.resolve_job_def("demo_sync").execute_in_process(
                partition_key=PK, instance=instance, raise_on_error=False, asset_selection=selected)
        with pytest.raises(dg.DagsterInvalidDefinitionError) as raised:
            dg.materialize([defs.resolve_assets_def(keys.raw_events)], selection=selected, partition_key=PK,
                           instance=instance, raise_on_error=False)
        assert isinstance(raised.value.__cause__, dg.DagsterInvalidSubsetError)
        partial = dg.Definitions.merge(defs, dg.Definitions(jobs=[dg.define_asset_job("part_of_a_day", selection=selected)]))
        with pytest.raises(dg.DagsterInvalidDefinitionError) as raised:
            partial.resolve_job_def("part_of_a_day")
        assert isinstance(raised.value.__cause__, dg.DagsterInvalidSubsetError)
        assert instance.get_runs() == []
    assert not (tmp_path / "exports").exists()


def test_lookups_asset_writes_demo_lookups(tmp_path):
    import pyarrow.parquet as pq

    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_lookups_refresh").execute_in_process(instance=instance)
        assert result.success
        [mat] = result.get_asset_materialization_events()
        assert mat.asset_key == dg.AssetKey(["demo", "lookups"])
        metadata = mat.materialization.metadata
    folder = Path(job.destination.path) / "userpilot_events" / job.sync_folder / "lookups"
    assert not (folder.parent / "definitions").exists()
    flows = pq.read_table(folder / "flows.parquet").to_pylist()
    assert {f["id"] for f in flows} == {"448", "449", "450"}
    features = pq.read_table(folder / "features_events.parquet").to_pylist()
    assert {"1201", "1206"} <= {f["id"] for f in features}
    written = sorted(p for p in folder.glob("*.parquet"))
    assert metadata["files"].value == len(written) and metadata["dagster/uri"].value == folder.as_uri()
    assert metadata["dagster/row_count"].value == sum(pq.read_metadata(p).num_rows for p in written)
    assert metadata["bytes"].value == sum(p.stat().st_size for p in written)


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
        first_run = _run(defs, instance, pk=first.isoformat())
        assert first_run.success
        check = next(c for c in first_run.get_asset_check_evaluations() if c.check_name == "not_unexpectedly_empty")
        assert check.passed and check.metadata["rows_received"].value == 300
        result = _run(defs, instance, pk=second.isoformat())
        assert result.success  # an empty day is exported, not an error ...
        check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "not_unexpectedly_empty")
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN  # ... but it is reported
        assert check.partition == second.isoformat()
        assert check.metadata["rows_received"].value == 0 and check.metadata["previous_day_rows"].value == 300
    manifest = json.loads((_folder(job, second.isoformat()) / "_manifest.json").read_text())
    events = [f for f in manifest["files"] if "file" not in f]
    # an empty export has no file; the manifest accounts for each event type (0 rows, empty)
    assert manifest["source"]["source_rows"] == 0 and events == []
    assert len(manifest["event_types"]) == 7
    assert all(e["rows"] == 0 and e["status"] == "empty" for e in manifest["event_types"].values())
    assert not any((_folder(job, second.isoformat()) / f"{et}.parquet").exists() for et in manifest["event_types"])
    # the day's snapshots still list everyone identified the day before
    assert manifest["userpilot_files"]["all_users"]["rows"] > 0


def test_dg_check_defs_passes():
    import subprocess
    import sys

    dg_cli = Path(sys.executable).parent / "dg"
    out = subprocess.run([str(dg_cli), "check", "defs"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr
