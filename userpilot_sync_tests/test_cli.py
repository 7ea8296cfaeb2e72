"""The command line used by make run: days and backfill ranges through a persistent instance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from userpilot_sync import cli
from userpilot_sync.partitions import last_complete_days

REPO = Path(__file__).resolve().parents[1]


def test_cli_backfill_range_and_days(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    text = (REPO / "sync_jobs" / "demo.yaml").read_text()
    text = text.replace("path: exports", f"path: {tmp_path / 'exports'}").replace("events_per_day: 5000", "events_per_day: 400")
    (jobs / "demo.yaml").write_text(text + "backfill_days_per_run: 2\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("USERPILOT_SYNC_JOBS_DIR", str(jobs))
    monkeypatch.setenv("USERPILOT_SYNC_STAGING_DIR", str(tmp_path / "staging"))
    days = [d.isoformat() for d in last_complete_days(3)]
    assert cli.main(["sync", "--job", "demo", "--from", days[0], "--to", days[2]]) == 0
    out = capsys.readouterr().out
    # 3 days with 2 days per run -> two runs: a 2-day range and a single day
    assert f"partition {days[0]}...{days[1]} ok" in out and f"partition {days[2]} ok" in out
    root = tmp_path / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001"
    for pk in days:
        manifest = json.loads((root / pk / "_manifest.json").read_text())
        assert manifest["partition"] == pk and sum(manifest["event_types"].values()) == 400
    assert "Newest manifest" in out and (root / "definitions" / "flows.parquet").exists()
    assert cli.main(["sync", "--job", "nope"]) == 2


def test_cli_argument_mistakes(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        cli.main(["sync", "--to", "2026-01-16"])
    assert exit_.value.code == 2 and "--to needs --from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sync", "--days", "3", "--partition", "2026-01-16"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
