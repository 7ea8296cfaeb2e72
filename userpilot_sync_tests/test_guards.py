"""Guards before upload (accounting, no silent shrink) and the per-day volume check.

The filter-typo story from the issue: a good day of ``track`` rows is re-exported with a typo in
``event_names_include``; without the guard its file was replaced in place with 0 rows in a green run.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from userpilot_sync import export as export_module
from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.errors import GuardError
from userpilot_sync.guards import ALLOW_SHRINK_TAG, DayCounts, check_accounting, settings_changes, shrink_violations
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import check_evaluations, make_job, run_sync

PK = last_complete_days(1)[0].isoformat()
TRACK_ONLY = {"event_types": ["track"]}
TYPO = {"event_types": ["track"], "event_names_include": ["Report Exportd"]}


def _folder(job, pk=PK) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_shrink_rules():
    assert shrink_violations({"track": 1001}, {"track": 0}, 0.5)[0].new_rows == 0
    assert shrink_violations({"track": 1000}, {"track": 499}, 0.5)[0].lost_share == pytest.approx(0.501)
    assert shrink_violations({"track": 1000}, {"track": 500}, 0.5) == []  # exactly the limit is allowed
    assert shrink_violations({"track": 0}, {"track": 0}, 0.5) == []  # empty before: nothing to lose
    assert shrink_violations({"track": 10}, {"page_view": 0}, 0.5) == []  # not exported now: not replaced
    assert settings_changes({"filters": {"event_names_include": []}, "layout": "userpilot"},
                            {"filters": {"event_names_include": ["Report Exportd"]}, "layout": "userpilot"}) == [
        'filters.event_names_include: [] → ["Report Exportd"]']


def test_accounting_names_the_term_that_is_off():
    good = DayCounts("demo", PK, 10, {"track": 7, "page_view": 3}, {"track": (7, 5, 1, 1)})
    check_accounting(good)
    with pytest.raises(GuardError, match=r"event type 'track': rows received 7 != exported 5 \+ duplicates dropped 2"):
        check_accounting(DayCounts("demo", PK, 10, {"track": 7, "page_view": 3}, {"track": (7, 5, 2, 1)}))
    with pytest.raises(GuardError, match="the day's 11 rows received != 10 staged"):
        check_accounting(DayCounts("demo", PK, 11, {"track": 7, "page_view": 3}, {"track": (7, 5, 1, 1)}))


def test_a_filter_typo_cannot_replace_a_good_day_with_an_empty_one(tmp_path):
    good = make_job(tmp_path, source={"kind": "demo", "events_per_day": 3000, "seed": 7}, filters=TRACK_ONLY)
    typo = make_job(tmp_path, source={"kind": "demo", "events_per_day": 3000, "seed": 7}, filters=TYPO)
    keys = SyncJobKeys(good)
    with dg.instance_for_test() as instance:
        first = run_sync(build_definitions([good], tmp_path / "staging"), instance, PK)
        assert first.success, failure_messages(first)
        before = _digests(_folder(good))
        track_rows = rows_by_event_type(json.loads((_folder(good) / "_manifest.json").read_text()))["track"]
        assert track_rows > 0

        refused = run_sync(build_definitions([typo], tmp_path / "staging"), instance, PK)
        assert not refused.success
        [message] = failure_messages(refused)
        assert message.startswith(f"sync job 'demo', partition {PK}: refusing to replace the day's export")
        assert f"'track': {track_rows:,} → 0 rows (-100%)" in message
        assert 'filters.event_names_include: [] → ["Report Exportd"]' in message
        assert "--allow-shrink" in message and f"{ALLOW_SHRINK_TAG}=true" in message
        assert _digests(_folder(good)) == before  # files and manifest byte-identical
        check = check_evaluations(instance, keys.manifest, "day_exported")[PK]
        assert not check.passed and "refusing to replace" in check.metadata["reason"].value

        allowed = run_sync(build_definitions([typo], tmp_path / "staging"), instance, PK,
                           tags={ALLOW_SHRINK_TAG: "true"})
        assert allowed.success, failure_messages(allowed)
        manifest = json.loads((_folder(good) / "_manifest.json").read_text())
        track = manifest["event_types"]["track"]
        assert manifest["status"] == "empty" and track["status"] == "empty" and track["rows"] == 0
        assert track["filtered_out"] == track_rows and "event_names_include" in track["reason"]
        volume = check_evaluations(instance, keys.export("track"), "expected_volume")[PK]
        assert not volume.passed and volume.severity == dg.AssetCheckSeverity.ERROR
        assert "filters (event_names_include) removed all" in volume.description


def test_rows_unaccounted_for_refuse_the_day_before_upload(tmp_path, monkeypatch):
    job = make_job(tmp_path, source={"kind": "demo", "events_per_day": 500, "seed": 1})
    original = export_module.ExportPreparer.finish

    def miscounting(self, *args, **kwargs):  # one term off: a bug must never pass silently
        prepared = original(self, *args, **kwargs)
        if prepared.event_type == "page_view":
            prepared.filtered_out += 1
        return prepared

    # every export is finished by an ExportPreparer, prepared alone or with other small exports
    monkeypatch.setattr(export_module.ExportPreparer, "finish", miscounting)
    with dg.instance_for_test() as instance:
        result = run_sync(build_definitions([job], tmp_path / "staging"), instance, PK)
        assert not result.success
        [message] = failure_messages(result)
        assert "rows are unaccounted for" in message and "event type 'page_view'" in message
        assert not _folder(job).exists()  # nothing of the day was written


def test_a_day_at_a_tenth_of_the_usual_volume_warns_on_that_day(tmp_path):
    days = [d.isoformat() for d in last_complete_days(15)]
    normal = make_job(tmp_path, source={"kind": "demo", "events_per_day": 2000, "seed": 5}, filters=TRACK_ONLY,
                      backfill_days_per_run=14)
    low = make_job(tmp_path, source={"kind": "demo", "events_per_day": 200, "seed": 5}, filters=TRACK_ONLY)
    keys = SyncJobKeys(normal)
    with dg.instance_for_test() as instance:
        ranged = run_sync(build_definitions([normal], tmp_path / "staging"), instance, days[0], days[13])
        assert ranged.success, failure_messages(ranged)
        last = run_sync(build_definitions([low], tmp_path / "staging"), instance, days[14])
        assert last.success, failure_messages(last)
        evaluations = check_evaluations(instance, keys.export("track"), "expected_volume")
        assert set(evaluations) == set(days)
        assert all(evaluations[d].passed for d in days[:14])
        assert evaluations[days[0]].metadata["baseline_days"].value == 0  # no history yet
        assert evaluations[days[13]].metadata["baseline_days"].value == 13  # the range's own earlier days
        warn = evaluations[days[14]]
        assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
        assert warn.metadata["baseline_days"].value == 14
        assert 0.05 < warn.metadata["ratio"].value < 0.2
        assert f"partition {days[14]}, event type 'track'" in warn.description


def _cli_setup(tmp_path: Path, monkeypatch, source: str, filters: str = "") -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml").read_text())
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / "demo.yaml").write_text(
        f"name: demo\nsync_id: '10001'\ntitle: Demo\napp_token: NX-demo0001\nsource: {source}\n"
        f"destination: {{kind: local, path: {tmp_path / 'exports'}, prefix: userpilot_events}}\n{filters}")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("USERPILOT_SYNC_JOBS_DIR", str(jobs))
    monkeypatch.setenv("USERPILOT_SYNC_STAGING_DIR", str(tmp_path / "staging"))
    return tmp_path / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001"


def test_cli_an_empty_day_after_normal_days_exits_3_and_prints_the_checks(tmp_path, monkeypatch, capsys):
    import polars as pl

    from userpilot_sync import cli
    from userpilot_sync.partitions import day_window
    from userpilot_sync.source.demo import DemoSource

    before, day = [d.isoformat() for d in last_complete_days(2)]
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    start, end = day_window(last_complete_days(2)[0])
    pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 300, 3).iter_blocks(start, end)]).write_parquet(
        chunks / "export-part1.parquet")  # events of the day before only
    _cli_setup(tmp_path, monkeypatch, f"{{kind: files, path: {chunks}}}")
    assert cli.main(["sync", "--job", "demo", "--partition", before]) == cli.EXIT_OK
    capsys.readouterr()
    assert cli.main(["sync", "--job", "demo", "--partition", day]) == cli.EXIT_CHECK_ERRORS == 3
    err = capsys.readouterr().err
    assert f"ERROR check demo/track:expected_volume on {day}: sync job 'demo', partition {day}, event type 'track': " \
           f"no rows, while the last 1 exported days had a median of" in err
    assert "exit code 3" in err

    assert cli.main(["status", "--job", "demo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    days = {d["partition"]: d for d in doc["days"]}
    assert days[before]["status"] == "complete" and days[day]["status"] == "empty" and days[day]["rows"] == 0
    assert doc["summary"]["complete"] == 1 and doc["summary"]["empty"] == 1


def test_cli_allow_shrink_lets_an_intended_shrink_through(tmp_path, monkeypatch, capsys):
    from userpilot_sync import cli

    source = "{kind: demo, events_per_day: 600, seed: 3}"
    root = _cli_setup(tmp_path, monkeypatch, source, "filters: {event_types: [track]}\n")
    assert cli.main(["sync", "--job", "demo", "--partition", PK]) == 0
    before = _digests(root / PK)
    _cli_setup(tmp_path, monkeypatch, source, "filters: {event_types: [track], event_names_include: ['Report Exportd']}\n")
    capsys.readouterr()
    assert cli.main(["sync", "--job", "demo", "--partition", PK]) == cli.EXIT_FAILED
    assert "refusing to replace the day's export" in capsys.readouterr().err
    assert _digests(root / PK) == before
    # an intended shrink goes through, and the ERROR check (filters removed everything) still says so
    assert cli.main(["sync", "--job", "demo", "--partition", PK, "--allow-shrink"]) == cli.EXIT_CHECK_ERRORS
    assert "filters (event_names_include) removed all" in capsys.readouterr().err
    assert json.loads((root / PK / "_manifest.json").read_text())["status"] == "empty"
