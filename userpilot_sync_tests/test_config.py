"""Sync-job configuration: YAML -> SyncJob, every mistake named by file and key, secrets at run time."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import dagster as dg
import pytest
import yaml

from userpilot_sync.config.loader import ENV_SYNC_JOBS_DIR, default_sync_jobs_dir, load_sync_job_file, load_sync_jobs
from userpilot_sync.config.model import (
    DemoSourceConfig,
    ExportApiSourceConfig,
    FormatSpec,
    LocalDestination,
    S3Destination,
    SyncBack,
)
from userpilot_sync.errors import ConfigError, SourceError
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import NOW, PARTITION

REPO = Path(__file__).resolve().parents[1]

#: The issue's example sync job (an Export API source, an S3 destination).
ACME = """\
name: acme_prod
sync_id: "13214"
title: ACME production
app_token: NX-123454
enabled: true
source: {kind: export_api, base_url: "https://appex.userpilot.io", api_key_env: USERPILOT_API_KEY}
destination: {kind: s3, bucket: acme-lake, prefix: userpilot_events, region: us-east-1}
frequency: daily
sync_back: {weekday: sunday, hour: 4, days: 30}
backfill_days: 365
filters: {event_types: [track, interaction], exclude_columns: [user_agent]}
formats: [{format: parquet, compression: zstd}, {format: ndjson, compression: gzip}]
layout: userpilot
"""

MINIMAL = {"name": "acme_prod", "sync_id": "13214", "app_token": "NX-123454"}


def _write(folder: Path, filename: str, data: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path: Path, overrides: dict, filename: str = "acme.yaml") -> str:
    path = _write(tmp_path / "jobs", filename, {**MINIMAL, **overrides})
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    return str(err.value)


# ------------------------------------------------------------------------------ valid files
def test_issue_example_loads_with_every_value(tmp_path):
    job = load_sync_job_file(_write(tmp_path, "acme.yaml", ACME))
    assert job.name == "acme_prod" and job.sync_id == "13214" and job.title == "ACME production"
    assert job.app_token == "NX-123454" and job.enabled is True
    assert job.source == ExportApiSourceConfig(base_url="https://appex.userpilot.io", api_key_env="USERPILOT_API_KEY")
    assert job.destination == S3Destination(bucket="acme-lake", prefix="userpilot_events", region="us-east-1")
    assert job.destination.allow_deletes is False
    assert job.frequency == "daily"
    assert job.sync_back == SyncBack(weekday="sunday", hour=4, days=30)
    assert job.backfill_days == 365
    assert job.event_types == ("interaction", "track")  # documented order, not file order
    assert job.filters.exclude_columns == ("user_agent",)
    assert job.formats == (FormatSpec(format="parquet", compression="zstd"), FormatSpec(format="ndjson", compression="gzip"))
    assert [f.extension for f in job.formats] == ["parquet", "ndjson.gz"]
    assert job.layout == "userpilot"
    assert job.sync_folder == "userpilot_datasync_13214_NX-123454"
    assert job.pool == "userpilot_export_NX_123454"
    assert job.source_file == "acme.yaml"


def test_defaults_of_a_minimal_file(tmp_path):
    job = load_sync_job_file(_write(tmp_path, "min.yaml", MINIMAL))
    assert job.title == "" and job.enabled is True
    assert job.source == DemoSourceConfig(events_per_day=5000, seed=42)
    # relative local paths are resolved against the project folder (the parent of the jobs folder)
    assert job.destination == LocalDestination(path=str((tmp_path.parent / "exports").resolve()), prefix="")
    assert job.frequency == "daily" and job.sync_back is None and job.backfill_days == 0
    assert job.event_types == EVENT_TYPES and job.filters.exclude_columns == ()
    assert job.formats == (FormatSpec(format="parquet", compression="zstd"),)
    assert job.layout == "userpilot" and job.max_file_rows is None and job.max_file_bytes is None
    assert job.partitions_start is None  # optional lower bound: the 365-day window alone decides
    assert job.keep_staging_days == 0 and job.schedules_running is True
    # default compressions: parquet zstd, every other format none
    assert [FormatSpec(format=f).compression for f in ("parquet", "ndjson", "csv", "avro")] == ["zstd", "none", "none", "none"]
    assert SyncBack() == SyncBack(weekday="sunday", hour=4, days=7)


def test_shipped_demo_yaml_loads():
    jobs = load_sync_jobs(REPO / "sync_jobs")
    assert [j.name for j in jobs] == ["demo"]
    demo = jobs[0]
    assert demo.source_file == "demo.yaml"
    assert demo.source == DemoSourceConfig(events_per_day=5000, seed=42)
    assert demo.destination == LocalDestination(path=str(REPO / "exports"), prefix="userpilot_events")
    assert demo.sync_id == "10001" and demo.app_token == "NX-demo0001"
    assert demo.enabled is True and demo.schedules_running is False and demo.backfill_days == 0


def test_sync_jobs_dir_env_var_is_honoured(tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    _write(folder, "b.yml", {**MINIMAL, "name": "second", "sync_id": "2"})
    _write(folder, "a.yaml", {**MINIMAL, "name": "first", "sync_id": "1"})
    _write(folder, "notes.txt", "not a sync job")
    monkeypatch.setenv(ENV_SYNC_JOBS_DIR, str(folder))
    assert default_sync_jobs_dir() == folder
    assert [(j.name, j.source_file) for j in load_sync_jobs()] == [("first", "a.yaml"), ("second", "b.yml")]
    monkeypatch.delenv(ENV_SYNC_JOBS_DIR)
    assert default_sync_jobs_dir() == REPO / "sync_jobs"
    assert [j.name for j in load_sync_jobs()] == ["demo"]


def test_missing_sync_jobs_dir_names_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SYNC_JOBS_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=rf"sync jobs folder .*nowhere does not exist \(set {ENV_SYNC_JOBS_DIR}\)"):
        load_sync_jobs()


# ------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(
            {"filters": {"event_types": ["track", "page_leave"]}},
            "key filters.event_types: unknown event type(s) ['page_leave']; known: identify_user, identify_company, "
            "interaction, track, track_feature, page_view, session_start",
            id="unknown_event_type",
        ),
        pytest.param(
            {"filters": {"event_types": []}},
            "key filters.event_types: at least one event type is needed",
            id="no_event_type",
        ),
        pytest.param(
            {"formats": [{"format": "orc"}]},
            "key formats.0.format: Input should be 'parquet', 'ndjson', 'csv', 'avro' or 'delta' (got 'orc')",
            id="unknown_format",
        ),
        pytest.param(
            {"formats": [{"format": "parquet"}, {"format": "ndjson", "compression": "zstd"}]},
            "key formats.1.compression: compression 'zstd' is not available for ndjson (choose one of gzip, none)",
            id="bad_compression_ndjson",
        ),
        pytest.param(
            {"formats": [{"format": "avro", "compression": "gzip"}]},
            "key formats.0.compression: compression 'gzip' is not available for avro (choose one of deflate, snappy, none)",
            id="bad_compression_avro",
        ),
        pytest.param(
            {"formats": [{"format": "csv"}, {"format": "csv", "compression": "gzip"}]},
            "key formats: format(s) ['csv'] listed twice; each format is written once per export",
            id="duplicate_format",
        ),
        pytest.param(
            {"destination": {"kind": "s3", "bucket": "Acme_Lake"}},
            "key destination.s3.bucket: 'Acme_Lake' is not a valid S3 bucket name (3-63 lower-case letters, digits, '.', '-')",
            id="bad_s3_bucket",
        ),
        pytest.param(
            {"destination": {"kind": "s3", "bucket": "192.168.1.10"}},
            "key destination.s3.bucket: '192.168.1.10' is not a valid S3 bucket name",
            id="s3_bucket_ip",
        ),
        pytest.param(
            {"destination": {"kind": "gcs", "bucket": "goog-lake"}},
            "key destination.gcs.bucket: 'goog-lake' is not a valid GCS bucket name",
            id="bad_gcs_bucket",
        ),
        pytest.param(
            {"destination": {"kind": "gcs", "bucket": "a"}},
            "key destination.gcs.bucket: 'a' is not a valid GCS bucket name",
            id="gcs_bucket_too_short",
        ),
        pytest.param(
            {"sync_back": {"weekday": "sunday", "hour": 4, "days": 366}},
            "key sync_back.days: Input should be less than or equal to 365 (got 366)",
            id="sync_back_days_over_365",
        ),
        pytest.param(
            {"sync_back": {"days": 0}},
            "key sync_back.days: Input should be greater than or equal to 1 (got 0)",
            id="sync_back_days_zero",
        ),
        pytest.param(
            {"backfill_days": 366},
            "key backfill_days: Input should be less than or equal to 365 (got 366)",
            id="backfill_days_over_365",
        ),
        pytest.param(
            {"filters": {"exclude_columns": ["user_agent", "inserted_at", "user_id"]}},
            "key filters.exclude_columns: required column(s) ['inserted_at', 'user_id'] cannot be excluded",
            id="exclude_required_column",
        ),
        pytest.param(
            {"filters": {"exclude_columns": ["email"]}},
            "key filters.exclude_columns: unknown column(s) ['email']; columns are app_token,",
            id="exclude_unknown_column",
        ),
        pytest.param(
            {"frequency": "weekly", "sync_back": {"weekday": "sunday", "hour": 4, "days": 3}},
            "key sync_back.days: 3 days is less than the 7 days the weekly sync already exports every Monday; "
            "a weekly sync job's sync back needs days from 7 to 365",
            id="weekly_sync_back_shorter_than_a_week",
        ),
        pytest.param(
            {"frequency": "weekly", "sync_back": {"weekday": "monday", "hour": 3, "days": 14}},
            "key sync_back.hour: the sync back would start at the same time as the weekly sync (on Mondays at 03:00 UTC) "
            "and export the same partitions twice at once; choose another hour or weekday",
            id="weekly_sync_back_at_the_weekly_tick",
        ),
        pytest.param(
            {"sync_back": {"weekday": "sunday", "hour": 3, "days": 30}},
            "key sync_back.hour: the sync back would start at the same time as the daily sync (every day at 03:00 UTC)",
            id="sync_back_at_the_daily_tick",
        ),
        pytest.param(
            {"sync_back": {"weekday": "funday"}},
            "key sync_back.weekday: Input should be 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday' "
            "or 'sunday' (got 'funday')",
            id="bad_weekday",
        ),
        pytest.param(
            {"sync_back": {"hour": 24}},
            "key sync_back.hour: Input should be less than or equal to 23 (got 24)",
            id="bad_hour",
        ),
        pytest.param(
            {"frequency": "hourly"},
            "key frequency: Input should be 'daily' or 'weekly' (got 'hourly')",
            id="bad_frequency",
        ),
        pytest.param(
            {"layout": "flat"},
            "key layout: Input should be 'userpilot' or 'hive' (got 'flat')",
            id="bad_layout",
        ),
        pytest.param(
            {"max_file_rows": 1000, "max_file_bytes": 1048576},
            "key max_file_bytes: set max_file_rows or max_file_bytes, not both",
            id="both_file_limits",
        ),
        pytest.param(
            {"source": {"kind": "export_api", "base_url": "http://appex.userpilot.io"}},
            "key source.export_api.base_url: 'http://appex.userpilot.io': the Export API must be reached over HTTPS",
            id="plain_http_api",
        ),
        pytest.param(
            {"source": {"kind": "export_api", "api_key_env": "my key"}},
            # the value is never echoed: people paste the key itself here by mistake
            "key source.export_api.api_key_env: is not an environment variable name",
            id="bad_env_var_name",
        ),
        pytest.param(
            {"destination": {"kind": "s3", "bucket": "acme-lake", "kms_key_id": "k"}},
            "key destination.kms_key_id: destination.kms_key_id is only used with sse: aws:kms",
            id="kms_without_sse",
        ),
        pytest.param(
            {"name": "Acme-Prod"},
            "key name: 'Acme-Prod' is not a valid sync job name: use lower-case letters, digits and '_', starting with a letter",
            id="bad_name",
        ),
        pytest.param({"formatz": []}, "key formatz: Extra inputs are not permitted", id="unknown_key"),
        pytest.param({"app_token": None}, "key app_token: Input should be a valid string", id="missing_app_token"),
    ],
)
def test_each_mistake_names_file_and_key(tmp_path, overrides, expected):
    text = _error(tmp_path, overrides)
    assert text.startswith("sync job file acme.yaml: invalid configuration\n"), text
    assert expected in text, text


def test_missing_required_key(tmp_path):
    path = _write(tmp_path, "acme.yaml", {"name": "acme_prod", "app_token": "NX-123454"})
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value) == "sync job file acme.yaml: invalid configuration\n  key sync_id: Field required"


def test_invalid_yaml_and_non_mapping(tmp_path):
    path = _write(tmp_path, "broken.yaml", "name: acme_prod\n  sync_id: [13214\n")
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value) == "sync job file broken.yaml: not valid YAML at line 2, column 10: mapping values are not allowed here"
    path = _write(tmp_path, "list.yaml", "- name: acme_prod\n")
    with pytest.raises(ConfigError, match=r"^sync job file list.yaml: expected a mapping of keys"):
        load_sync_job_file(path)


def test_a_bad_file_in_the_folder_fails_the_load_naming_it(tmp_path):
    folder = tmp_path / "jobs"
    _write(folder, "a.yaml", MINIMAL)
    _write(folder, "b.yaml", {**MINIMAL, "name": "other", "sync_id": "2", "backfill_days": 400})
    with pytest.raises(ConfigError, match=r"sync job file b.yaml: invalid configuration\n  key backfill_days"):
        load_sync_jobs(folder)


@pytest.mark.parametrize("attr, value", [("name", "acme_prod"), ("sync_id", "13214")])
def test_duplicate_name_or_sync_id_across_files(tmp_path, attr, value):
    folder = tmp_path / "jobs"
    first = {**MINIMAL, "name": "acme_prod", "sync_id": "13214"}
    second = {**MINIMAL, "name": "acme_staging", "sync_id": "13215", attr: value}
    _write(folder, "acme_prod.yaml", first)
    _write(folder, "acme_staging.yaml", second)
    with pytest.raises(ConfigError) as err:
        load_sync_jobs(folder)
    assert str(err.value) == (
        f"sync job file acme_staging.yaml: key {attr}: {value!r} is already used by acme_prod.yaml; "
        f"every sync job needs its own {attr}"
    )


def test_sync_id_written_as_a_number_must_be_quoted(tmp_path):
    # YAML reads 0123 as the octal number 83: a silently different sync folder, so numbers are refused
    path = _write(tmp_path, "a.yaml", "name: a\nsync_id: 0123\napp_token: NX-1\n")
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value) == (
        "sync job file a.yaml: invalid configuration\n"
        "  key sync_id: 83 was read as a number (YAML reads 0123 as the octal 83); write the sync_id in quotes "
        'exactly as Userpilot shows it, e.g. sync_id: "13214"'
    )
    assert load_sync_job_file(_write(tmp_path, "b.yaml", 'name: b\nsync_id: "0123"\napp_token: NX-1\n')).sync_id == "0123"


# ------------------------------------------------------------------------------ secrets at run time
def _acme_local(tmp_path: Path) -> Path:
    """The issue's example with a local destination (the source is what matters here)."""
    text = ACME.replace(
        'destination: {kind: s3, bucket: acme-lake, prefix: userpilot_events, region: us-east-1}',
        f'destination: {{kind: local, path: "{(tmp_path / "exports").as_posix()}", prefix: userpilot_events}}',
    ).replace("USERPILOT_API_KEY", "ACME_TEST_USERPILOT_KEY")
    return _write(tmp_path / "jobs", "acme.yaml", text)


def test_missing_api_key_fails_the_run_not_the_load(tmp_path, monkeypatch):
    from userpilot_sync.pipeline import sync_partition

    monkeypatch.delenv("ACME_TEST_USERPILOT_KEY", raising=False)
    job = load_sync_jobs(_acme_local(tmp_path).parent)[0]  # the load works without the secret
    assert job.source.api_key_env == "ACME_TEST_USERPILOT_KEY"
    with pytest.raises(SourceError) as err:
        sync_partition(job, PARTITION, tmp_path / "staging", now=NOW)
    assert "the environment variable ACME_TEST_USERPILOT_KEY (source.api_key_env) is not set" in str(err.value)
    assert "sync job 'acme_prod'" in str(err.value)
    assert not (tmp_path / "exports").exists()


def test_missing_api_key_refuses_the_dagster_run_naming_the_variable(tmp_path, monkeypatch):
    import json
    import socket

    from userpilot_sync.cli import failure_messages
    from userpilot_sync.defs.project import build_definitions
    from userpilot_sync.partitions import last_complete_days
    from userpilot_sync_tests.fixtures_core import run_sync

    def leaks(instance, secret: str) -> list[str]:
        """Runs whose events, run config or tags contain ``secret``."""
        found = []
        for run in instance.get_runs():
            texts = [json.dumps(dg.serialize_value(e)) for e in instance.all_logs(run.run_id)]
            texts += [json.dumps(run.run_config), json.dumps(run.tags)]
            found += [run.run_id for t in texts if secret in t]
        return found

    monkeypatch.delenv("ACME_TEST_USERPILOT_KEY", raising=False)
    job = load_sync_jobs(_acme_local(tmp_path).parent)[0]
    defs = build_definitions([job], tmp_path / "staging")
    dg.Definitions.validate_loadable(defs)  # the code location loads without the secret
    pk = last_complete_days(1)[0].isoformat()
    secret = "upk-acme-7f3c9e1b2d"
    with dg.instance_for_test() as instance:
        # the key set, the API unreachable (a closed loopback port, no retries): the key is resolved
        # and handed to the HTTP client, the run fails, and the value is in no event, config or tag
        monkeypatch.setenv("ACME_TEST_USERPILOT_KEY", secret)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        source = job.source.model_copy(update={"base_url": f"http://127.0.0.1:{port}", "max_retries": 0})
        unreachable = build_definitions([job.model_copy(update={"source": source})], tmp_path / "staging")
        failed = run_sync(unreachable, instance, pk, job_name="acme_prod_sync")
        assert not failed.success
        assert [m.split(": ", 1)[1].split(",")[0] for m in failure_messages(failed)] == [
            f"creating the export job failed: ConnectError reaching http://127.0.0.1:{port}"]
        assert all(secret not in m for m in failure_messages(failed))
        assert leaks(instance, secret) == []
        # the variable missing: Dagster resolves the dg.EnvVar of the source resource before a run is
        # created, so the run is refused up front naming the variable; nothing is written
        monkeypatch.delenv("ACME_TEST_USERPILOT_KEY")
        runs_before = len(instance.get_runs())
        with pytest.raises(dg.DagsterInvalidConfigError, match="ACME_TEST_USERPILOT_KEY"):
            run_sync(defs, instance, pk, job_name="acme_prod_sync")
        assert len(instance.get_runs()) == runs_before and leaks(instance, secret) == []
    assert not (tmp_path / "exports").exists()


def test_every_key_is_documented():
    """docs/configuration.md names every key of the sync-job model (keeps the docs current)."""
    from userpilot_sync.config import model

    text = (REPO / "docs" / "configuration.md").read_text()
    classes = [model.SyncJob, model.SyncBack, model.Filters, model.FormatSpec, model.DemoSourceConfig,
               model.FilesSourceConfig, model.ExportApiSourceConfig, model.LocalDestination,
               model.S3Destination, model.GcsDestination]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name in cls.model_fields
               if name != "source_file" and f"`{name}`" not in text]
    assert missing == []


def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    jobs = tmp_path / "project" / "sync_jobs"
    jobs.mkdir(parents=True)
    path = _write(jobs, "rel.yaml", {**MINIMAL, "destination": {"kind": "local", "path": "./out"}})
    monkeypatch.chdir(tmp_path)
    here = load_sync_job_file(path)
    monkeypatch.chdir(jobs)
    there = load_sync_job_file(path)
    assert here.destination.path == there.destination.path == str(tmp_path / "project" / "out")
    assert here.destination.fingerprint() == there.destination.fingerprint()


def test_base_url_with_credentials_is_refused_without_echo(tmp_path):
    for url in ("https://user:sk-live-123@appex.userpilot.io", "https://appex.userpilot.io/?api_key=sk-live-123"):
        path = _write(tmp_path, "a.yaml", {**MINIMAL, "source": {"kind": "export_api", "base_url": url}})
        with pytest.raises(ConfigError) as err:
            load_sync_job_file(path)
        assert "key source.export_api.base_url" in str(err.value)
        assert "sk-live-123" not in str(err.value)
