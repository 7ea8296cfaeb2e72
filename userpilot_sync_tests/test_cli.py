"""The command line used by make run: days and backfill ranges through a persistent instance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync import cli
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days

REPO = Path(__file__).resolve().parents[1]
SYNC_FOLDER = "userpilot_datasync_10001_NX-demo0001"


def _setup(tmp_path: Path, monkeypatch, extra: str = "", **replace: str) -> Path:
    """A DAGSTER_HOME with the deploy instance settings and a small demo sync job; returns the export root."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    text = (REPO / "sync_jobs" / "demo.yaml").read_text()
    text = text.replace("path: exports", f"path: {tmp_path / 'exports'}").replace("events_per_day: 5000", "events_per_day: 400")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    (jobs / "demo.yaml").write_text(text + extra)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("USERPILOT_SYNC_JOBS_DIR", str(jobs))
    monkeypatch.setenv("USERPILOT_SYNC_STAGING_DIR", str(tmp_path / "staging"))
    return tmp_path / "exports" / "userpilot_events" / SYNC_FOLDER


def test_cli_backfill_range_and_days(tmp_path, monkeypatch, capsys):
    root = _setup(tmp_path, monkeypatch, extra="backfill_days_per_run: 2\n")
    days = [d.isoformat() for d in last_complete_days(3)]
    assert cli.main(["sync", "--job", "demo", "--from", days[0], "--to", days[2]]) == 0
    out = capsys.readouterr().out
    # 3 days with 2 days per run -> two runs: a 2-day range and a single day
    assert f"partition {days[0]}...{days[1]} ok" in out and f"partition {days[2]} ok" in out
    assert "sync job demo: lookups ok" in out
    for pk in days:
        manifest = json.loads((root / pk / "_manifest.json").read_text())
        assert manifest["partition"] == pk and sum(rows_by_event_type(manifest).values()) == 400
    assert "Newest manifest" in out and f'"partition": "{days[2]}"' in out
    assert (root / "lookups" / "flows.parquet").exists() and not (root / "definitions").exists()
    # the runs are in the persistent instance, tagged with the sync job and the trigger
    with dg.DagsterInstance.get() as instance:
        runs = list(reversed(instance.get_runs()))  # oldest first
        assert [r.job_name for r in runs] == ["demo_sync", "demo_sync", "demo_lookups_refresh"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert all(r.tags["userpilot_sync/sync_job"] == "demo" and r.tags["userpilot_sync/trigger"] == "cli"
                   for r in runs)
        ranged, single = runs[0].tags, runs[1].tags
        assert (ranged["dagster/asset_partition_range_start"], ranged["dagster/asset_partition_range_end"]) == (
            days[0], days[1])
        assert single["dagster/partition"] == days[2]
        # the CLI made sure the days exist as partitions (the window)
        assert set(days) <= set(instance.get_dynamic_partitions("userpilot_days_demo"))
    assert cli.main(["sync", "--job", "nope"]) == 2
    assert "unknown sync job 'nope'; configured: demo" in capsys.readouterr().err


def test_cli_prints_the_one_line_cause_of_a_failed_run(tmp_path, monkeypatch, capsys):
    root = _setup(tmp_path, monkeypatch, **{"enabled: true": "enabled: false"})
    pk = last_complete_days(1)[0].isoformat()
    assert cli.main(["sync", "--job", "demo", "--partition", pk]) == 1
    captured = capsys.readouterr()
    assert f"sync job demo: partition {pk} FAILED" in captured.out
    lines = captured.err.splitlines()
    # the dg.Failure's description, indented, without a step-key prefix ("demo_day: ...")
    assert lines[0].startswith(f"    sync job 'demo', partition {pk}: the sync job is disabled"), captured.err
    assert "demo_day" not in captured.err
    assert lines[-1] == f"1 partition(s) failed: {pk}"
    assert "sync job demo: lookups" not in captured.out  # no lookups refresh after a failed sync
    assert not root.exists()


def test_cli_argument_mistakes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sync", "--to", "2026-01-16"])
    assert exit_.value.code == 2 and "--to needs --from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sync", "--days", "3", "--partition", "2026-01-16"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_missing_api_key_variable_refuses_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch, **{
        "source:\n  kind: demo\n  events_per_day: 400\n  seed: 42":
            "source:\n  kind: export_api\n  base_url: http://127.0.0.1:9\n  api_key_env: CLI_TEST_MISSING_KEY"})
    monkeypatch.delenv("CLI_TEST_MISSING_KEY", raising=False)
    day = last_complete_days(1)[0].isoformat()
    assert cli.main(["sync", "--job", "demo", "--partition", day]) == 1
    err = capsys.readouterr().err
    assert (f"sync job demo: partition {day} REFUSED before the run started: the environment variable "
            f"CLI_TEST_MISSING_KEY is not set") in err
    assert "Traceback" not in err
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs() == []
    assert not (tmp_path / "exports").exists()


def test_the_quiet_cli_still_prints_what_a_run_warned_about(tmp_path, monkeypatch, capsys):
    import polars as pl

    from userpilot_sync.partitions import day_window
    from userpilot_sync.source.demo import DemoSource

    yesterday, before = last_complete_days(2)[1], last_complete_days(2)[0]
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    start, end = day_window(before)
    pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 300, 1).iter_blocks(start, end)]).write_parquet(
        chunks / "export.parquet")  # the day before has events, yesterday has none
    _setup(tmp_path, monkeypatch, **{"source:\n  kind: demo\n  events_per_day: 400\n  seed: 42":
                                     f"source:\n  kind: files\n  path: {chunks}"})
    assert cli.main(["sync", "--job", "demo", "--partition", before.isoformat(), "--partition",
                     yesterday.isoformat()]) == cli.EXIT_CHECK_ERRORS  # an empty day after a normal one
    err = capsys.readouterr().err
    assert f"ERROR check demo/page_view:expected_volume on {yesterday.isoformat()}" in err
    assert (f"warning: check demo/raw_events:not_unexpectedly_empty on {yesterday.isoformat()}: sync job 'demo', "
            f"partition {yesterday.isoformat()}: the source returned no events, but the previous day had 300") in err
