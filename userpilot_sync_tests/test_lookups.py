"""Lookups: demo tables, fetching every page from the emulator, lenient records, pandera
validation, and writing ``lookups/<kind>.parquet`` through a Storage."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from userpilot_sync.config.model import DemoSourceConfig
from userpilot_sync.destination.lookups import write_lookups
from userpilot_sync.destination.storage import LocalStorage
from userpilot_sync.errors import ValidationError
from userpilot_sync.source.demo import FEATURE_TAGS, INTERACTION_ENTITIES, TRACK_EVENTS
from userpilot_sync.source.lookups import (
    LOOKUP_KINDS,
    lookups_for_job,
    demo_lookup_table,
    fetch_lookup,
    fetch_lookups,
    lookup_arrow_schema,
    records_to_table,
)
from userpilot_sync_tests.fixtures_api import API_KEY, api_source, make_api_job

pytestmark = pytest.mark.usefixtures("api_key_env")


def test_demo_definitions_name_every_demo_id():
    content = {k: demo_lookup_table(k) for k in
               ("flows", "checklists", "surveys", "spotlights", "banners", "resource_center_modules")}
    pairs = {(et, i) for t in content.values() for et, i in zip(t.column("entity_type").to_pylist(),
                                                                  t.column("id").to_pylist())}
    for entity, (ids, _statuses) in INTERACTION_ENTITIES.items():
        for entity_id in ids:
            assert (entity, entity_id) in pairs, (entity, entity_id)
    features = demo_lookup_table("features_events").to_pylist()
    assert {r["id"]: r["name"] for r in features if r["type"] == "feature_tag"} == FEATURE_TAGS
    assert {r["id"] for r in features if r["type"] in ("tracked_event", "labeled_event")} == set(TRACK_EVENTS)
    assert {r["id"] for r in features if r["type"] == "labeled_event"} == {"Signed Up", "Upgraded Plan"}
    for kind in LOOKUP_KINDS:
        table = demo_lookup_table(kind)
        assert table.schema == lookup_arrow_schema(kind) and table.num_rows > 0


def test_fetching_follows_cursors_and_matches_the_demo(tmp_path, emulator, fake_clock):
    job = make_api_job(tmp_path, emulator)
    tables = fetch_lookups(api_source(job, fake_clock), page_size=2)
    assert set(tables) == set(LOOKUP_KINDS)
    for kind, table in tables.items():
        assert table.equals(demo_lookup_table(kind)), kind
    flows = [r for r in emulator.requests_to("api") if r.path.endswith("/lookups/features_events")]
    assert len(flows) == -(-demo_lookup_table("features_events").num_rows // 2)  # one request per page
    assert flows[1].query["after"] == ["2"] and flows[0].query["limit"] == ["2"]
    assert all(r.headers["Authorization"] == f"Token {API_KEY}" for r in emulator.requests)
    via_api = lookups_for_job(job, ("surveys",), source=api_source(job, fake_clock))
    via_demo = lookups_for_job(job.model_copy(update={"source": DemoSourceConfig()}), ("surveys",))
    assert via_api["surveys"].equals(via_demo["surveys"])


def test_lookup_requests_retry_on_429(tmp_path, emulator, fake_clock):
    emulator.fail_next("lookup", 429, times=1, retry_after=2)
    job = make_api_job(tmp_path, emulator)
    table = fetch_lookup(api_source(job, fake_clock), "segments")
    assert table.num_rows == 3 and fake_clock.sleeps == [2.0]


def test_records_are_read_leniently():
    table = records_to_table("flows", [
        {"id": 7, "title": "Tour", "state": "draft", "createdAt": 1735725600, "extra": {"a": 1}},
        {"id": "12", "name": "Other", "entity_type": "Experience", "updated_at": "2025-02-01T10:00:00"},
    ])
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["7", "12"]
    assert rows[0]["name"] == "Tour" and rows[0]["status"] == "draft" and rows[0]["entity_type"] == "experience"
    assert rows[0]["created_at"].isoformat() == "2025-01-01T10:00:00+00:00"
    assert '"extra":{"a":1}' in rows[0]["attributes"]
    assert rows[1]["updated_at"].isoformat() == "2025-02-01T10:00:00+00:00"
    nps = records_to_table("surveys", [{"id": 1, "name": "NPS", "type": "nps", "questions": [{"id": "q"}]}])
    assert nps.column("entity_type").to_pylist() == ["nps"]


def test_invalid_definitions_are_rejected():
    with pytest.raises(ValidationError, match="unique"):
        records_to_table("segments", [{"id": 1, "name": "a"}, {"id": "1", "name": "b"}])
    with pytest.raises(ValidationError, match="no id"):
        records_to_table("segments", [{"name": "nameless"}])
    with pytest.raises(ValidationError, match="unreadable timestamp"):
        records_to_table("segments", [{"id": 1, "created_at": "yesterday"}])


def test_write_lookups_is_deterministic(tmp_path, demo_job):
    tables = lookups_for_job(demo_job)
    storage = LocalStorage(tmp_path / "out")
    first = write_lookups(demo_job, storage, tables)
    second = write_lookups(demo_job, storage, tables)
    assert first == second and len(first) == len(LOOKUP_KINDS)
    path = storage.path("userpilot_events/userpilot_datasync_10001_NX-demo0001/lookups/flows.parquet")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == next(f.sha256 for f in first if f.kind == "flows")
    assert pq.read_table(path).column("name").to_pylist() == [
        "Onboarding tour", "New report walkthrough", "Billing upgrade announcement"]
