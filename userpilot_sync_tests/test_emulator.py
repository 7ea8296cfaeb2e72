"""The Export API emulator's contract over raw HTTP: auth, error body shape, job lifecycle,
one running job per app token, presigned URL signature/expiry, retention, lookups, CLI."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from userpilot_sync_tests.fixtures_api import API_KEY, APP_TOKEN

AUTH = {"Authorization": f"Token {API_KEY}"}
DAY = {"from": "2026-03-09T00:00:00Z", "to": "2026-03-10T00:00:00Z", "event_type": ["track"], "format": "csv"}


def _create(emulator, **body):
    return httpx.post(f"{emulator.base_url}/api/v1/analytics/exports", headers=AUTH, json={**DAY, **body})


def test_bad_key_gets_401_with_documented_error_shape(emulator):
    r = httpx.get(f"{emulator.base_url}/api/v1/analytics/exports/jobs/", headers={"Authorization": "Token nope"})
    assert r.status_code == 401
    (err,) = r.json()["errors"]
    assert set(err) == {"details", "error", "error_code", "message"}


def test_job_lifecycle_and_one_job_per_app_token(emulator):
    created = _create(emulator)
    assert created.status_code == 201
    body = created.json()
    assert body["environment_app_token"] == APP_TOKEN and body["job_id"]
    assert _create(emulator).status_code == 409  # pending job of the same app token
    url = f"{emulator.base_url}/api/v1/analytics/exports/jobs/{body['job_id']}"
    first = httpx.get(url, headers=AUTH).json()
    assert first["status"] == "pending" and 0 <= first["progress"] < 100 and first["presigned_urls"] == []
    done = httpx.get(url, headers=AUTH).json()
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["all_chunks"] == done["completed_chunks"] == len(done["presigned_urls"]) == 3
    chunk = done["presigned_urls"][0]
    assert chunk["filename"] == "export-part1.csv" and chunk["url"].startswith(emulator.storage_url)
    download = httpx.get(chunk["url"])
    assert download.status_code == 200 and download.text.startswith('"app_token"')
    listed = httpx.get(f"{emulator.base_url}/api/v1/analytics/exports/jobs/", headers=AUTH).json()["data"]
    assert [j["job_id"] for j in listed] == [body["job_id"]]
    assert _create(emulator).status_code == 201  # the first job is done: a new one may start

    assert httpx.get(chunk["url"].replace("signature=", "signature=0")).status_code == 403
    emulator.advance(days=2, seconds=1)
    expired = httpx.get(chunk["url"])
    assert expired.status_code == 403 and b"Request has expired" in expired.content
    fresh = httpx.get(url, headers=AUTH).json()["presigned_urls"][0]["url"]
    assert httpx.get(fresh).status_code == 200  # status requests issue fresh URLs
    emulator.advance(days=1)
    assert httpx.get(url, headers=AUTH).status_code == 404  # 3-day retention


def test_invalid_requests_get_422(emulator):
    assert _create(emulator, format="xlsx").status_code == 422
    assert _create(emulator, event_type=["click"]).status_code == 422
    assert _create(emulator, to="not a date").status_code == 422


def test_lookup_pagination(emulator):
    url = f"{emulator.base_url}/api/v1/analytics/exports/lookups/features_events"
    page = httpx.get(url, headers=AUTH, params={"limit": 5}).json()
    assert len(page["data"]) == 5
    assert page["metadata"] == {"cursor": {"after": "5"}, "limit": 5, "total_count": 12}
    last = httpx.get(url, headers=AUTH, params={"limit": 5, "after": "10"}).json()
    assert len(last["data"]) == 2 and last["metadata"]["cursor"]["after"] is None
    assert httpx.get(f"{url}x", headers=AUTH).status_code == 404


def test_failure_switches_and_recorder(emulator):
    emulator.fail_next("api", 429, times=1, retry_after=5)
    r = httpx.get(f"{emulator.base_url}/api/v1/analytics/exports/jobs/", headers=AUTH)
    assert r.status_code == 429 and r.headers["Retry-After"] == "5" and r.json()["errors"]
    assert httpx.get(f"{emulator.base_url}/api/v1/analytics/exports/jobs/", headers=AUTH).status_code == 200
    assert [rec.status for rec in emulator.requests] == [429, 200]
    assert emulator.requests[0].headers["Authorization"] == f"Token {API_KEY}"


@pytest.mark.timeout(30)
def test_command_line_entry_point():
    proc = subprocess.Popen(
        [sys.executable, "-m", "userpilot_sync.emulator", "--port", "0", "--api-key", "cli-key",
         "--events-per-day", "50"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        base_url = line.split("emulator: ", 1)[1].split(" ", 1)[0]
        r = httpx.get(f"{base_url}/api/v1/analytics/exports/lookups/segments",
                      headers={"Authorization": "Token cli-key"})
        assert r.status_code == 200 and r.json()["metadata"]["total_count"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
