"""Every day a first-class record: per-day metadata and checks in range runs, a day as one unit."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import sync_window_partitions
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import day_window, last_complete_days, window_partition_keys
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import cli_env, make_job, run_sync

DAYS = [d.isoformat() for d in last_complete_days(5)]
REPO = Path(__file__).resolve().parents[1]


def _manifest(job, pk) -> dict:
    return json.loads((Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk / "_manifest.json").read_text())


def _latest(instance, key: dg.AssetKey, pk: str):
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]), limit=1).records[0]


def _check_history(instance, key: dg.AssetKey, name: str) -> list:
    records = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, name), limit=100)
    return [r.event.dagster_event.event_specific_data for r in records if r.event is not None]


def test_range_run_records_each_days_own_figures_and_checks(tmp_path):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 900, "seed": 3}, backfill_days_per_run=5)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    days = DAYS[1:4]
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, days[0], days[-1])
        assert result.success, failure_messages(result)
        assert len(instance.get_runs()) == 1
        for pk in days:
            doc = _manifest(job, pk)
            expected = DemoSource(job.app_token, 900, 3).expected_counts(date.fromisoformat(pk))
            for et, key in keys.exports.items():
                md = _latest(instance, key, pk).asset_materialization.metadata
                assert md["dagster/row_count"].value == rows_by_event_type(doc)[et] == expected[et]
                files = [f for f in doc["files"] if f["event_type"] == et]
                assert md["bytes"].value == sum(f["bytes"] for f in files)
                assert md["files"].value == len(files)
                assert md["dagster/uri"].value.endswith(f"/{pk}/{et}.parquet")
                assert [f["sha256"] for f in md["userpilot/files"].value] == [f["sha256"] for f in files]
                assert md["userpilot/status"].value == "exported"
            manifest_md = _latest(instance, keys.manifest, pk).asset_materialization.metadata
            assert manifest_md["dagster/row_count"].value == sum(rows_by_event_type(doc).values()) == 900
            assert manifest_md["dagster/uri"].value.endswith(f"/{pk}/_manifest.json")
            raw_md = _latest(instance, keys.raw_events, pk).asset_materialization.metadata
            assert raw_md["rows_received"].value == raw_md["dagster/row_count"].value == 900
        # one evaluation per check and day, each with its partition, counts as numbers
        for key, name in [(keys.manifest, "day_exported"), (keys.raw_events, "not_unexpectedly_empty"),
                          *[(k, "known_values") for k in keys.exports.values()]]:
            evaluations = _check_history(instance, key, name)
            assert sorted(e.partition for e in evaluations) == days, (key, name)
        exported = {e.partition: e for e in _check_history(instance, keys.manifest, "day_exported")}
        assert all(e.passed and e.metadata["rows"].value == 900 for e in exported.values())


def _chunks_with_unknown_source(folder: Path, days: list[str], odd_day: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for pk in days:
        start, end = day_window(date.fromisoformat(pk))
        frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 400, 5).iter_blocks(start, end)])
        if pk == odd_day:  # a source the Event Schema does not list: a WARN, not a failure
            frame = frame.with_columns(
                pl.when(pl.col("event_type") == "track").then(pl.lit("backend-zapier")).otherwise(pl.col("source")).alias("source"))
        frame.write_parquet(folder / f"export-{pk}.parquet")


def test_a_warning_stays_with_its_day_when_an_earlier_day_runs_later(tmp_path):
    d, d_minus_2 = DAYS[3], DAYS[1]
    _chunks_with_unknown_source(tmp_path / "chunks", [d, d_minus_2], odd_day=d)
    job = make_job(tmp_path, source={"kind": "files", "path": str(tmp_path / "chunks")})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, d).success
        assert run_sync(defs, instance, d_minus_2).success
        history = _check_history(instance, keys.export("track"), "known_values")
        newest_of = {}
        for evaluation in history:  # newest first
            newest_of.setdefault(evaluation.partition, evaluation)
        assert set(newest_of) == {d, d_minus_2}
        warned = newest_of[d]
        assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
        assert warned.metadata["rows_with_unknown_source"].value > 0
        assert newest_of[d_minus_2].passed


def _dagster(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dagster"), *args, "-m", "userpilot_sync.definitions"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_materializing_part_of_an_exported_day_is_refused_before_a_run(tmp_path, monkeypatch):
    env = cli_env(tmp_path, events_per_day=500)
    pk = DAYS[-1]
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        from userpilot_sync.config.loader import load_sync_jobs

        sync_window_partitions(instance, SyncJobKeys(load_sync_jobs(Path(env["USERPILOT_SYNC_JOBS_DIR"]))[0]))
    everything = ",".join(["demo/raw_events", "demo/manifest", *(f"demo/{et}" for et in
                                                                 ("identify_user", "identify_company", "interaction",
                                                                  "track", "track_feature", "page_view",
                                                                  "session_start")),
                           *(f"demo/{name}" for name in ("all_users", "all_companies", "feature_tags_breakdown",
                                                         "feature_tags_definitions"))])
    first = _dagster(["asset", "materialize", "--select", everything, "--partition", pk], env)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest_path = tmp_path / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001" / pk / "_manifest.json"
    before = manifest_path.read_bytes()
    part = _dagster(["asset", "materialize", "--select", "demo/track", "--partition", pk], env)
    assert part.returncode != 0
    assert "does not support subsetting" in part.stderr or "select all asset and check keys" in part.stderr, part.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS  # no run of the refused subset
    assert manifest_path.read_bytes() == before


def test_partitions_are_the_window(tmp_path):
    job = make_job(tmp_path)
    keys = SyncJobKeys(job)
    with dg.instance_for_test() as instance:
        change = sync_window_partitions(instance, keys)
        window = window_partition_keys()
        assert change.added == window and len(window) == 365
        assert instance.get_dynamic_partitions(keys.partitions_name) == window
        # a day that left the window (and a key that is not a day) are removed; new days appended
        instance.add_dynamic_partitions(keys.partitions_name, ["not-a-day"])
        later = day_window(date.today() + timedelta(days=2))[0]
        change = sync_window_partitions(instance, keys, later)
        assert change.removed == [window[0], window[1], "not-a-day"]
        assert instance.get_dynamic_partitions(keys.partitions_name) == window_partition_keys(later)


def test_an_expired_day_is_kept_while_a_run_targets_it(tmp_path):
    job = make_job(tmp_path)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        sync_window_partitions(instance, keys)
        oldest = instance.get_dynamic_partitions(keys.partitions_name)[0]
        job_def = defs.resolve_job_def(keys.sync_job_name)
        run = instance.create_run_for_job(job_def, tags={"dagster/partition": oldest})
        later = day_window(date.today() + timedelta(days=1))[0]
        change = sync_window_partitions(instance, keys, later)
        assert change.kept_in_use == [oldest] and oldest in instance.get_dynamic_partitions(keys.partitions_name)
        instance.report_run_canceled(run)
        change = sync_window_partitions(instance, keys, later)
        assert change.removed == [oldest]


def test_a_failed_day_says_its_cause_first_and_on_the_run(tmp_path):
    folder = tmp_path / "chunks"
    folder.mkdir()
    pk = DAYS[2]
    start, end = day_window(date.fromisoformat(pk))
    frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 300, 5).iter_blocks(start, end)])
    frame.with_columns(pl.when(pl.col("event_type") == "track").then(pl.lit("")).otherwise(pl.col("event_name"))
                       .alias("event_name")).write_parquet(folder / "export.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(folder)})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, pk)
        assert not result.success
        message = failure_messages(result)[0]
        first = message.splitlines()[0]
        assert first.startswith(f"sync job 'demo', partition {pk}, event type 'track': events break the Userpilot Event Schema")
        assert "event_name" in message  # the column and sample values follow
        run = instance.get_run_by_id(result.run_id)
        assert run.tags["userpilot_sync/failure"] == first[:250]
        # the failed day has no materialization (nothing was written) and a failed check saying why
        assert not instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=keys.manifest, asset_partitions=[pk]), limit=1).records
        [evaluation] = _check_history(instance, keys.manifest, "day_exported")
        assert evaluation.partition == pk and not evaluation.passed and "event_name" in evaluation.description
    assert not (Path(job.destination.path) / "userpilot_events").exists()


def test_a_manifest_failing_mid_range_keeps_the_published_days_in_the_ledger(tmp_path, monkeypatch):
    from userpilot_sync.defs.ledger import Ledger
    from userpilot_sync.destination.storage import LocalStorage
    from userpilot_sync.errors import DestinationError

    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 3})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    days = DAYS[1:4]
    original = LocalStorage.put_bytes

    def flaky(self, key, data, **kwargs):
        if key.endswith(f"{days[2]}/_manifest.json"):
            raise DestinationError(f"injected: cannot write {key}")
        return original(self, key, data, **kwargs)

    monkeypatch.setattr(LocalStorage, "put_bytes", flaky)
    with dg.instance_for_test() as instance:
        result = run_sync(defs, instance, days[0], days[-1])
        assert not result.success
        assert failure_messages(result)[0].startswith(f"sync job 'demo', partition {days[2]}: manifest: injected")
        ledger = Ledger(instance, keys)
        for pk in days[:2]:  # published before the failure: their manifests' files are in the ledger
            published = {f["path"] for f in _manifest(job, pk)["files"]}
            assert published and published <= ledger.earlier_paths(pk)
            observed = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=keys.manifest, asset_partitions=[pk]),
                                                   limit=1).records
            assert observed and observed[0].asset_observation.metadata["userpilot/superseded"].value == []
        monkeypatch.setattr(LocalStorage, "put_bytes", original)
        again = run_sync(defs, instance, days[0], days[-1])
        assert again.success, failure_messages(again)
        assert all(_manifest(job, pk)["run_id"] == again.run_id for pk in days)
