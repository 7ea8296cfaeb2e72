"""The Bulk Data Export API source against the emulator, over real loopback HTTP.

Every failure mode of the API and its presigned downloads, with its outcome: retries counted in
the manifest's source facts, error text, no manifest on failure, a 0-row manifest on an empty
day; a full partition through the API gives byte-identical files to the demo source; the API
key never reaches logs, manifests, errors or the download host.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pydantic
import pytest

from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.errors import SourceError
from userpilot_sync.partitions import day_window
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.source.base import ExtractRequest
from userpilot_sync.source.export_api import (
    ApiKeyError,
    ApiUnavailable,
    ChunkDownloadError,
    ExportApiError,
    ExportApiSource,
    ExportJobConflict,
    ExportJobFailed,
    ExportJobTimeout,
    parse_retry_after,
)
from userpilot_sync.staging import partition_dir
from userpilot_sync_tests.fixtures_api import (
    API_KEY,
    API_KEY_ENV,
    APP_TOKEN,
    api_source,
    demo_job_for_api_test,
    make_api_job,
    manifest_file,
    read_manifest,
)
from userpilot_sync_tests.fixtures_core import DAY, NOW, PARTITION, make_job

pytestmark = pytest.mark.usefixtures("api_key_env")


def _run(job, tmp_path, clock, **source_kwargs):
    return sync_partition(job, PARTITION, tmp_path / "staging", source=api_source(job, clock, **source_kwargs),
                          now=NOW)


def _files(manifest: dict) -> list[tuple[str, int, str]]:
    return [(f["path"], f["rows"], f["sha256"]) for f in manifest["files"]]


def _assert_failed_cleanly(job, tmp_path):
    assert not manifest_file(job).exists(), "no manifest may be written for a failed partition"
    assert not partition_dir(tmp_path / "staging", job.name, PARTITION).exists(), "nothing staged"


def _assert_key_never_sent_to_storage(emulator):
    storage = emulator.requests_to("storage")
    assert storage, "expected downloads"
    for rec in storage:
        assert "authorization" not in {k.lower() for k in rec.headers}
        assert API_KEY not in json.dumps(rec.headers) + rec.path + json.dumps(rec.query)
    for rec in emulator.requests_to("api"):
        assert rec.headers.get("Authorization") == f"Token {API_KEY}"


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    """The same partition exported from the demo source (reference for byte identity)."""
    tmp = tmp_path_factory.mktemp("demo-reference")
    job = demo_job_for_api_test(tmp)
    return sync_partition(job, PARTITION, tmp / "staging-demo", now=NOW).manifest


#: Robustness tests export one event type (faster partitions) and compare with ``demo_track``.
ONE_TYPE = {"filters": {"event_types": ["track"]}}


@pytest.fixture(scope="module")
def demo_track(tmp_path_factory):
    """The demo source's export of the partition, ``track`` only."""
    tmp = tmp_path_factory.mktemp("demo-reference-track")
    job = demo_job_for_api_test(tmp, **ONE_TYPE)
    return sync_partition(job, PARTITION, tmp / "staging-demo", now=NOW).manifest


# ---------------------------------------------------------------------------------- happy path
@pytest.mark.parametrize("chunk_format", ["parquet", "ndjson", "csv", "avro"])
def test_partition_through_api_matches_demo_byte_for_byte(tmp_path, emulator, fake_clock, demo_result, caplog,
                                                          chunk_format):
    caplog.set_level(logging.DEBUG)
    job = make_api_job(tmp_path, emulator, {"chunk_format": chunk_format})
    result = _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)

    assert _files(manifest) == _files(demo_result)
    src = manifest["source"]
    assert src["kind"] == "export_api" and src["format"] == chunk_format
    assert src["chunks"] == 3 and src["export_job_id"] in emulator.jobs
    assert src["source_rows"] == demo_result["source"]["source_rows"] > 0
    assert src["retries_total"] == 0
    assert result.manifest_key.endswith(f"{PARTITION}/_manifest.json")

    text = manifest_file(job).read_text()
    assert API_KEY not in text
    assert API_KEY not in caplog.text
    assert "signature=" not in caplog.text, "presigned signatures are redacted from httpx logs"
    _assert_key_never_sent_to_storage(emulator)


def test_request_body_carries_window_event_types_and_format(tmp_path, emulator, fake_clock):
    job = make_api_job(tmp_path, emulator, {"chunk_format": "ndjson"},
                       filters={"event_types": ["track", "interaction"]})
    _run(job, tmp_path, fake_clock)
    (create,) = [r for r in emulator.requests_to("api") if r.method == "POST"]
    body = json.loads(create.body)
    # the selected event types plus those the documented files need (snapshots: identify_*;
    # feature-tag breakdown: track_feature)
    assert body == {"from": "2026-03-09T00:00:00Z", "to": "2026-03-10T00:00:00Z",
                    "event_type": ["identify_user", "identify_company", "interaction", "track", "track_feature"],
                    "format": "ndjson"}
    assert create.headers["Content-Type"] == "application/json"
    assert set(rows_by_event_type(read_manifest(job))) == {"interaction", "track"}


def test_rows_outside_the_day_are_counted_not_exported(tmp_path, emulator, fake_clock, demo_track):
    emulator.faults.window_slack_s = 1800  # the API returns 30 min more on either side
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert manifest["source"]["rows_outside_window"] > 0
    assert _files(manifest) == _files(demo_track)


def test_redirected_downloads_carry_no_key(tmp_path, emulator, fake_clock, demo_track):
    emulator.faults.redirect_downloads = True
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    paths = [r.path for r in emulator.requests_to("storage")]
    assert sum(p.startswith("/redirected/") for p in paths) == 3
    _assert_key_never_sent_to_storage(emulator)
    assert _files(read_manifest(job)) == _files(demo_track)


# ---------------------------------------------------------------------------------- the key
def test_missing_env_var_names_the_variable(tmp_path, emulator, fake_clock, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV)
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ApiKeyError, match=API_KEY_ENV):
        _run(job, tmp_path, fake_clock)
    assert emulator.requests == []
    _assert_failed_cleanly(job, tmp_path)


def test_rejected_key_fails_at_once(tmp_path, emulator, fake_clock, monkeypatch, caplog):
    monkeypatch.setenv(API_KEY_ENV, "upk_wrong_key_0000")
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ApiKeyError) as info:
        _run(job, tmp_path, fake_clock)
    message = str(info.value)
    assert message.startswith(f"API key rejected for sync job 'demo' (app token {APP_TOKEN})")
    assert API_KEY_ENV in message and "upk_wrong_key_0000" not in message
    assert "upk_wrong_key_0000" not in caplog.text
    assert len(emulator.requests) == 1 and fake_clock.sleeps == []
    _assert_failed_cleanly(job, tmp_path)


def test_repr_never_shows_the_key(tmp_path, emulator):
    job = make_api_job(tmp_path, emulator)
    source = ExportApiSource.from_config(job)
    with source.client() as client:
        assert API_KEY not in repr(source) + repr(client) + repr(client._key) + str(client._key)
    assert API_KEY not in job.model_dump_json()


def test_base_url_must_be_https_unless_loopback(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="HTTPS"):
        make_job(tmp_path, source={"kind": "export_api", "base_url": "http://appex.userpilot.io"})
    for ok in ("https://appex.userpilot.io/", "http://127.0.0.1:8765", "http://localhost:1"):
        assert not make_job(tmp_path, source={"kind": "export_api", "base_url": ok}).source.base_url.endswith("/")


def test_plain_http_presigned_urls_are_refused(tmp_path, emulator, fake_clock):
    emulator.faults.presigned_base_url = "http://storage.example.invalid"
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ExportApiError, match="presigned URLs must use HTTPS"):
        _run(job, tmp_path, fake_clock)
    _assert_failed_cleanly(job, tmp_path)


def test_api_redirects_are_not_followed(tmp_path, emulator, fake_clock):
    emulator.fail_next("create", 307)
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ExportApiError, match="redirected"):
        _run(job, tmp_path, fake_clock)
    _assert_failed_cleanly(job, tmp_path)


# ---------------------------------------------------------------------------------- 409
def test_conflict_is_waited_out(tmp_path, emulator, fake_clock, demo_track):
    emulator.fail_next("create", 409, times=2)
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert manifest["source"]["retries"]["conflict"] == 2
    assert manifest["source"]["retries_total"] == 2
    assert _files(manifest) == _files(demo_track)


def test_conflict_gives_up_after_conflict_wait(tmp_path, emulator, fake_clock):
    emulator.fail_next("create", 409, times=10_000)
    job = make_api_job(tmp_path, emulator, {"conflict_wait_s": 0.3})
    with pytest.raises(ExportJobConflict) as info:
        _run(job, tmp_path, fake_clock)
    assert "another export job is running for app token NX-demo0001" in str(info.value)
    assert fake_clock.t <= 0.3
    posts = [r for r in emulator.requests_to("api") if r.method == "POST"]
    assert len(posts) == len(fake_clock.sleeps) + 1 >= 3
    _assert_failed_cleanly(job, tmp_path)


def test_a_pending_job_of_the_app_token_blocks_a_new_one(tmp_path, emulator, fake_clock):
    other = httpx.post(f"{emulator.base_url}/api/v1/analytics/exports",
                       headers={"Authorization": f"Token {API_KEY}"},
                       json={"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z", "format": "csv"})
    assert other.status_code == 201
    job = make_api_job(tmp_path, emulator, {"conflict_wait_s": 0.1})
    with pytest.raises(ExportJobConflict, match="409 Conflict: An export job is already in progress"):
        _run(job, tmp_path, fake_clock)
    _assert_failed_cleanly(job, tmp_path)


# ---------------------------------------------------------------------------------- 429 / 5xx
def test_rate_limit_honours_retry_after(tmp_path, emulator, fake_clock, demo_track):
    emulator.fail_next("api", 429, times=2, retry_after=3)
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    assert fake_clock.sleeps[:2] == [3.0, 3.0]
    manifest = read_manifest(job)
    assert manifest["source"]["retries"]["rate_limited"] == 2
    assert _files(manifest) == _files(demo_track)


def test_server_errors_back_off_exponentially_with_jitter(tmp_path, emulator, fake_clock):
    emulator.fail_next("status", 503, times=3)
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    # retry_base_s 0.01, jitter fixed at 0.5 -> 0.75 x (0.01, 0.02, 0.04)
    assert fake_clock.sleeps[:3] == pytest.approx([0.0075, 0.015, 0.03])
    assert read_manifest(job)["source"]["retries"]["server_error"] == 3


def test_persistent_server_errors_fail_clearly(tmp_path, emulator, fake_clock):
    emulator.fail_next("create", 500, times=100)
    job = make_api_job(tmp_path, emulator, {"max_retries": 3})
    with pytest.raises(ApiUnavailable) as info:
        _run(job, tmp_path, fake_clock)
    assert "HTTP 500" in str(info.value) and "after 3 retries" in str(info.value)
    assert len([r for r in emulator.requests_to("api") if r.method == "POST"]) == 4
    assert all(s <= 0.1 for s in fake_clock.sleeps)  # capped at retry_max_s
    _assert_failed_cleanly(job, tmp_path)


def test_download_5xx_is_retried(tmp_path, emulator, fake_clock):
    emulator.fail_next("download", 502, times=2)
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    assert read_manifest(job)["source"]["retries"]["server_error"] == 2


def test_retry_after_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("soon") is None


# ---------------------------------------------------------------------------------- job lifecycle
def test_failed_job_names_job_and_api_message(tmp_path, emulator, fake_clock):
    emulator.faults.job_failure = "Export query timed out"
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ExportJobFailed) as info:
        _run(job, tmp_path, fake_clock)
    (job_id,) = emulator.jobs
    assert f"export job {job_id} failed: Export query timed out" in str(info.value)
    _assert_failed_cleanly(job, tmp_path)


def test_job_that_never_completes_times_out(tmp_path, emulator, fake_clock):
    emulator.faults.never_complete = True
    job = make_api_job(tmp_path, emulator, {"max_wait_s": 0.5})
    with pytest.raises(ExportJobTimeout, match=r"did not complete within 0.5 s .*last status 'pending'"):
        _run(job, tmp_path, fake_clock)
    assert fake_clock.t <= 0.5
    assert max(fake_clock.sleeps) == 0.05  # poll interval grows up to poll_max_interval_s
    _assert_failed_cleanly(job, tmp_path)


def test_completed_job_with_missing_urls_is_not_a_short_day(tmp_path, emulator, fake_clock):
    emulator.faults.short_url_list = True
    job = make_api_job(tmp_path, emulator)
    with pytest.raises(ExportApiError, match="refusing a partial day"):
        _run(job, tmp_path, fake_clock)
    _assert_failed_cleanly(job, tmp_path)


# ---------------------------------------------------------------------------------- downloads
@pytest.mark.parametrize("status", [403, 410])
def test_rejected_download_urls_are_refreshed(tmp_path, emulator, fake_clock, demo_track, status):
    emulator.fail_next("download", status, times=1)
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert manifest["source"]["retries"]["url_refresh"] == 1
    assert len(emulator.jobs) == 1
    assert _files(manifest) == _files(demo_track)


def test_expired_urls_of_a_gone_job_need_a_new_job(tmp_path, emulator, fake_clock, demo_track):
    moved = []

    def four_days_later(rec):  # the first download happens after the job's 3-day retention
        if not moved:
            moved.append(rec.path)
            emulator.advance(days=4)

    emulator.on_download = four_days_later
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    src = read_manifest(job)["source"]
    assert src["retries"]["url_refresh"] == 1 and src["retries"]["new_export_job"] == 1
    assert len(src["export_job_ids"]) == 2 and src["export_job_id"] == src["export_job_ids"][1]
    assert _files(read_manifest(job)) == _files(demo_track)


def test_urls_rejected_forever_fail_clearly(tmp_path, emulator, fake_clock):
    emulator.fail_next("download", 403, times=1000)
    job = make_api_job(tmp_path, emulator, {"max_url_refreshes": 2})
    with pytest.raises(ChunkDownloadError, match="keeps rejecting the download URLs"):
        _run(job, tmp_path, fake_clock)
    _assert_failed_cleanly(job, tmp_path)


def test_truncated_download_is_downloaded_again(tmp_path, emulator, fake_clock, demo_track):
    emulator.faults.truncate_downloads = 1
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert emulator.counts["truncated_downloads"] == 1
    assert manifest["source"]["retries"]["chunk_redownload"] == 1
    assert _files(manifest) == _files(demo_track)


@pytest.mark.parametrize("chunk_format", ["parquet", "ndjson"])
def test_unreadable_chunk_fails_after_redownloads_and_stages_nothing(tmp_path, emulator, fake_clock, chunk_format):
    emulator.faults.corrupt_chunks = True
    job = make_api_job(tmp_path, emulator, {"chunk_format": chunk_format, "chunk_retries": 1})
    with pytest.raises(ChunkDownloadError) as info:
        _run(job, tmp_path, fake_clock)
    message = str(info.value)
    assert f"chunk export-part1.{chunk_format}" in message and "truncated or unreadable after 2 download(s)" in message
    assert len([r for r in emulator.requests_to("storage") if r.path.endswith(f"part1.{chunk_format}")]) == 2
    _assert_failed_cleanly(job, tmp_path)


# ---------------------------------------------------------------------------------- empty days
def test_zero_chunks_is_a_valid_empty_day(tmp_path, emulator, fake_clock):
    emulator.faults.zero_chunks = True
    job = make_api_job(tmp_path, emulator, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert manifest["source"]["source_rows"] == 0 and manifest["source"]["chunks"] == 0
    events = [f for f in manifest["files"] if "file" not in f]  # the lookups' definitions have rows
    assert events == []  # an empty export has no file ...
    assert all(e["rows"] == 0 and e["status"] == "empty" for e in manifest["event_types"].values())  # ... but an entry
    assert set(manifest["event_types"]) == set(job.event_types)
    assert manifest["userpilot_files"]["all_users"] == {"status": "empty", "rows": 0, "reason": manifest[
        "userpilot_files"]["all_users"]["reason"], "history_start": PARTITION, "previous_day": None,
        "state_chain": manifest["userpilot_files"]["all_users"]["state_chain"]}
    assert emulator.requests_to("storage") == []


@pytest.mark.parametrize("chunk_format", ["parquet", "ndjson", "csv", "avro"])
def test_empty_chunks_are_a_valid_empty_day(tmp_path, emulator, fake_clock, chunk_format):
    emulator.faults.empty_chunks = True
    job = make_api_job(tmp_path, emulator, {"chunk_format": chunk_format}, **ONE_TYPE)
    _run(job, tmp_path, fake_clock)
    manifest = read_manifest(job)
    assert manifest["source"]["source_rows"] == 0 and manifest["source"]["chunks"] == 3
    assert [f for f in manifest["files"] if "file" not in f] == []  # no file for an empty export
    assert all(e["rows"] == 0 for e in manifest["event_types"].values())


def test_an_app_without_events_gives_an_empty_day(tmp_path, emulator, fake_clock):
    emulator.add_app("upk_quiet_app_key_1234", "NX-quiet0001", events_per_day=0)
    job = make_api_job(tmp_path, emulator, app_token="NX-quiet0001", **ONE_TYPE)
    source = api_source(job, fake_clock, env={API_KEY_ENV: "upk_quiet_app_key_1234"})
    sync_partition(job, PARTITION, tmp_path / "staging", source=source, now=NOW)
    manifest = read_manifest(job)
    assert manifest["source"]["source_rows"] == 0 and manifest["source"]["chunks"] == 0


def test_missing_key_error_is_raised_before_any_batch(tmp_path, emulator):
    job = make_api_job(tmp_path, emulator)
    source = ExportApiSource.from_config(job, env={})
    start, end = day_window(DAY)
    with pytest.raises(SourceError, match=f"environment variable {API_KEY_ENV}"):
        source.extract(ExtractRequest("demo", APP_TOKEN, start, end, job.event_types, Path(tmp_path / "w")))
