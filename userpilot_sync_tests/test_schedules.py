"""Schedules, sync back, the initial backfill and the 365-day window: exact partition keys.

Every tick is checked twice: through the pure functions of ``scheduling.py`` and through the
Dagster schedule/sensor definitions built from the same sync job.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync.defs.project import build_definitions
from userpilot_sync.errors import WindowError
from userpilot_sync.partitions import check_in_window, last_complete_days, utc_today, window_bounds
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.scheduling import (
    initial_backfill_partitions,
    sync_back_cron,
    sync_back_partitions,
    sync_cron,
    sync_partitions,
)
from userpilot_sync_tests.fixtures_core import NOW, make_job

UTC = timezone.utc
TUESDAY_0300 = datetime(2026, 3, 10, 3, 0, tzinfo=UTC)
MONDAY_0300 = datetime(2026, 3, 9, 3, 0, tzinfo=UTC)
SUNDAY_0400 = datetime(2026, 3, 8, 4, 0, tzinfo=UTC)
SYNC_BACK_30 = {"weekday": "sunday", "hour": 4, "days": 30}


def _days(first: str, last: str) -> list[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _tick(defs: dg.Definitions, name: str, when: datetime):
    schedule = defs.resolve_schedule_def(name)
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, repository_def=defs.get_repository_def()
    ) as ctx:
        return schedule.evaluate_tick(ctx)


def _keys(data) -> list[str]:
    return [r.partition_key for r in data.run_requests or []]


# ------------------------------------------------------------------------------ daily and weekly
def test_daily_tick_tuesday_exports_monday(tmp_path):
    job = make_job(tmp_path)
    assert sync_cron(job) == "0 3 * * *"
    assert sync_partitions(job, TUESDAY_0300) == ["2026-03-09"]
    # any instant of the UTC day gives the same partition (the tick's UTC day decides)
    assert sync_partitions(job, datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC)) == ["2026-03-09"]
    # a non-UTC instant counts by its UTC day: 04:00+05:00 on 03-10 is 23:00 UTC on 03-09
    assert sync_partitions(job, datetime(2026, 3, 10, 8, 0, tzinfo=timezone(timedelta(hours=5)))) == ["2026-03-09"]
    assert sync_partitions(job, datetime(2026, 3, 10, 4, 0, tzinfo=timezone(timedelta(hours=5)))) == ["2026-03-08"]
    defs = build_definitions([job], tmp_path / "staging")
    data = _tick(defs, "demo_daily_sync", TUESDAY_0300)
    assert _keys(data) == ["2026-03-09"]
    request = data.run_requests[0]
    assert request.run_key == "daily:2026-03-09"
    assert request.tags["userpilot_sync/partition_lock"] == "demo.2026-03-09"
    assert request.tags["userpilot_sync/trigger"] == "daily"
    assert request.tags["userpilot_sync/sync_job"] == "demo"


def test_weekly_tick_monday_exports_previous_seven_days(tmp_path):
    job = make_job(tmp_path, frequency="weekly")
    assert sync_cron(job) == "0 3 * * 1"
    expected = _days("2026-03-02", "2026-03-08")
    assert sync_partitions(job, MONDAY_0300) == expected
    defs = build_definitions([job], tmp_path / "staging")
    schedule = defs.resolve_schedule_def("demo_weekly_sync")
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.execution_timezone == "UTC"
    data = _tick(defs, "demo_weekly_sync", MONDAY_0300)
    assert _keys(data) == expected
    assert [r.run_key for r in data.run_requests] == [f"weekly:{pk}" for pk in expected]
    names = {d.name for d in defs.schedules}
    assert "demo_weekly_sync" in names and "demo_daily_sync" not in names  # no daily sync for a weekly job


def test_sync_back_sunday_tick_re_exports_thirty_days_once_each(tmp_path):
    job = make_job(tmp_path, sync_back=SYNC_BACK_30)
    assert sync_back_cron(job) == "0 4 * * 0"
    expected = _days("2026-02-06", "2026-03-07")
    assert len(expected) == 30
    assert sync_back_partitions(job, SUNDAY_0400) == expected
    defs = build_definitions([job], tmp_path / "staging")
    schedule = defs.resolve_schedule_def("demo_sync_back")
    assert schedule.cron_schedule == "0 4 * * 0" and schedule.execution_timezone == "UTC"
    data = _tick(defs, "demo_sync_back", SUNDAY_0400)
    keys = _keys(data)
    assert keys == expected and len(set(keys)) == 30
    assert {r.run_key for r in data.run_requests} == {f"sync_back:{pk}" for pk in expected}
    assert {r.tags["userpilot_sync/trigger"] for r in data.run_requests} == {"sync_back"}


@pytest.mark.parametrize(
    "weekday, hour, cron",
    [("monday", 0, "0 0 * * 1"), ("wednesday", 12, "0 12 * * 3"), ("saturday", 23, "0 23 * * 6"), ("sunday", 4, "0 4 * * 0")],
)
def test_sync_back_cron(tmp_path, weekday, hour, cron):
    assert sync_back_cron(make_job(tmp_path, sync_back={"weekday": weekday, "hour": hour, "days": 7})) == cron
    assert sync_back_cron(make_job(tmp_path)) is None


def test_sync_back_clipped_to_partitions_start(tmp_path):
    job = make_job(tmp_path, sync_back=SYNC_BACK_30, partitions_start="2026-02-20")
    expected = _days("2026-02-20", "2026-03-07")
    assert sync_back_partitions(job, SUNDAY_0400) == expected
    assert _keys(_tick(build_definitions([job], tmp_path / "staging"), "demo_sync_back", SUNDAY_0400)) == expected


def test_sync_back_of_365_days_stays_inside_the_window(tmp_path):
    job = make_job(tmp_path, sync_back={"weekday": "sunday", "hour": 4, "days": 365}, partitions_start="2020-01-01")
    keys = sync_back_partitions(job, SUNDAY_0400)
    oldest, newest = window_bounds(SUNDAY_0400)
    assert (oldest, newest) == (date(2025, 3, 8), date(2026, 3, 7))
    assert keys == _days("2025-03-08", "2026-03-07") and len(keys) == 365
    for key in keys:
        check_in_window("demo", date.fromisoformat(key), SUNDAY_0400)  # none refused
    # with the default partitions_start the days before 2025-01-01 do not exist: clipped
    early = make_job(tmp_path, sync_back={"weekday": "sunday", "hour": 4, "days": 365})
    tick = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)
    assert sync_back_partitions(early, tick) == _days("2025-01-01", "2025-05-31")


def test_regular_sync_clipped_to_partitions_start(tmp_path):
    job = make_job(tmp_path, frequency="weekly", partitions_start="2026-03-05")
    assert sync_partitions(job, MONDAY_0300) == _days("2026-03-05", "2026-03-08")
    late = make_job(tmp_path, partitions_start="2026-03-10")
    assert sync_partitions(late, TUESDAY_0300) == []
    data = _tick(build_definitions([late], tmp_path / "staging"), "demo_daily_sync", TUESDAY_0300)
    assert data.run_requests == [] or data.run_requests is None
    assert data.skip_message == "no partition in the window"


# ------------------------------------------------------------------------------ disabled sync jobs
def test_disabled_sync_job_ticks_yield_nothing(tmp_path):
    job = make_job(tmp_path, enabled=False, sync_back=SYNC_BACK_30, backfill_days=30)
    assert sync_partitions(job, TUESDAY_0300) == []
    assert sync_back_partitions(job, SUNDAY_0400) == []
    assert initial_backfill_partitions(job, NOW) == []
    defs = build_definitions([job], tmp_path / "staging")
    for name, when in (("demo_daily_sync", TUESDAY_0300), ("demo_sync_back", SUNDAY_0400)):
        data = _tick(defs, name, when)
        assert not data.run_requests
        assert data.skip_message == "sync job 'demo' is disabled"


# ------------------------------------------------------------------------------ default statuses
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, dg.DefaultScheduleStatus.RUNNING),
        ({"schedules_running": False}, dg.DefaultScheduleStatus.STOPPED),
        ({"enabled": False}, dg.DefaultScheduleStatus.STOPPED),
        ({"enabled": False, "schedules_running": True}, dg.DefaultScheduleStatus.STOPPED),
    ],
)
def test_default_schedule_status(tmp_path, overrides, expected):
    job = make_job(tmp_path, sync_back=SYNC_BACK_30, **overrides)
    defs = build_definitions([job], tmp_path / "staging")
    for name in ("demo_daily_sync", "demo_sync_back"):
        schedule = defs.resolve_schedule_def(name)
        assert schedule.default_status == expected, name
        assert schedule.execution_timezone == "UTC"


def test_shipped_demo_schedules_stay_stopped(tmp_path):
    from userpilot_sync.config.loader import load_sync_jobs

    defs = build_definitions(load_sync_jobs(Path(__file__).resolve().parents[1] / "sync_jobs"), tmp_path / "staging")
    sync_schedules = [s for s in defs.schedules if s.name.startswith("demo_") and s.name.endswith("_sync")]
    assert [s.name for s in sync_schedules] == ["demo_daily_sync"]
    assert all(s.default_status == dg.DefaultScheduleStatus.STOPPED for s in defs.schedules)
    assert "demo_initial_backfill" not in {s.name for s in defs.sensors or []}  # backfill_days: 0


# ------------------------------------------------------------------------------ initial backfill
def test_initial_backfill_partitions_pure(tmp_path):
    job = make_job(tmp_path, backfill_days=365)
    keys = initial_backfill_partitions(job, NOW)
    assert keys == _days("2025-03-10", "2026-03-09") and len(keys) == 365
    short = make_job(tmp_path, backfill_days=3)
    assert initial_backfill_partitions(short, NOW) == ["2026-03-07", "2026-03-08", "2026-03-09"]
    clipped = make_job(tmp_path, backfill_days=365, partitions_start="2026-03-01")
    assert initial_backfill_partitions(clipped, NOW) == _days("2026-03-01", "2026-03-09")
    assert initial_backfill_partitions(make_job(tmp_path, backfill_days=0), NOW) == []


def test_backfill_days_zero_has_no_sensor(tmp_path):
    defs = build_definitions([make_job(tmp_path, backfill_days=0)], tmp_path / "staging")
    assert not [s for s in defs.sensors or [] if s.name.endswith("_initial_backfill")]
    with_backfill = build_definitions([make_job(tmp_path, backfill_days=1)], tmp_path / "staging")
    assert [s.name for s in with_backfill.sensors if s.name.endswith("_initial_backfill")] == ["demo_initial_backfill"]


def test_initial_backfill_sensor_statuses(tmp_path):
    enabled = build_definitions([make_job(tmp_path, backfill_days=5)], tmp_path / "staging")
    assert enabled.resolve_sensor_def("demo_initial_backfill").default_status == dg.DefaultSensorStatus.RUNNING
    disabled = build_definitions([make_job(tmp_path, backfill_days=5, enabled=False)], tmp_path / "staging")
    sensor = disabled.resolve_sensor_def("demo_initial_backfill")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance, dg.build_sensor_context(
        instance=instance, repository_def=disabled.get_repository_def()
    ) as ctx:
        data = sensor.evaluate_tick(ctx)
    assert not data.run_requests and data.skip_message == "sync job 'demo' is disabled"
    assert data.cursor is None  # enabling the sync job later still requests the backfill


def test_initial_backfill_sensor_requests_once(tmp_path):
    job = make_job(tmp_path, backfill_days=5)
    defs = build_definitions([job], tmp_path / "staging")
    sensor = defs.resolve_sensor_def("demo_initial_backfill")
    expected = [d.isoformat() for d in last_complete_days(5)]
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
            first = sensor.evaluate_tick(ctx)
        assert len(first.run_requests) == 1
        request = first.run_requests[0]
        assert request.tags["userpilot_sync/trigger"] == "initial_backfill"
        subset = request.asset_graph_subset
        keys_by_asset = {k.to_user_string(): sorted(s.get_partition_keys()) for k, s in subset.partitions_subsets_by_asset_key.items()}
        assert set(keys_by_asset) == {"demo/raw_events", "demo/manifest", *(f"demo/{et}" for et in job.event_types)}
        assert all(keys == expected for keys in keys_by_asset.values())
        with dg.build_sensor_context(instance=instance, cursor=first.cursor, repository_def=defs.get_repository_def()) as ctx:
            second = sensor.evaluate_tick(ctx)
        assert not second.run_requests
        assert second.skip_message == "the initial backfill was already requested"


# ------------------------------------------------------------------------------ the 365-day window
def test_window_bounds_move_with_the_run_day():
    assert window_bounds(NOW) == (date(2025, 3, 10), date(2026, 3, 9))
    assert window_bounds(NOW + timedelta(days=1)) == (date(2025, 3, 11), date(2026, 3, 10))
    assert window_bounds(datetime(2026, 3, 10, 23, 59, 59, 999999, tzinfo=UTC)) == (date(2025, 3, 10), date(2026, 3, 9))
    check_in_window("demo", date(2025, 3, 10), NOW)  # exactly 365 days back: allowed
    check_in_window("demo", date(2026, 3, 9), NOW)  # yesterday: allowed


def test_window_refusals_core_messages_and_nothing_written(tmp_path, staging_root):
    job = make_job(tmp_path)
    with pytest.raises(WindowError) as old:
        sync_partition(job, "2025-03-09", staging_root, now=NOW)  # 366 days before 2026-03-10
    assert str(old.value) == (
        "sync job 'demo', partition 2025-03-09: older than the 365-day window (the oldest day that can be "
        "exported today is 2025-03-10); nothing was written"
    )
    with pytest.raises(WindowError) as today:
        sync_partition(job, "2026-03-10", staging_root, now=NOW)
    assert str(today.value) == (
        "sync job 'demo', partition 2026-03-10: the UTC day has not ended yet (the newest day that can be "
        "exported now is 2026-03-09); nothing was written"
    )
    with pytest.raises(WindowError, match="partition 2026-03-11: the UTC day has not ended yet"):
        sync_partition(job, "2026-03-11", staging_root, now=NOW)
    assert not Path(job.destination.path).exists()
    assert not staging_root.exists() or not any(staging_root.rglob("*.parquet"))


def _failure_text(result) -> str:
    from userpilot_sync.cli import failure_messages

    return "\n".join(failure_messages(result))


def test_window_refusal_366_days_back_in_a_dagster_run(tmp_path):
    today = utc_today()
    key = (today - timedelta(days=366)).isoformat()
    defs = build_definitions([make_job(tmp_path, partitions_start="2020-01-01")], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("demo_sync").execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False
        )
        assert not result.success
        assert (
            f"partition {key}: older than the 365-day window (the oldest day that can be exported today is "
            f"{(today - timedelta(days=365)).isoformat()}); nothing was written"
        ) in _failure_text(result)
        assert not result.get_asset_materialization_events()
    assert not (tmp_path / "exports").exists()
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").rglob("*.parquet"))


def test_today_is_not_a_partition_in_dagster(tmp_path):
    """Today has not ended: the partitions definition does not list it, so no run can target it."""
    defs = build_definitions([make_job(tmp_path)], tmp_path / "staging")
    job_def = defs.resolve_job_def("demo_sync")
    today = utc_today().isoformat()
    keys = job_def.partitions_def.get_partition_keys()
    assert keys[-1] == (utc_today() - timedelta(days=1)).isoformat() and today not in keys
    with dg.instance_for_test() as instance:
        with pytest.raises(Exception, match=today):
            job_def.execute_in_process(partition_key=today, instance=instance)
    assert not (tmp_path / "exports").exists()
