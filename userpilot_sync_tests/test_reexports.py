"""Re-exports: failures never half-overwrite a day, superseded files are found, ranges skip refused
days, runs of one day never interleave (per-day lock held by the export step only)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.defs.resources import StagingResource
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.errors import DestinationError
from userpilot_sync.locks import FileLockBackend
from userpilot_sync.partitions import day_window, last_complete_days, utc_today
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import check_evaluations, lock_holder, make_job, run_sync
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

DAY = last_complete_days(1)[0]
PK = DAY.isoformat()


def _demo_frame(events=600, day=DAY) -> pl.DataFrame:
    start, end = day_window(day)
    return pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", events, 9).iter_blocks(start, end)])


def _run(defs, instance, pk=PK, last=None, **kwargs):
    return run_sync(defs, instance, pk, last, **kwargs)


def _folder(job, pk=PK) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _latest(instance, key: dg.AssetKey, pk: str):
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]), limit=1).records
    return records[0] if records else None


def test_failed_reexport_leaves_the_day_untouched(tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    frame = _demo_frame()
    frame.write_parquet(chunks / "export-part1.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        first = _run(defs, instance)
        assert first.success, failure_messages(first)
        before = _digests(_folder(job))
        # late data: more page views (valid) and one track event with an empty name (invalid)
        late = frame.filter(pl.col("event_type") == "page_view").head(5).with_columns(
            (pl.col("internal_event_id") + "x").alias("internal_event_id"))
        bad = frame.filter(pl.col("event_type") == "track").head(1).with_columns(
            pl.lit("").alias("event_name"), (pl.col("internal_event_id") + "y").alias("internal_event_id"))
        pl.concat([late, bad]).write_parquet(chunks / "export-part2.parquet")
        result = _run(defs, instance)
        assert not result.success
        [text] = failure_messages(result)
        assert text.startswith(f"sync job 'demo', partition {PK}, event type 'track': ")
        # no export of the day was replaced: the old manifest still describes every file exactly
        assert _digests(_folder(job)) == before
        manifest = json.loads((_folder(job) / "_manifest.json").read_text())
        assert manifest["run_id"] == first.run_id
        for f in manifest["files"]:
            assert hashlib.sha256((_folder(job).parent / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        # the instance still records the first export as the day's newest; the day's check says why
        # the re-export failed
        for key in keys.day_assets:
            newest = _latest(instance, key, PK)
            assert newest.run_id == first.run_id, key
            assert newest.asset_materialization.metadata["userpilot/status"].value == "exported", key
        check = check_evaluations(instance, keys.manifest, "day_exported")[PK]
        assert not check.passed and "event type 'track'" in check.metadata["reason"].value


def test_parts_written_without_a_manifest_are_still_superseded(tmp_path, monkeypatch):
    from userpilot_sync.destination.storage import LocalStorage

    job_parts = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9}, max_file_rows=50)
    keys = SyncJobKeys(job_parts)
    put_file = LocalStorage.put_file

    def failing_put_file(self, key, path, **kwargs):  # the upload of page_view's second part fails
        if key.endswith("/page_view_00001.parquet"):
            raise DestinationError(f"injected upload failure for {key}")
        return put_file(self, key, path, **kwargs)

    with dg.instance_for_test() as instance:
        # a run writes the day in parts, then an upload fails: files of the day, no manifest
        monkeypatch.setattr(LocalStorage, "put_file", failing_put_file)
        failed = _run(build_definitions([job_parts], tmp_path / "staging"), instance, resources=_short_wait(tmp_path))
        monkeypatch.setattr(LocalStorage, "put_file", put_file)
        assert not failed.success
        assert "injected upload failure" in "\n".join(failure_messages(failed))
        written = sorted(p.name for p in _folder(job_parts).iterdir())
        assert "_manifest.json" not in written
        assert "page_view_00000.parquet" in written and "page_view_00001.parquet" not in written
        parts = [name for name in written if "_0000" in name]
        assert len(parts) >= 4
        # what the failed upload had written is kept as an observation of the day (ledger)
        observed = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=keys.export("page_view"), asset_partitions=[PK]), limit=1).records
        assert [f["path"] for f in observed[0].asset_observation.metadata["userpilot/files"].value] == [
            f"{PK}/page_view_00000.parquet"]
        # the full run without max_file_rows writes one file per event type and lists every part
        job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9})
        full = _run(build_definitions([job], tmp_path / "staging"), instance, resources=_short_wait(tmp_path))
        assert full.success, failure_messages(full)
        manifest = json.loads((_folder(job) / "_manifest.json").read_text())
        current = {f["path"] for f in manifest["files"]}
        assert manifest["superseded"] == sorted(f"{PK}/{name}" for name in written if f"{PK}/{name}" not in current)
        assert {f"{PK}/{name}" for name in parts} <= set(manifest["superseded"])
        assert manifest["deleted"] == []
        assert all((_folder(job) / name).exists() for name in parts)  # local: no allow_deletes
        md = _latest(instance, keys.manifest, PK).asset_materialization.metadata
        assert md["userpilot/superseded"].value == manifest["superseded"] and md["userpilot/deleted"].value == []


def test_range_with_days_outside_the_window_exports_the_others(tmp_path):
    """A range requested before the window rolled on: its days that left the window are refused
    one by one (recorded per day, nothing written); the others are exported and the run succeeds."""
    today = utc_today()
    old, first_ok, second_ok = ((today - timedelta(days=d)).isoformat() for d in (366, 365, 364))
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 9})
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        # the partitions as they were when the range was requested (the window sensor has not run since)
        instance.add_dynamic_partitions(keys.partitions_name, [old, first_ok, second_ok])
        result = defs.resolve_job_def("demo_sync").execute_in_process(
            instance=instance, raise_on_error=False,
            tags={"dagster/asset_partition_range_start": old, "dagster/asset_partition_range_end": second_ok},
        )
        assert result.success, failure_messages(result)
        for key in keys.day_assets:
            refused = _latest(instance, key, old).asset_materialization.metadata
            assert refused["userpilot/status"].value == "refused", key
            assert "older than the 365-day window" in str(refused["reason"].value), key
            for pk in (first_ok, second_ok):
                assert _latest(instance, key, pk).asset_materialization.metadata["userpilot/status"].value == "exported"
        exported = check_evaluations(instance, keys.manifest, "day_exported")
        assert exported[first_ok].passed and exported[second_ok].passed
        # the refused day gets its own (failing) day_exported result saying why, like a failed day
        assert old in exported, "no day_exported evaluation for the refused day"
        assert not exported[old].passed
        assert "older than the 365-day window" in exported[old].metadata["reason"].value
    assert not _folder(job, old).exists()
    for day in (first_ok, second_ok):
        assert json.loads((_folder(job, day) / "_manifest.json").read_text())["partition"] == day


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
            short = _short_wait(tmp_path)  # a lock the failed run kept fails fast instead of waiting 30 min
            assert _run(defs, instance, resources=short).success
            state.update(fail_after=3, uploads=0)  # the re-export overwrites 3 objects, then fails
            failed = _run(defs, instance, resources=short)
            assert not failed.success
            state.update(fail_after=None)
            again = _run(defs, instance, resources=short)  # must use the generations of the 3 overwritten objects
            assert again.success, failure_messages(again)
            names = {b.name for b in fake_gcs.client().list_blobs(bucket)}
            assert len(names) == 12  # 7 event types, 4 documented files, the manifest
    finally:
        proxy.close()


def _short_wait(tmp_path, wait_s: float = 1.0) -> dict:
    """Resources for execute_in_process: the staging resource with a short lock wait."""
    return {"userpilot_staging": StagingResource(root=str(tmp_path / "staging"), lock_wait_s=wait_s)}


def _lock_is_free(tmp_path, pk: str) -> bool:
    """True when nobody holds the day's lock file (a fresh ``flock`` on a new open file succeeds;
    flock locks are per open file, so this also sees a lock this very process still holds)."""
    import fcntl
    import os

    fd = os.open(str(FileLockBackend(tmp_path / "staging").path("demo", pk)), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the only descriptor releases the probe's own lock
    return True


def test_runs_of_one_partition_never_interleave(tmp_path):
    """Another process (a concurrent run) holds the partition's lock: the run waits, then refuses."""
    import time

    lock = tmp_path / "staging" / "demo" / ".locks" / f"{PK}.lock"
    assert FileLockBackend(tmp_path / "staging").path("demo", PK) == lock
    lock.parent.mkdir(parents=True)
    holder = lock_holder(lock, 60)
    try:
        job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 9})
        keys = SyncJobKeys(job)
        defs = build_definitions([job], tmp_path / "staging")
        with dg.instance_for_test() as instance:
            started = time.monotonic()
            result = _run(defs, instance, resources=_short_wait(tmp_path))
            waited = time.monotonic() - started
            assert not result.success
            assert 1.0 <= waited < 60  # the short lock_wait_s applied (the default waits 30 minutes)
            [text] = failure_messages(result)
            assert text.startswith(f"sync job 'demo', partition {PK}: ")
            assert "another run is exporting this partition" in text and "Nothing was written" in text
            assert not _folder(job).exists()
            assert result.get_asset_materialization_events() == []
            assert all(_latest(instance, key, PK) is None for key in keys.day_assets)
            holder.kill()
            holder.wait()
            again = _run(defs, instance, resources=_short_wait(tmp_path))
            assert again.success, failure_messages(again)  # the lock is free once the other run is gone
            assert (_folder(job) / "_manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_step_ends(tmp_path):
    """flock locks are per open file: a lock a run kept would block the next run in this process."""
    days = [d.isoformat() for d in last_complete_days(3)]
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 9}, backfill_days_per_run=3)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        first = _run(defs, instance, days[-1], resources=_short_wait(tmp_path))
        assert first.success, failure_messages(first)
        assert _lock_is_free(tmp_path, days[-1])
        second = _run(defs, instance, days[-1], resources=_short_wait(tmp_path))  # same day, same process
        assert second.success, failure_messages(second)
        # a range run, then a one-day run of a day inside it
        ranged = _run(defs, instance, days[0], days[-1], resources=_short_wait(tmp_path))
        assert ranged.success, failure_messages(ranged)
        assert all(_lock_is_free(tmp_path, pk) for pk in days)
        inside = _run(defs, instance, days[1], resources=_short_wait(tmp_path))
        assert inside.success, failure_messages(inside)
        manifest = json.loads((_folder(job, days[1]) / "_manifest.json").read_text())
        assert manifest["run_id"] == inside.run_id
        assert json.loads((_folder(job, days[0]) / "_manifest.json").read_text())["run_id"] == ranged.run_id


@pytest.mark.parametrize("cause", ["validation", "upload"])
def test_the_lock_is_released_when_the_step_fails(tmp_path, monkeypatch, cause):
    """A run that fails inside its export step (a day breaking the Event Schema, an upload failing
    in an IO manager) releases the day's lock and removes its staged raw events: the next run of the
    day in the same process does not wait for it."""
    from userpilot_sync.destination.storage import LocalStorage

    chunks = tmp_path / "chunks"
    chunks.mkdir()
    frame = _demo_frame()
    (frame.with_columns(pl.lit("").alias("event_name")) if cause == "validation" else frame).write_parquet(
        chunks / "export-part1.parquet")
    if cause == "upload":
        put_file = LocalStorage.put_file

        def failing_put_file(self, key, path, **kwargs):
            if "/page_view" in key:
                raise DestinationError(f"injected upload failure for {key}")
            return put_file(self, key, path, **kwargs)

        monkeypatch.setattr(LocalStorage, "put_file", failing_put_file)
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        failed = _run(defs, instance, resources=_short_wait(tmp_path))
        assert not failed.success
        text = "\n".join(failure_messages(failed))
        assert ("event_name" if cause == "validation" else "injected upload failure") in text
        assert "another run is exporting" not in text
        assert _lock_is_free(tmp_path, PK), "the failed run still holds the day's lock"
        assert not (tmp_path / "staging" / "demo" / PK).exists(), "the failed run left its staged raw events"
        # the source (or the destination) is fixed: the next run of the day succeeds
        monkeypatch.undo()
        _demo_frame().write_parquet(chunks / "export-part1.parquet")
        again = _run(defs, instance, resources=_short_wait(tmp_path))
        assert again.success, failure_messages(again)
        assert json.loads((_folder(job) / "_manifest.json").read_text())["run_id"] == again.run_id


def test_a_failed_runs_late_cleanup_never_touches_the_next_run(tmp_path, monkeypatch):
    """A run whose upload failed must be finished with its step: nothing of it (its lock, its
    staging clean-up) may act later, e.g. when the garbage collector runs during the next run of
    the day in the same process (the CLI, tests, or any thread of a long-lived process)."""
    import gc

    from userpilot_sync.destination.storage import LocalStorage

    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 600, "seed": 9})
    defs = build_definitions([job], tmp_path / "staging")
    put_file = LocalStorage.put_file
    calls = {"n": 0}

    def failing_put_file(self, key, path, **kwargs):
        if "/page_view" in key:
            raise DestinationError(f"injected upload failure for {key}")
        return put_file(self, key, path, **kwargs)

    def collecting_put_file(self, key, path, **kwargs):  # the collector runs while the next run uploads
        calls["n"] += 1
        if calls["n"] == 2:
            gc.collect()
        return put_file(self, key, path, **kwargs)

    with dg.instance_for_test() as instance:
        monkeypatch.setattr(LocalStorage, "put_file", failing_put_file)
        failed = _run(defs, instance, resources=_short_wait(tmp_path))
        assert not failed.success and "injected upload failure" in "\n".join(failure_messages(failed))
        del failed
        monkeypatch.setattr(LocalStorage, "put_file", collecting_put_file)
        again = _run(defs, instance, resources=_short_wait(tmp_path))
        assert again.success, failure_messages(again)
        assert calls["n"] > 2  # the collector did run during the next run
        manifest = json.loads((_folder(job) / "_manifest.json").read_text())
        assert manifest["run_id"] == again.run_id and sum(rows_by_event_type(manifest).values()) == 600
