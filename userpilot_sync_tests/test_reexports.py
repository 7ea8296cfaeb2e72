"""Re-exports: failures never half-overwrite a day, superseded files are found, ranges skip refused days."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import day_window, last_complete_days, utc_today
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import make_job
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

DAY = last_complete_days(1)[0]
PK = DAY.isoformat()


def _demo_frame(events=600, day=DAY) -> pl.DataFrame:
    start, end = day_window(day)
    return pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", events, 9).iter_blocks(start, end)])


def _run(defs, instance, pk=PK, **kwargs):
    return defs.resolve_job_def("demo_sync").execute_in_process(partition_key=pk, instance=instance,
                                                                 raise_on_error=False, **kwargs)


def _folder(job, pk=PK) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_failed_reexport_leaves_the_day_untouched(tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    frame = _demo_frame()
    frame.write_parquet(chunks / "export-part1.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert _run(defs, instance).success
        before = _digests(_folder(job))
        # late data: more page views (valid) and one track event with an empty name (invalid)
        late = frame.filter(pl.col("event_type") == "page_view").head(5).with_columns(
            (pl.col("internal_event_id") + "x").alias("internal_event_id"))
        bad = frame.filter(pl.col("event_type") == "track").head(1).with_columns(
            pl.lit("").alias("event_name"), (pl.col("internal_event_id") + "y").alias("internal_event_id"))
        pl.concat([late, bad]).write_parquet(chunks / "export-part2.parquet")
        result = _run(defs, instance)
        assert not result.success
        assert "event type 'track'" in "\n".join(failure_messages(result))
        # no export of the day was replaced: the old manifest still describes every file exactly
        assert _digests(_folder(job)) == before
        manifest = json.loads((_folder(job) / "_manifest.json").read_text())
        for f in manifest["files"]:
            assert hashlib.sha256((_folder(job).parent / f["path"]).read_bytes()).hexdigest() == f["sha256"]


def test_parts_written_without_a_manifest_are_still_superseded(tmp_path):
    job_parts = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9}, max_file_rows=100)
    with dg.instance_for_test() as instance:
        # a subset run writes page_view in parts, without the manifest
        subset = build_definitions([job_parts], tmp_path / "staging").resolve_job_def("demo_sync").execute_in_process(
            partition_key=PK, instance=instance, raise_on_error=False,
            asset_selection=[dg.AssetKey(["demo", "raw_events"]), dg.AssetKey(["demo", "page_view"])],
        )
        assert subset.success
        parts = sorted(p.name for p in _folder(job_parts).glob("page_view_*.parquet"))
        assert len(parts) >= 2
        # the full run without max_file_rows writes one file per event type and lists the parts
        job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9})
        assert _run(build_definitions([job], tmp_path / "staging"), instance).success
        manifest = json.loads((_folder(job) / "_manifest.json").read_text())
        assert manifest["superseded"] == [f"{PK}/{name}" for name in parts]
        assert manifest["deleted"] == []
        assert all((_folder(job) / name).exists() for name in parts)  # local: no allow_deletes


def test_range_with_days_outside_the_window_exports_the_others(tmp_path):
    today = utc_today()
    old, first_ok, second_ok = (today - timedelta(days=d) for d in (366, 365, 364))
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 9})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_sync").execute_in_process(
            instance=instance, raise_on_error=False,
            tags={"dagster/asset_partition_range_start": old.isoformat(),
                  "dagster/asset_partition_range_end": second_ok.isoformat()},
        )
        # days before the window are refused one by one (a warning, recorded by the check); the
        # others are exported and the run succeeds
        assert result.success, failure_messages(result)
        check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "all_days_exported")
        refused = check.metadata["refused"].value
        assert list(refused) == [old.isoformat()] and "older than the 365-day window" in refused[old.isoformat()]
        assert check.metadata["exported"].value == [first_ok.isoformat(), second_ok.isoformat()]
    assert not _folder(job, old.isoformat()).exists()
    for day in (first_ok, second_ok):
        assert (_folder(job, day.isoformat()) / "_manifest.json").exists()


@pytest.mark.integration
def test_gcs_partial_failure_keeps_generations_for_the_next_run(fake_gcs, tmp_path, monkeypatch):
    bucket = fake_gcs.create_bucket("partial-failure")
    state = {"fail_after": None, "uploads": 0}

    def fault(request):
        if request.method == "POST" and request.path.startswith("/upload/"):
            state["uploads"] += 1
            if state["fail_after"] is not None and state["uploads"] > state["fail_after"]:
                body = json.dumps({"error": {"code": 403, "message": "injected"}}).encode()
                return 403, body, {"Content-Type": "application/json"}
        return None

    proxy = RecordingProxy(upstream=fake_gcs.endpoint.split("//")[1], fault=fault)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    job = make_job(tmp_path, destination={"kind": "gcs", "bucket": bucket, "project": "test-project",
                                          "prefix": WRITE_PREFIX})
    defs = build_definitions([job], tmp_path / "staging")
    try:
        with dg.instance_for_test() as instance:
            assert _run(defs, instance).success
            state.update(fail_after=3, uploads=0)  # the re-export overwrites 3 objects, then fails
            failed = _run(defs, instance)
            assert not failed.success
            state.update(fail_after=None)
            again = _run(defs, instance)  # must use the generations of the 3 overwritten objects
            assert again.success, failure_messages(again)
            names = {b.name for b in fake_gcs.client().list_blobs(bucket)}
            assert len(names) == 8
    finally:
        proxy.close()


def test_runs_of_one_partition_never_interleave(tmp_path, monkeypatch):
    """Another process (a concurrent run) holds the partition's lock: the run waits, then refuses."""
    import subprocess
    import sys
    import time

    from userpilot_sync import staging

    lock = tmp_path / "staging" / "demo" / ".locks" / f"{PK}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(staging, "PARTITION_LOCK_WAIT_S", 1.0)
        job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 9})
        defs = build_definitions([job], tmp_path / "staging")
        with dg.instance_for_test() as instance:
            started = time.monotonic()
            result = _run(defs, instance)
            assert not result.success and time.monotonic() - started >= 1.0
            assert "another run is exporting this partition" in "\n".join(failure_messages(result))
            assert not _folder(job).exists()
            holder.kill()
            holder.wait()
            assert _run(defs, instance).success  # the lock is free once the other run is gone
    finally:
        holder.kill()
