"""Manifest v2: a day's status (complete, empty, replacing) and its accounting per event type.

A re-export overwrites the day's manifest with ``status: replacing`` before it replaces any file,
and the complete manifest is written last; a run that dies in between leaves ``replacing`` until
a later run completes the day (DESIGN.md decision 17).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import READABLE_STATUSES, rows_by_event_type
from userpilot_sync.destination.storage import LocalStorage
from userpilot_sync.errors import DestinationError
from userpilot_sync.partitions import last_complete_days
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import cli_env, make_job, run_sync

PK = last_complete_days(1)[0].isoformat()
REPO = Path(__file__).resolve().parents[1]


def _folder(job, pk=PK) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def _manifest(job, pk=PK) -> dict:
    return json.loads((_folder(job, pk) / "_manifest.json").read_text())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "_manifest.json"}


def _accounting_holds(manifest: dict) -> None:
    for et, entry in manifest["event_types"].items():
        assert entry["rows_received"] == entry["rows"] + entry["duplicates_dropped"] + entry["filtered_out"], et
        assert entry["rows"] == sum(f["rows"] for f in manifest["files"] if f["event_type"] == et and f["format"] == "parquet")


def test_a_day_whose_filters_drop_every_track_event_says_why(tmp_path):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 3},
                   filters={"event_types": ["track", "page_view"], "event_names_include": ["Report Exportd"]})
    result = sync_partition(job, PK, tmp_path / "staging")
    manifest = result.manifest
    assert manifest["manifest_version"] == 2 and manifest["status"] in READABLE_STATUSES
    track = manifest["event_types"]["track"]
    assert track["status"] == "empty" and track["rows"] == 0 and track["rows_received"] > 0
    assert track["filtered_out"] + track["duplicates_dropped"] == track["rows_received"]
    assert "filters (event_names_include) removed all" in track["reason"]
    # rows of event types the sync job does not select are counted (the demo source sends none)
    assert manifest["source"]["not_selected"] == manifest["source"]["source_rows"] - sum(
        e["rows_received"] for e in manifest["event_types"].values())
    _accounting_holds(manifest)


def test_a_day_without_events_is_empty_not_missing(tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    (chunks / "export-part1.ndjson.zst").write_bytes(b"\x28\xb5\x2f\xfd")  # a compression the source cannot read
    (chunks / "notes.txt").write_text("exported by hand")
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)})
    manifest = sync_partition(job, PK, tmp_path / "staging").manifest
    assert manifest["status"] == "empty"
    assert manifest["status_reason"] == (
        "the source delivered no events for the day (the source folder held 0 chunk file(s); 2 file(s) skipped: "
        "export-part1.ndjson.zst (not a chunk format (parquet, ndjson, csv, avro; ndjson/csv may end in .gz): "
        ".ndjson.zst), notes.txt (not a chunk format (parquet, ndjson, csv, avro; ndjson/csv may end in .gz): .txt))")
    assert [s["file"] for s in manifest["source"]["skipped"]] == ["export-part1.ndjson.zst", "notes.txt"]
    assert set(manifest["event_types"]) == set(EVENT_TYPES)
    assert all(e["status"] == "empty" and e["reason"] == f"the source delivered no {et} events for the day"
               for et, e in manifest["event_types"].items())
    # an export with no rows has no file (0-row files break readers of a date range): the manifest
    # accounts for it alone, and the day's folder holds the manifest only
    assert manifest["files"] == []
    folder = Path(job.destination.path) / job.destination.prefix / job.sync_folder / PK
    assert sorted(p.name for p in folder.iterdir()) == ["_manifest.json"]
    # the documented files too: empty snapshots and breakdown (no files), no definitions (no lookups)
    files = manifest["userpilot_files"]
    assert [files[n]["status"] for n in ("all_users", "all_companies", "feature_tags_breakdown",
                                         "feature_tags_definitions")] == ["empty", "empty", "empty", "absent"]


def _failing_after(monkeypatch, failing: str):
    put_file = LocalStorage.put_file

    def put(self, key, path, **kwargs):
        if key.endswith(failing):
            raise DestinationError(f"injected upload failure for {key}")
        return put_file(self, key, path, **kwargs)

    monkeypatch.setattr(LocalStorage, "put_file", put)
    return put_file


def test_a_failed_re_export_leaves_the_day_replacing_until_a_run_completes_it(tmp_path, monkeypatch):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        first = run_sync(defs, instance, PK)
        assert first.success, failure_messages(first)
        complete = _manifest(job)
        assert complete["status"] == "complete" and complete["run_id"] == first.run_id
        _accounting_holds(complete)
        before = _digests(_folder(job))

        # the re-export writes its replacing manifest, replaces some files, then an upload fails
        original = _failing_after(monkeypatch, "/session_start.parquet")
        failed = run_sync(defs, instance, PK)
        monkeypatch.setattr(LocalStorage, "put_file", original)
        assert not failed.success
        replacing = _manifest(job)
        assert replacing["status"] == "replacing" and replacing["run_id"] == failed.run_id
        assert replacing["manifest_version"] == 2 and replacing["files"] == []
        assert replacing["replacing"]["files"] == sorted(f["path"] for f in complete["files"])
        assert failed.run_id in replacing["status_reason"] and "complete or empty" in replacing["status_reason"]

        again = run_sync(defs, instance, PK)
        assert again.success, failure_messages(again)
        done = _manifest(job)
        assert done["status"] == "complete" and done["run_id"] == again.run_id
        assert _digests(_folder(job)) == before  # deterministic output: same bytes as the first export
        assert [f["sha256"] for f in done["files"]] == [f["sha256"] for f in complete["files"]]
        meta = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey([job.name, "manifest"]), asset_partitions=[PK]), limit=1).records[0]
        assert meta.asset_materialization.metadata["manifest_status"].value == "complete"


def test_a_first_export_gets_no_replacing_manifest_but_a_retry_after_it_does(tmp_path, monkeypatch):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 2})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        # the first attempt fails at its very first upload: nothing of the day in the destination
        original = _failing_after(monkeypatch, "/identify_user.parquet")
        failed = run_sync(defs, instance, PK)
        monkeypatch.setattr(LocalStorage, "put_file", original)
        assert not failed.success
        assert not (_folder(job) / "_manifest.json").exists()

        # the retry knows a run began to write the day (its raw_events record): it announces itself
        writes: list[str] = []
        put_bytes = LocalStorage.put_bytes

        def spy(self, key, data, **kwargs):
            writes.append(json.loads(data)["status"])
            return put_bytes(self, key, data, **kwargs)

        monkeypatch.setattr(LocalStorage, "put_bytes", spy)
        retry = run_sync(defs, instance, PK)
        assert retry.success, failure_messages(retry)
        assert writes == ["replacing", "complete"]

        # a day never touched before: the complete manifest is the only manifest write
        writes.clear()
        other = last_complete_days(2)[0].isoformat()
        assert run_sync(defs, instance, other).success
        assert writes == ["complete"]


@pytest.mark.integration
@pytest.mark.faults
def test_a_re_export_killed_before_its_manifest_leaves_replacing_and_the_next_run_completes_it(tmp_path):
    env = cli_env(tmp_path, events_per_day=400)
    sync = [sys.executable, "-m", "userpilot_sync.cli", "sync", "--job", "demo", "--partition", PK]
    first = subprocess.run(sync, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001" / PK
    complete = json.loads((folder / "_manifest.json").read_text())
    before = _digests(folder)

    pauses = tmp_path / "pauses"
    pauses.mkdir()
    paused_env = dict(env, USERPILOT_SYNC_PAUSE_AT="before_manifest", USERPILOT_SYNC_PAUSE_DIR=str(pauses))
    victim = subprocess.Popen(sync, cwd=REPO, env=paused_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (pauses / "before_manifest").exists() or not (pauses / "before_manifest").read_text():
            assert victim.poll() is None, "the re-export ended before it reached its manifest"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        replacing = json.loads((folder / "_manifest.json").read_text())
        assert replacing["status"] == "replacing" and replacing["run_id"] != complete["run_id"]
        assert replacing["replacing"]["files"] == sorted(f["path"] for f in complete["files"])
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    # after the crash the day stays 'replacing' (a reader does not trust it) ...
    assert json.loads((folder / "_manifest.json").read_text())["status"] == "replacing"
    # ... until the next run completes it, with no manual step and the same bytes
    again = subprocess.run(sync, cwd=REPO, env=paused_env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    done = json.loads((folder / "_manifest.json").read_text())
    assert done["status"] == "complete" and done["run_id"] not in (complete["run_id"], replacing["run_id"])
    assert _digests(folder) == before
    assert rows_by_event_type(done) == rows_by_event_type(complete) and sum(rows_by_event_type(done).values()) == 400
