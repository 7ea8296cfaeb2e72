"""A sync job on the Export API (emulator) through Dagster: same files as the demo, key never leaks."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_api import API_KEY, EVENTS_PER_DAY, SEED, make_api_job, read_manifest
from userpilot_sync_tests.fixtures_core import make_job, run_sync

pytestmark = pytest.mark.integration
PK = last_complete_days(1)[0].isoformat()


def test_export_api_job_through_dagster(tmp_path, emulator, api_key_env):
    job = make_api_job(tmp_path, emulator)
    defs = build_definitions([job], tmp_path / "staging")
    assert defs.resolve_assets_def(dg.AssetKey(["demo", "raw_events"])).op.pool == job.pool
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, PK)
        assert result.success, failure_messages(result)
        lookups = defs.resolve_job_def("demo_lookups_refresh").execute_in_process(instance=instance)
        assert lookups.success
        # the API key appears nowhere in the instance: event logs, metadata, run config and tags
        for run_id in (result.run_id, lookups.run_id):
            for entry in instance.all_logs(run_id):
                assert API_KEY not in json.dumps(dg.serialize_value(entry))
            run = instance.get_run_by_id(run_id)
            assert API_KEY not in json.dumps(run.run_config) and API_KEY not in json.dumps(run.tags)
        raw = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", "raw_events"]), asset_partitions=[PK]), limit=1
        ).records[0].asset_materialization.metadata
        # the day's own raw_events record: rows received and the extraction's source facts
        assert raw["userpilot/status"].value == "exported"
        assert raw["rows_received"].value == raw["dagster/row_count"].value == EVENTS_PER_DAY
        facts = raw["source_facts"].value
        assert facts["kind"] == "export_api" and facts["base_url"] == emulator.base_url
        assert facts["export_job_ids"] == [facts["export_job_id"]] and facts["export_job_id"]
        assert (facts["chunks"], facts["chunk_rows"], facts["retries_total"]) == (3, EVENTS_PER_DAY, 0)
        assert facts["window_from"] == f"{PK}T00:00:00+00:00"
        # the lookups record: files under <sync folder>/lookups/
        lookups_md = instance.fetch_materializations(dg.AssetKey(["demo", "lookups"]), limit=1).records[0]
        assert lookups_md.run_id == lookups.run_id
        lookup_files = lookups_md.asset_materialization.metadata["userpilot/files"].value
        assert lookup_files and all(f["path"].startswith("lookups/") and f["path"].endswith(".parquet")
                                    for f in lookup_files)
        assert lookups_md.asset_materialization.metadata["dagster/uri"].value.endswith(f"{job.sync_folder}/lookups")
    api_manifest = read_manifest(job, PK)
    assert API_KEY not in json.dumps(api_manifest)

    demo = make_job(tmp_path / "demo", source={"kind": "demo", "events_per_day": EVENTS_PER_DAY, "seed": SEED},
                    app_token=job.app_token)
    with dg.instance_for_test() as instance:
        demo_result = run_sync(build_definitions([demo], tmp_path / "staging-demo"), instance, PK)
        assert demo_result.success, failure_messages(demo_result)
    assert read_manifest(demo, PK)["files"] == api_manifest["files"]
