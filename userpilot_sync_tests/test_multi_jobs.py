"""Several sync jobs side by side; re-exports in place; editable settings and superseded files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.schema.events import EVENT_TYPES

#: Userpilot's documented files every sync job writes by default (userpilot_files).
DOCUMENTED = ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions")
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job, run_sync

PK = last_complete_days(1)[0].isoformat()  # yesterday (UTC): inside the window of a real run
APP = "NX-shared01"


def _job(tmp_path: Path, name: str, sync_id: str, prefix: str, **overrides):
    """A sync job of app APP writing into the shared folder ``tmp_path/lake`` under ``prefix``."""
    data = dict(
        name=name,
        sync_id=sync_id,
        app_token=APP,
        source={"kind": "demo", "events_per_day": 700, "seed": 5},
        destination={"kind": "local", "path": str(tmp_path / "lake"), "prefix": prefix},
    )
    data.update(overrides)
    return make_job(tmp_path, **data)


def _sync_root(job) -> Path:
    return Path(job.destination.path) / job.destination.prefix / job.sync_folder


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(defs: dg.Definitions, instance, job_name: str, pk: str = PK, tags: dict | None = None):
    result = run_sync(defs, instance, pk, job_name=f"{job_name}_sync", tags=tags or {})
    if not result.success:
        from userpilot_sync.cli import failure_messages

        raise AssertionError("\n".join(failure_messages(result)))
    return result


def _manifest(job, pk: str = PK) -> dict:
    return json.loads((_sync_root(job) / pk / "_manifest.json").read_text())


# ------------------------------------------------------------------------------ side by side
def test_two_sync_jobs_load_side_by_side(tmp_path):
    a = _job(tmp_path, "acme_prod", "13214", "team_a", sync_back={"weekday": "sunday", "hour": 4, "days": 30})
    b = _job(tmp_path, "acme_eu", "13215", "team_b", frequency="weekly", filters={"event_types": ["track", "page_view"]})
    defs = build_definitions([a, b], tmp_path / "staging")
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for job in (a, b):
        own = {k for k in keys if k.startswith(f"{job.name}/")}
        day = {f"{job.name}/raw_events", f"{job.name}/manifest", *(f"{job.name}/{et}" for et in job.event_types),
               *(f"{job.name}/{name}" for name in DOCUMENTED)}
        assert own == day | {f"{job.name}/lookups"}
        # a day's assets are one group (and one step); the lookups have their own group
        for key in day:
            assert graph.get(dg.AssetKey.from_user_string(key)).group_name == job.name
        assert graph.get(dg.AssetKey([job.name, "lookups"])).group_name == f"{job.name}_lookups"
        assert {k.to_user_string() for k in defs.resolve_assets_def(dg.AssetKey([job.name, "manifest"])).keys} == day
        # each sync job has its own partitions (UTC days) and its own jobs
        partitions = defs.resolve_job_def(f"{job.name}_sync").partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition)
        assert partitions.name == f"userpilot_days_{job.name}"
        for name in (f"{job.name}_sync", f"{job.name}_lookups_refresh", f"{job.name}_check_destination"):
            defs.resolve_job_def(name)
    assert "acme_eu/interaction" not in keys  # filtered-out event types have no asset
    sensors = [s.name for s in defs.sensors]
    assert sensors.count("userpilot_partition_window") == 1  # one for every sync job
    assert not [n for n in sensors if n.endswith("_initial_backfill")]  # backfill_days: 0
    assert {s.name for s in defs.schedules} >= {"acme_prod_daily_sync", "acme_prod_sync_back", "acme_eu_weekly_sync"}
    assert "acme_eu_daily_sync" not in {s.name for s in defs.schedules}
    # one export job per app token at a time: both raw_events assets share the app token's pool
    pools = {defs.resolve_assets_def(dg.AssetKey([j.name, "raw_events"])).op.pool for j in (a, b)}
    assert pools == {"userpilot_export_NX_shared01"}
    # each sync job has its own destination IO manager; the sync folders differ by prefix and sync_id
    resources = defs.resources or {}
    for name in ("acme_prod", "acme_eu"):
        assert {f"userpilot_destination_{name}", f"userpilot_source_{name}", f"userpilot_export_io_manager_{name}",
                f"userpilot_manifest_io_manager_{name}", f"userpilot_lookups_io_manager_{name}"} <= set(resources)
    assert _sync_root(a) != _sync_root(b) and _sync_root(a).parent.parent == _sync_root(b).parent.parent


def test_two_sync_jobs_in_one_folder_do_not_interfere_and_sync_back_replaces_in_place(tmp_path):
    a = _job(tmp_path, "acme_prod", "13214", "team_a", keep_staging_days=1,
             sync_back={"weekday": "sunday", "hour": 4, "days": 30})
    b = _job(tmp_path, "acme_eu", "13215", "team_b", keep_staging_days=1,
             formats=[{"format": "ndjson", "compression": "gzip"}], layout="hive")
    defs = build_definitions([a, b], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        first_a = _run(defs, instance, "acme_prod", tags={"userpilot_sync/trigger": "daily"})
        before_a = _snapshot(_sync_root(a))
        manifest_a_before = _manifest(a)
        run_b = _run(defs, instance, "acme_eu")
        assert _snapshot(_sync_root(a)) == before_a  # b's export left a's files untouched
        before_b = _snapshot(_sync_root(b))
        # each sync job's per-day records point at its own files only
        for job, name in ((a, "acme_prod"), (b, "acme_eu")):
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey([name, "manifest"]), asset_partitions=[PK]), limit=1
            ).records[0]
            md = record.asset_materialization.metadata
            assert md["userpilot/status"].value == "exported"
            assert md["dagster/uri"].value.startswith(_sync_root(job).as_uri()), md["dagster/uri"].value
            assert md["manifest"].value["run_id"] == record.run_id and md["manifest"].value["sync_job"] == name
            assert [f["path"] for f in md["userpilot/files"].value] == [f["path"] for f in md["manifest"].value["files"]]
            assert all(f["uri"].startswith(_sync_root(job).as_uri()) for f in md["userpilot/files"].value)
        # a sync back of the same day re-exports a in place, and leaves b untouched
        again_a = _run(defs, instance, "acme_prod", tags={"userpilot_sync/trigger": "sync_back"})
        assert instance.get_run_by_id(again_a.run_id).tags["userpilot_sync/trigger"] == "sync_back"
    assert _snapshot(_sync_root(b)) == before_b
    lake = tmp_path / "lake"
    assert sorted(p.name for p in lake.iterdir()) == ["team_a", "team_b"]
    manifest_a = _manifest(a)
    manifest_b = json.loads((_sync_root(b) / "_manifests" / f"date={PK}" / "_manifest.json").read_text())
    assert manifest_a["sync_job"] == "acme_prod" and manifest_b["sync_job"] == "acme_eu"
    assert manifest_b["run_id"] == run_b.run_id
    # each manifest lists exactly its own files (paths relative to its own sync folder)
    assert {f["path"] for f in manifest_a["files"]} == {f"{PK}/{n}.parquet" for n in (*EVENT_TYPES, *DOCUMENTED)}
    assert {f["path"] for f in manifest_b["files"]} == {f"ndjson.gz/{n}/date={PK}/part-00000.ndjson.gz"
                                                        for n in (*EVENT_TYPES, *DOCUMENTED)}
    # each sync job keeps its own snapshot state (same app, separate stores)
    assert {p.name for p in (tmp_path / "staging" / "_state").iterdir()} == {"acme_prod", "acme_eu"}
    assert set(_snapshot(_sync_root(a))) == {f["path"] for f in manifest_a["files"]} | {f"{PK}/_manifest.json"}
    assert set(_snapshot(_sync_root(b))) == {f["path"] for f in manifest_b["files"]} | {f"_manifests/date={PK}/_manifest.json"}
    # same generator, same app: both exported the same rows, each into its own files
    assert rows_by_event_type(manifest_a) == rows_by_event_type(manifest_b)
    # separate staging folders (kept for keep_staging_days)
    assert (tmp_path / "staging" / "acme_prod" / PK).is_dir() and (tmp_path / "staging" / "acme_eu" / PK).is_dir()
    # the sync back replaced a's day in place: same keys, byte-identical data files, a new manifest
    after_a = _snapshot(_sync_root(a))
    assert set(after_a) == set(before_a)
    data = [p for p in before_a if not p.endswith("_manifest.json")]
    assert len(data) == len(EVENT_TYPES) + len(DOCUMENTED)
    assert {p: after_a[p] for p in data} == {p: before_a[p] for p in data}
    assert (manifest_a_before["run_id"], manifest_a["run_id"]) == (first_a.run_id, again_a.run_id)
    assert manifest_a["files"] == manifest_a_before["files"]
    assert manifest_a["superseded"] == []


def test_core_exports_of_two_sync_jobs_are_independent(tmp_path, staging_root):
    a = _job(tmp_path, "acme_prod", "13214", "same_prefix")
    b = _job(tmp_path, "acme_eu", "13215", "same_prefix")  # one prefix: sync folders still differ by sync_id
    sync_partition(a, PARTITION, staging_root, now=NOW, run_id="a1")
    before = _snapshot(_sync_root(a))
    result_b = sync_partition(b, PARTITION, staging_root, now=NOW, run_id="b1")
    assert _snapshot(_sync_root(a)) == before
    assert sorted(p.name for p in (tmp_path / "lake" / "same_prefix").iterdir()) == [
        "userpilot_datasync_13214_NX-shared01", "userpilot_datasync_13215_NX-shared01"]
    assert all(not f["path"].startswith("..") for f in result_b.manifest["files"])
    assert {f["path"] for f in result_b.manifest["files"]} == {f"{PARTITION}/{n}.parquet"
                                                               for n in (*EVENT_TYPES, *DOCUMENTED)}


# ------------------------------------------------------------------------------ editable settings
def test_changed_formats_and_fewer_parts_are_superseded_not_deleted(tmp_path):
    staging = tmp_path / "staging"
    first_job = _job(tmp_path, "acme_prod", "13214", "team_a", max_file_rows=100,
                     formats=[{"format": "parquet"}, {"format": "csv", "compression": "gzip"}])
    second_job = _job(tmp_path, "acme_prod", "13214", "team_a", formats=[{"format": "parquet", "compression": "snappy"}])
    with dg.instance_for_test() as instance:
        _run(build_definitions([first_job], staging), instance, "acme_prod")
        first = _manifest(first_job)
        old_files = {f["path"] for f in first["files"]}
        assert any(p.endswith("_00002.parquet") for p in old_files)  # some export had 3+ parts
        assert any(p.endswith(".csv.gz") for p in old_files)
        assert first["settings"]["formats"] == ["parquet/zstd", "csv/gzip"]
        assert first["settings"]["max_file_rows"] == 100
        on_disk_before = _snapshot(_sync_root(first_job))

        second_run = _run(build_definitions([second_job], staging), instance, "acme_prod")
        # the day's own manifest record carries the superseded (and, locally, never deleted) paths
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["acme_prod", "manifest"]), asset_partitions=[PK]), limit=1
        ).records[0]
        assert record.run_id == second_run.run_id
        md = record.asset_materialization.metadata
        superseded_record, deleted_record = md["userpilot/superseded"].value, md["userpilot/deleted"].value
    second = _manifest(second_job)
    assert superseded_record == second["superseded"] and deleted_record == []
    assert second["settings"]["formats"] == ["parquet/snappy"]
    assert second["settings"]["max_file_rows"] is None
    new_files = {f["path"] for f in second["files"]}
    assert new_files == {f"{PK}/{n}.parquet" for n in (*EVENT_TYPES, *DOCUMENTED)}
    assert {f["compression"] for f in second["files"]} == {"snappy"}
    # every file of the first export that the second no longer produces is named as superseded
    assert second["superseded"] == sorted(old_files - new_files)
    assert second["deleted"] == []
    # a local destination never deletes: the superseded files are still there, unchanged
    on_disk_after = _snapshot(_sync_root(second_job))
    for path in old_files - new_files:
        assert on_disk_after[path] == on_disk_before[path], path
    # the rows did not change with the settings
    assert rows_by_event_type(second) == rows_by_event_type(first)
