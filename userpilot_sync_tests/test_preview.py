"""The dry-run preview (``cli preview``, the ``<job>_preview`` job): what an export of a day would
write — every object key, rows per event type, sample rows, the manifest — with zero requests to
the destination, nothing recorded in the instance but the preview run, the app token's pool slot
held like an export's, on enabled and disabled sync jobs; the keys equal what the export then writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from userpilot_sync import cli
from userpilot_sync.config.loader import load_sync_jobs
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.ledger import Ledger
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.partitions import day_window, last_complete_days
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import cli_env, run_sync
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

pytestmark = pytest.mark.integration  # moto S3 server, CLI subprocesses
REPO = Path(__file__).resolve().parents[1]
PK = last_complete_days(1)[0].isoformat()


def _cli(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "userpilot_sync.cli", "preview", "--job", "demo", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _use(env: dict, monkeypatch) -> None:
    for name in ("DAGSTER_HOME", "USERPILOT_SYNC_JOBS_DIR", "USERPILOT_SYNC_STAGING_DIR"):
        monkeypatch.setenv(name, env[name])


def _recorded_nothing(instance: dg.DagsterInstance, keys: SyncJobKeys) -> None:
    """No materialization or observation of any asset of the sync job, hence no fingerprint."""
    for key in [*keys.day_assets, keys.lookups]:
        flt = dg.AssetRecordsFilter(asset_key=key)
        assert not instance.fetch_materializations(flt, limit=1).records, key
        assert not instance.fetch_observations(flt, limit=1).records, key
    assert Ledger(instance, keys).recorded_fingerprint() is None


def _staged_files(env: dict) -> list[Path]:
    root = Path(env["USERPILOT_SYNC_STAGING_DIR"])
    return [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts] if root.exists() else []


def test_cli_preview_of_the_demo_sync_job_waits_for_the_pool_and_writes_nothing(tmp_path, monkeypatch):
    env = cli_env(tmp_path, events_per_day=400)
    _use(env, monkeypatch)
    [job] = load_sync_jobs()
    keys = SyncJobKeys(job)
    layout = layout_for(job)
    with dg.DagsterInstance.get() as instance:
        # another export of the app token holds the pool's one slot: the preview waits for it
        holder = instance.create_run_for_job(dg.GraphDefinition(name="holder").to_job(), run_id=None)
        storage = instance.event_log_storage
        storage.set_concurrency_slots(job.pool, 1)  # deploy/dagster.yaml's default limit, made explicit
        assert storage.claim_concurrency_slot(job.pool, holder.run_id, "demo_day").is_claimed
        proc = _cli(env, "--partition", PK)
        deadline = time.monotonic() + 120
        while not storage.get_concurrency_info(job.pool).pending_steps:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the preview never asked for the pool slot"
            time.sleep(0.2)
        time.sleep(1)
        assert proc.poll() is None  # still waiting for the slot
        storage.free_concurrency_slots_for_run(holder.run_id)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        _recorded_nothing(instance, keys)
        runs = [r for r in instance.get_runs() if r.run_id != holder.run_id]
        assert [(r.job_name, r.status) for r in runs] == [("demo_preview", dg.DagsterRunStatus.SUCCESS)]
        assert not storage.get_concurrency_info(job.pool).claimed_slots
    assert f"Preview of sync job demo, partition {PK}: nothing was written" in out
    # every key, from the layout code; rows per event type; samples; the manifest
    for et in job.event_types:
        rel = layout.data_path(PK, et, job.formats[0].extension, 0, 1)
        assert layout.key(rel) in out
    manifest_line = next(line for line in out.splitlines() if line.endswith("(the manifest, written last)"))
    assert manifest_line.split()[0] == layout.key(layout.manifest_path(PK))
    assert "Rows per event type:" in out and "Sample rows" in out and '"app_token": "NX-demo0001"' in out
    manifest_text = out.split("Manifest it would write (", 1)[1].split("\n", 1)[1]
    manifest = json.loads(manifest_text.split("\nNotes:")[0])
    assert manifest["partition"] == PK and manifest["status"] == "complete"
    assert sum(e["rows"] for e in manifest["event_types"].values()) == 400
    assert not (tmp_path / "exports").exists()
    assert _staged_files(env) == []  # the temporary staging is gone


def test_preview_of_a_disabled_sync_job_as_json(tmp_path, monkeypatch, capsys):
    env = cli_env(tmp_path, events_per_day=300)
    jobs_file = Path(env["USERPILOT_SYNC_JOBS_DIR"]) / "demo.yaml"
    text = jobs_file.read_text()
    parquet = "formats:\n  - {format: parquet, compression: zstd}\n"
    assert parquet in text
    jobs_file.write_text(text.replace("enabled: true", "enabled: false").replace(
        parquet, "formats:\n  - {format: ndjson, compression: gzip}\n  - {format: csv}\n"))
    _use(env, monkeypatch)
    [job] = load_sync_jobs()
    assert not job.enabled and [f.format for f in job.formats] == ["ndjson", "csv"]
    assert cli.main(["preview", "--job", "demo", "--partition", PK, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layout = layout_for(job)
    assert doc["preview_version"] == 1 and doc["sync_job"] == "demo" and doc["partition"] == PK
    assert doc["enabled"] is False and any("disabled" in n for n in doc["notes"])
    assert list(doc["event_types"]) == list(job.event_types)
    assert sum(e["rows"] for e in doc["event_types"].values()) == 300
    # every event type with rows in every format (the demo's day may have none of a type at 300
    # events: then it has no file), then the documented files, the manifest last
    exports = [layout.key(layout.data_path(PK, et, spec.extension, 0, 1))
               for et in job.event_types if doc["event_types"][et]["rows"] for spec in job.formats]
    assert len(exports) >= 2 * (len(job.event_types) - 1)
    assert doc["keys"][:len(exports)] == exports
    assert doc["keys"][-1] == doc["manifest"]["key"] == layout.key(layout.manifest_path(PK))
    assert [f["key"] for f in doc["files"]] == doc["keys"][:-1]
    assert {f["path"] for f in doc["files"]} == {f["path"] for f in doc["manifest"]["document"]["files"]}
    for f in doc["files"]:
        assert len(f["sample"]) == min(3, f["rows"]), f["key"]
        assert f["uri"] == (tmp_path / "exports" / f["key"]).as_uri()
    ndjson = next(f for f in doc["files"] if f["key"].endswith("/page_view.ndjson.gz"))
    assert ndjson["sample"][0]["event_type"] == "page_view"
    assert doc["manifest"]["document"]["userpilot_files"] == doc["userpilot_files"]
    assert not (tmp_path / "exports").exists()
    # the export itself stays refused for a disabled sync job
    assert cli.main(["sync", "--job", "demo", "--partition", PK]) == 1
    assert "the sync job is disabled" in capsys.readouterr().err


def test_a_bad_day_fails_its_preview_with_the_exports_one_line_cause(tmp_path, monkeypatch, capsys):
    env = cli_env(tmp_path, events_per_day=300)
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    start, end = day_window(date.fromisoformat(PK))
    frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 300, 3).iter_blocks(start, end)])
    changed = frame.filter(pl.col("event_type") == "track").head(1).with_columns(pl.lit('{"changed":1}').alias("metadata"))
    pl.concat([frame, changed]).write_parquet(chunks / "export.parquet")
    jobs_file = Path(env["USERPILOT_SYNC_JOBS_DIR"]) / "demo.yaml"
    text = jobs_file.read_text()
    source = text[text.index("source:"):text.index("destination:")]
    jobs_file.write_text(text.replace(source, f"source:\n  kind: files\n  path: {chunks}\n"))
    _use(env, monkeypatch)
    assert cli.main(["preview", "--job", "demo", "--partition", PK]) == 1
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first.startswith(f"sync job 'demo', partition {PK}") and "internal_event_id" in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    # a day outside the window: refused up front with the window's message
    assert cli.main(["preview", "--job", "demo", "--partition", "2001-01-01"]) == 2
    assert "365-day window" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists() and _staged_files(env) == []


def test_preview_of_an_s3_sync_job_sends_no_request_and_names_what_the_export_writes(
        moto_s3, tmp_path, monkeypatch):
    bucket = moto_s3.create_bucket("preview-s3")
    proxy = RecordingProxy(upstream=moto_s3.endpoint.split("//")[1])
    try:
        env = cli_env(tmp_path, events_per_day=400)
        jobs_file = Path(env["USERPILOT_SYNC_JOBS_DIR"]) / "demo.yaml"
        text = jobs_file.read_text()
        local = text[text.index("destination:"):text.index("frequency:")]
        jobs_file.write_text(text.replace(local, f"destination:\n  kind: s3\n  bucket: {bucket}\n  prefix: {WRITE_PREFIX}\n"
                                                 f"  endpoint_url: {proxy.url}\n  region: us-east-1\n"))
        key_id, secret = moto_s3.keys["writer"]
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
        _use(env, monkeypatch)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        proc = _cli(env, "--partition", PK, "--json")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        doc = json.loads(out)
        assert proxy.log == []  # zero requests reached S3: no credentials check, no listing, no write
        assert doc["destination"] == {"kind": "s3", "root_uri": f"s3://{bucket}/{WRITE_PREFIX}/userpilot_datasync_10001_NX-demo0001"}
        assert all(f["uri"] == f"s3://{bucket}/{f['key']}" for f in doc["files"])

        jobs = load_sync_jobs()
        keys = SyncJobKeys(jobs[0])
        defs = build_definitions(jobs)
        with dg.DagsterInstance.get() as instance:
            # the Dagster job, in process: the same keys in its output metadata, still no request
            job_def = defs.resolve_job_def(keys.preview_job_name)
            op = job_def.graph.node_names()[0]
            result = job_def.execute_in_process(instance=instance, raise_on_error=False,
                                                run_config={"ops": {op: {"config": {"partition": PK}}}})
            assert result.success
            [output] = [e for e in result.all_events if e.is_successful_output]
            metadata = output.step_output_data.metadata
            assert metadata["keys"].value == doc["keys"]
            assert metadata["rows"].value == {et: e["rows"] for et, e in doc["event_types"].items()}
            assert metadata["preview"].value["files"] == doc["files"]
            assert proxy.log == []
            _recorded_nothing(instance, keys)
            assert {r.job_name for r in instance.get_runs()} == {"demo_preview"}

            # the real export of the day writes exactly the previewed objects, with the previewed bytes
            assert run_sync(defs, instance, PK).success
        admin = moto_s3.client("admin")
        written = sorted(o["Key"] for o in admin.list_objects_v2(Bucket=bucket)["Contents"])
        assert written == sorted(doc["keys"])
        manifest = json.loads(admin.get_object(Bucket=bucket, Key=doc["manifest"]["key"])["Body"].read())
        previewed = doc["manifest"]["document"]
        assert manifest["files"] == previewed["files"]
        assert manifest["event_types"] == previewed["event_types"]
        assert manifest["userpilot_files"] == previewed["userpilot_files"]
    finally:
        proxy.close()


def test_a_delta_sync_job_gets_a_dry_run_commit_and_no_table(tmp_path):
    from userpilot_sync.preview import preview_day
    from userpilot_sync_tests.fixtures_core import make_job

    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 4},
                   formats=[{"format": "parquet"}, {"format": "delta"}],
                   destination={"kind": "local", "path": str(tmp_path / "exports"), "prefix": "userpilot_events",
                                "read_access": True})
    work = tmp_path / "staging" / "demo" / ".work-preview"
    doc = preview_day(job, PK, work, state_root=tmp_path / "staging")
    layout = layout_for(job)
    tables = {t["event_type"]: t for t in doc["delta_tables"]}
    assert list(tables) == list(job.event_types)
    for et, table in tables.items():
        assert table["key"] == layout.key(f"_delta/{et}") and table["version"] is None
        assert table["rows"] == doc["event_types"][et]["rows"]
        assert len(table["sample"]) == min(3, table["rows"])
    assert all(f["format"] == "parquet" for f in doc["files"])
    assert not (tmp_path / "exports").exists() and not work.exists()
