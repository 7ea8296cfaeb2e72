"""Notifications from real runs to a real local webhook receiver: once per (sync job, day, event),
re-armed when the day recovers; ``late`` from the freshness check with an injected clock."""

from __future__ import annotations

import json
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import dagster as dg
import polars as pl

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.notifications import notify_late
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.defs.status import day_statuses
from userpilot_sync.notify import RetryPolicy, verify_signature
from userpilot_sync.partitions import day_window, last_complete_days, parse_partition
from userpilot_sync.scheduling import export_deadline
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import make_job, run_sync
from userpilot_sync_tests.test_notify import SECRET, receiver  # noqa: F401  (the local receiver fixture)

DAY = last_complete_days(1)[0]
PK = DAY.isoformat()
FAST = RetryPolicy(attempts=2, initial_wait_s=0.01, max_wait_s=0.05, total_s=5, timeout_s=5)


def _hook(receiver, on):
    return [{"kind": "webhook", "url": f"{receiver.url}/hooks/up", "secret_env": "UP_WEBHOOK_SECRET", "on": on}]


def _posts(receiver, event=None):
    out = []
    for r in receiver.requests:
        body = json.loads(r.body)
        if event is None or body["event"] == event:
            out.append((r, body))
    return out


def test_a_failing_day_is_notified_once_until_it_recovers(tmp_path, receiver, monkeypatch):  # noqa: F811
    monkeypatch.setenv("UP_WEBHOOK_SECRET", SECRET)
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    start, end = day_window(DAY)
    frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 400, 4).iter_blocks(start, end)])
    bad = frame.filter(pl.col("event_type") == "track").head(1).with_columns(
        pl.lit("").alias("event_name"), (pl.col("internal_event_id") + "y").alias("internal_event_id"))
    frame.write_parquet(chunks / "export-part1.parquet")
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)},
                   notifications=_hook(receiver, ["failed", "check_failed"]))
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        bad.write_parquet(chunks / "export-part2.parquet")
        first = run_sync(defs, instance, PK)
        assert not first.success
        [(request, body)] = _posts(receiver)
        assert body["event"] == "failed" and body["partition"] == PK and body["run_id"] == first.run_id
        assert body["sync_job"] == "demo" and body["dedup_key"] == f"demo:{PK}:failed"
        assert "event type 'track'" in body["message"]
        assert verify_signature(SECRET, request.headers["x-userpilot-sync-timestamp"], request.body,
                                request.headers["x-userpilot-sync-signature"])

        again = run_sync(defs, instance, PK)  # fails the same way: no second notice
        assert not again.success and len(_posts(receiver)) == 1

        (chunks / "export-part2.parquet").unlink()
        fixed = run_sync(defs, instance, PK)
        assert fixed.success, failure_messages(fixed)
        assert len(_posts(receiver)) == 1  # 'exported' is not subscribed; the day is re-armed

        bad.write_parquet(chunks / "export-part2.parquet")
        broken = run_sync(defs, instance, PK)
        assert not broken.success
        assert [b["run_id"] for _, b in _posts(receiver, "failed")] == [first.run_id, broken.run_id]


def test_a_missed_deadline_is_notified_once(tmp_path, receiver, monkeypatch):  # noqa: F811
    monkeypatch.setenv("UP_WEBHOOK_SECRET", SECRET)
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 200, "seed": 1},
                   notifications=_hook(receiver, ["late"]))
    keys = SyncJobKeys(job)
    older = (DAY - timedelta(days=1)).isoformat()
    with dg.instance_for_test() as instance:
        assert run_sync(build_definitions([job], tmp_path / "staging"), instance, older).success
        deadline = export_deadline(job, DAY)
        assert deadline == datetime.combine(DAY + timedelta(days=1), time(9), tzinfo=timezone.utc)  # 03:00 + 6 h
        # before the deadline: the day is pending, nothing is sent
        assert notify_late(instance, keys, now=deadline - timedelta(minutes=1), retry=FAST) == []
        statuses = {d.partition: d for d in day_statuses(instance, keys, deadline - timedelta(minutes=1))}
        assert statuses[PK].status == "pending" and statuses[older].status == "complete"
        # after it: 'late' once, for that day only (days before the first export are 'missing', not late)
        after = deadline + timedelta(minutes=1)
        assert notify_late(instance, keys, now=after, retry=FAST) == [PK]
        [(_, body)] = _posts(receiver)
        assert body["event"] == "late" and body["partition"] == PK and body["dedup_key"] == f"demo:{PK}:late"
        assert notify_late(instance, keys, now=after + timedelta(minutes=5), retry=FAST) == []
        assert len(_posts(receiver)) == 1
        statuses = {d.partition: d for d in day_statuses(instance, keys, after)}
        assert statuses[PK].status == "late" and statuses[PK].late
        older_day = (parse_partition(older) - timedelta(days=1)).isoformat()
        assert statuses[older_day].status == "missing"


def test_an_upload_failure_is_notified_and_status_keeps_an_intact_day_complete(tmp_path, receiver, monkeypatch):  # noqa: F811
    from userpilot_sync.destination.storage import LocalStorage
    from userpilot_sync.errors import DestinationError

    monkeypatch.setenv("UP_WEBHOOK_SECRET", SECRET)
    hook = _hook(receiver, ["failed"])
    good = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 2}, notifications=hook,
                    filters={"event_types": ["track"]})
    typo = make_job(tmp_path, source={"kind": "demo", "events_per_day": 300, "seed": 2}, notifications=hook,
                    filters={"event_types": ["track"], "event_names_include": ["nothing matches"]})
    keys = SyncJobKeys(good)
    with dg.instance_for_test() as instance:
        assert run_sync(build_definitions([good], tmp_path / "staging"), instance, PK).success
        # a re-export refused by the shrink guard leaves the day's files intact: still complete
        refused = run_sync(build_definitions([typo], tmp_path / "staging"), instance, PK)
        assert not refused.success
        day = {d.partition: d for d in day_statuses(instance, keys)}[PK]
        assert day.status == "complete" and refused.run_id in day.last_attempt and not day.late
        assert [b["run_id"] for _, b in _posts(receiver, "failed")] == [refused.run_id]

        # an upload that fails inside the IO manager (outside the step's own code) is notified too
        put_file = LocalStorage.put_file

        def failing(self, key, path, **kwargs):
            raise DestinationError(f"injected upload failure for {key}")

        monkeypatch.setattr(LocalStorage, "put_file", failing)
        broken = run_sync(build_definitions([good], tmp_path / "staging"), instance, PK)
        monkeypatch.setattr(LocalStorage, "put_file", put_file)
        assert not broken.success
        posts = _posts(receiver, "failed")
        assert len(posts) == 1  # the day's 'failed' was sent already (dedupe): not again
        fixed = run_sync(build_definitions([good], tmp_path / "staging"), instance, PK)
        assert fixed.success  # re-arms the day
        monkeypatch.setattr(LocalStorage, "put_file", failing)
        again = run_sync(build_definitions([good], tmp_path / "staging"), instance, PK)
        monkeypatch.setattr(LocalStorage, "put_file", put_file)
        assert not again.success
        [(_, body)] = [p for p in _posts(receiver, "failed") if p[1]["run_id"] == again.run_id]
        assert body["partition"] == PK and "injected upload failure" in body["message"]
        day = {d.partition: d for d in day_statuses(instance, keys)}[PK]
        assert day.status == "replacing" and day.run_id == again.run_id
