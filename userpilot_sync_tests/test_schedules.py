"""Schedules, sync back, the initial backfill and the 365-day window: exact partition keys.

Every tick is checked twice: through the pure functions of ``scheduling.py`` and through the
Dagster schedule/sensor definitions built from the same sync job. The days are dynamic partitions
kept equal to the 365-day window (``defs/partitions.py``): every tick makes sure the days it
requests exist in the instance, and the ``userpilot_partition_window`` sensor rolls them.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import sync_window_partitions
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.errors import WindowError
from userpilot_sync.partitions import (
    check_in_window,
    last_complete_days,
    utc_today,
    window_bounds,
    window_partition_keys,
)
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
PARTITIONS = "userpilot_days_demo"  # the demo sync job's dynamic partitions
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def _days(first: str, last: str) -> list[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _tick(defs: dg.Definitions, name: str, when: datetime, partitions: list[str] | None = None):
    """Evaluate schedule ``name`` at ``when`` on a fresh instance.

    ``partitions`` (when given) receives the demo sync job's partitions in the instance after the
    tick: every tick syncs the window before it requests runs.
    """
    schedule = defs.resolve_schedule_def(name)
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, repository_def=defs.get_repository_def()
    ) as ctx:
        data = schedule.evaluate_tick(ctx)
        if partitions is not None:
            partitions.extend(instance.get_dynamic_partitions(PARTITIONS))
        return data


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
    partitions: list[str] = []
    data = _tick(defs, "demo_daily_sync", TUESDAY_0300, partitions)
    assert _keys(data) == ["2026-03-09"]
    request = data.run_requests[0]
    assert request.run_key == "daily:2026-03-09"
    # the sync-job and trigger tags only: the in-step day lock replaced run-tag concurrency limits
    own = {k: v for k, v in request.tags.items() if not k.startswith("dagster/")}
    assert own == {"userpilot_sync/trigger": "daily", "userpilot_sync/sync_job": "demo"}
    assert request.tags["dagster/partition"] == "2026-03-09"
    # the tick synced the window at its own time: the requested day exists, with the whole window
    assert partitions == _days("2025-03-10", "2026-03-09") and "2026-03-09" in partitions


def test_weekly_tick_monday_exports_previous_seven_days(tmp_path):
    job = make_job(tmp_path, frequency="weekly")
    assert sync_cron(job) == "0 3 * * 1"
    expected = _days("2026-03-02", "2026-03-08")
    assert sync_partitions(job, MONDAY_0300) == expected
    defs = build_definitions([job], tmp_path / "staging")
    schedule = defs.resolve_schedule_def("demo_weekly_sync")
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.execution_timezone == "UTC"
    partitions: list[str] = []
    data = _tick(defs, "demo_weekly_sync", MONDAY_0300, partitions)
    assert _keys(data) == expected
    assert set(expected) <= set(partitions) and partitions == _days("2025-03-09", "2026-03-08")
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
    partitions: list[str] = []
    data = _tick(defs, "demo_sync_back", SUNDAY_0400, partitions)
    keys = _keys(data)
    assert keys == expected and len(set(keys)) == 30
    assert set(expected) <= set(partitions) and partitions == _days("2025-03-08", "2026-03-07")
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
    partitions: list[str] = []
    assert _keys(_tick(build_definitions([job], tmp_path / "staging"), "demo_sync_back", SUNDAY_0400, partitions)) == expected
    # partitions_start is the lower bound of the partitions too
    assert partitions == expected


def test_sync_back_of_365_days_stays_inside_the_window(tmp_path):
    job = make_job(tmp_path, sync_back={"weekday": "sunday", "hour": 4, "days": 365}, partitions_start="2020-01-01")
    keys = sync_back_partitions(job, SUNDAY_0400)
    oldest, newest = window_bounds(SUNDAY_0400)
    assert (oldest, newest) == (date(2025, 3, 8), date(2026, 3, 7))
    assert keys == _days("2025-03-08", "2026-03-07") and len(keys) == 365
    for key in keys:
        check_in_window("demo", date.fromisoformat(key), SUNDAY_0400)  # none refused
    # no partitions_start (the default): the window alone decides
    unbounded = make_job(tmp_path, sync_back={"weekday": "sunday", "hour": 4, "days": 365})
    assert unbounded.partitions_start is None
    tick = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)
    assert sync_back_partitions(unbounded, tick) == _days("2024-06-01", "2025-05-31")
    # a partitions_start clips the days before it
    early = make_job(tmp_path, sync_back={"weekday": "sunday", "hour": 4, "days": 365}, partitions_start="2025-01-01")
    assert sync_back_partitions(early, tick) == _days("2025-01-01", "2025-05-31")
    # through Dagster: 365 runs, each day once, every one of them an existing partition
    partitions: list[str] = []
    data = _tick(build_definitions([unbounded], tmp_path / "staging"), "demo_sync_back", tick, partitions)
    assert _keys(data) == _days("2024-06-01", "2025-05-31") == partitions


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
    # backfill_days: 0, so no initial backfill sensor; the partition-window sensor always runs
    names = {s.name for s in defs.sensors}
    assert "userpilot_partition_window" in names and "demo_initial_backfill" not in names
    assert defs.resolve_sensor_def("userpilot_partition_window").default_status == dg.DefaultSensorStatus.RUNNING


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
    names = {s.name for s in defs.sensors}
    assert "userpilot_partition_window" in names and not [n for n in names if n.endswith("_initial_backfill")]
    with_backfill = build_definitions([make_job(tmp_path, backfill_days=1)], tmp_path / "staging")
    names = {s.name for s in with_backfill.sensors}
    assert [n for n in names if n.endswith("_initial_backfill")] == ["demo_initial_backfill"]
    assert "userpilot_partition_window" in names


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
    job = make_job(tmp_path, backfill_days=10, backfill_days_per_run=4)
    defs = build_definitions([job], tmp_path / "staging")
    sensor = defs.resolve_sensor_def("demo_initial_backfill")
    days = [d.isoformat() for d in last_complete_days(10)]
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
            first = sensor.evaluate_tick(ctx)
        # ranged runs of backfill_days_per_run (4) days, oldest first; the last run takes the rest
        ranges = [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in first.run_requests]
        assert ranges == [(days[0], days[3]), (days[4], days[7]), (days[8], days[9])]
        for request, (start, end) in zip(first.run_requests, ranges):
            assert request.tags == {"userpilot_sync/sync_job": "demo", "userpilot_sync/trigger": "initial_backfill",
                                    RANGE_START: start, RANGE_END: end, "dagster/sensor_name": "demo_initial_backfill"}
            assert request.run_key == f"initial_backfill:{start}..{end}"
            assert request.partition_key is None and request.asset_graph_subset is None
        # the requested days exist as partitions (the sensor synced the window first)
        partitions = instance.get_dynamic_partitions(PARTITIONS)
        assert set(days) <= set(partitions) and partitions == window_partition_keys()
        assert first.cursor == "requested"
        with dg.build_sensor_context(instance=instance, cursor=first.cursor, repository_def=defs.get_repository_def()) as ctx:
            second = sensor.evaluate_tick(ctx)
        assert not second.run_requests
        assert second.skip_message == "the initial backfill was already requested"
    # one run when the backfill fits backfill_days_per_run
    single = build_definitions([make_job(tmp_path, backfill_days=5)], tmp_path / "staging")
    with dg.instance_for_test() as instance, dg.build_sensor_context(
        instance=instance, repository_def=single.get_repository_def()
    ) as ctx:
        data = single.resolve_sensor_def("demo_initial_backfill").evaluate_tick(ctx)
    five = [d.isoformat() for d in last_complete_days(5)]
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in data.run_requests] == [(five[0], five[-1])]


def test_partition_window_sensor_fills_an_empty_instance_with_the_window(tmp_path):
    clipped_start = utc_today() - timedelta(days=10)
    jobs = [make_job(tmp_path), make_job(tmp_path, name="recent", sync_id="10002", partitions_start=clipped_start.isoformat())]
    defs = build_definitions(jobs, tmp_path / "staging")
    sensor = defs.resolve_sensor_def("userpilot_partition_window")
    today = utc_today()
    window = [(today - timedelta(days=365 - i)).isoformat() for i in range(365)]
    with dg.instance_for_test() as instance:
        assert instance.get_dynamic_partitions(PARTITIONS) == []
        with dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
            data = sensor.evaluate_tick(ctx)
        assert not data.run_requests
        # exactly the window's 365 days, oldest first: today - 365 .. yesterday
        partitions = instance.get_dynamic_partitions(PARTITIONS)
        assert partitions == window and len(partitions) == 365
        assert partitions[0] == (today - timedelta(days=365)).isoformat()
        assert partitions[-1] == (today - timedelta(days=1)).isoformat() and today.isoformat() not in partitions
        # partitions_start is a lower bound: the other sync job has only its last 10 days
        recent = instance.get_dynamic_partitions("userpilot_days_recent")
        assert recent == [(clipped_start + timedelta(days=i)).isoformat() for i in range(10)]
        assert data.skip_message == (f"demo: added 365 day(s) {window[0]}..{window[-1]}; "
                                     f"recent: added 10 day(s) {recent[0]}..{recent[-1]}")
        # a day that left the window is removed by the next tick; nothing else changes
        stale = (today - timedelta(days=366)).isoformat()
        instance.add_dynamic_partitions(PARTITIONS, [stale])
        with dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
            again = sensor.evaluate_tick(ctx)
        assert instance.get_dynamic_partitions(PARTITIONS) == window
        assert again.skip_message == ("demo: removed 1 day(s) that left the window; "
                                      "recent: the partitions match the window")


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
    job = make_job(tmp_path, partitions_start="2020-01-01")
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        sync_window_partitions(instance, SyncJobKeys(job))
        partitions = instance.get_dynamic_partitions(PARTITIONS)
        # the window sync never adds a day older than 365 days, even with an older partitions_start
        assert key not in partitions and partitions[0] == (today - timedelta(days=365)).isoformat()
        # a stale partition (the window moved on since it was added): a run for it is refused in the step
        instance.add_dynamic_partitions(PARTITIONS, [key])
        result = defs.resolve_job_def("demo_sync").execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False
        )
        assert not result.success
        assert _failure_text(result) == (
            f"sync job 'demo', partition {key}: older than the 365-day window (the oldest day that can be exported "
            f"today is {(today - timedelta(days=365)).isoformat()}); nothing was written"
        )
        assert not result.get_asset_materialization_events()
        assert not any(instance.fetch_materializations(k, limit=1).records for k in SyncJobKeys(job).day_assets)
    assert not (tmp_path / "exports").exists()
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").rglob("*.parquet"))


def test_today_is_not_a_partition_in_dagster(tmp_path):
    """Today has not ended: the window sync never adds it, so no run can target it."""
    job = make_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    job_def = defs.resolve_job_def("demo_sync")
    today = utc_today()
    with dg.instance_for_test() as instance:
        sync_window_partitions(instance, SyncJobKeys(job))
        keys = instance.get_dynamic_partitions(PARTITIONS)
        assert keys[-1] == (today - timedelta(days=1)).isoformat() and today.isoformat() not in keys
        assert keys[0] == (today - timedelta(days=365)).isoformat() and len(keys) == 365
        assert job_def.partitions_def.get_partition_keys(dynamic_partitions_store=instance) == keys
        with pytest.raises(dg.DagsterUnknownPartitionError, match=today.isoformat()):
            job_def.execute_in_process(partition_key=today.isoformat(), instance=instance)
        assert instance.get_runs() == []  # refused before a run was created
    assert not (tmp_path / "exports").exists()
