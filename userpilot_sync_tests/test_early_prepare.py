"""Early preparation (``pipeline.stage_and_prepare``): hours are prepared while the source is still
read, and the result is exactly what staging everything first and preparing after gives — for
sources in time order, out of order, with late duplicates, with bad rows, with a failing source,
and after the process is killed mid-way."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from userpilot_sync import export as export_module
from userpilot_sync import staging as staging_module
from userpilot_sync.source import demo as demo_module
from userpilot_sync.errors import SourceError, ValidationError
from userpilot_sync.faults import PAUSE_AT_ENV, PAUSE_DIR_ENV
from userpilot_sync.pipeline import EARLY_PREPARE_ENV, early_prepare_enabled, stage_and_prepare, sync_partition
from userpilot_sync.procs import process_alive
from userpilot_sync.source.base import Extraction, SourceBatch
from userpilot_sync.source.demo import DemoSource
from userpilot_sync.staging import remove_leftovers
from userpilot_sync_tests.fixtures_core import DAY, NOW, PARTITION, make_job
from userpilot_sync_tests.fixtures_faults import kill_worker, wait_for_pause

FORMATS = [{"format": "parquet"}, {"format": "csv"}]


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Groups of 150 staged rows and source groups of ~100 rows, the demo source one batch per
    15-minute block: a 3,000-event demo day is prepared in many groups, most of them while the
    source is still read."""
    monkeypatch.setattr(export_module, "VALIDATION_ROWS", 150)
    monkeypatch.setattr(staging_module, "COALESCE_ROWS", 100)
    monkeypatch.setattr(demo_module, "BATCH_ROWS", 1)


class Rearranged:
    """The demo source with its batches rearranged (or altered) by ``arrange(list) -> list``."""

    kind = "demo"

    def __init__(self, events_per_day: int, arrange=lambda batches: batches):
        self.inner = DemoSource("NX-demo0001", events_per_day=events_per_day, seed=7)
        self.arrange = arrange

    def extract(self, request) -> Extraction:
        extraction = self.inner.extract(request)
        return Extraction(batches=iter(self.arrange(list(extraction.batches))), facts=extraction.facts)


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _outcome(result) -> dict:
    """Everything a day's preparation decided, comparable across runs (paths left out, bytes kept)."""
    out = {}
    for pk, prepared in result.prepared.items():
        if isinstance(prepared, ValidationError):
            out[pk] = str(prepared)
            continue
        out[pk] = {et: {"rows": p.rows, "staged": p.rows_staged, "dupes": p.duplicates_dropped,
                        "filtered": p.filtered_out, "entities": p.entity_types, "source_rows": p.source_rows,
                        "parts": {fmt: [(x["rows"], x["bytes"], x["sha256"], _digest(x["path"])) for x in parts]
                                  for fmt, parts in p.parts.items()},
                        "kept": [_digest(f) for f in p.files]}
                   for et, p in prepared.items()}
    return out


def _run(tmp_path: Path, name: str, monkeypatch, source, days, *, early: bool, **job):
    monkeypatch.setenv(EARLY_PREPARE_ENV, "1" if early else "0")
    root = tmp_path / name
    result = stage_and_prepare(make_job(root, formats=FORMATS, **job), days, root / "staging", source)
    leftovers = [p.name for p in (root / "staging" / "demo").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left in staging: {leftovers}"
    return result


def _both(tmp_path, monkeypatch, source_factory, days, **job):
    serial = _run(tmp_path, "serial", monkeypatch, source_factory(), days, early=False, **job)
    early = _run(tmp_path, "early", monkeypatch, source_factory(), days, early=True, **job)
    return serial, early


def test_same_exports_as_staging_first_for_one_day_and_a_range(tmp_path, monkeypatch):
    days = [DAY - timedelta(days=2), DAY - timedelta(days=1), DAY]
    for span in ([DAY], days):
        serial, early = _both(tmp_path / str(len(span)), monkeypatch, lambda: Rearranged(3000), span,
                              userpilot_files=["all_users", "feature_tags_breakdown"])
        assert _outcome(early) == _outcome(serial)
        assert early.early_groups > 3, early  # groups were prepared while the source was read
        assert early.redone == []
        # the staged days are in place and their prepared exports point into them
        for pk, prepared in early.prepared.items():
            root = Path(early.staged[pk].path)
            assert root.name == pk and root.is_dir()
            for et, export in prepared.items():
                for parts in export.parts.values():
                    assert all(Path(x["path"]).is_relative_to(root / "prepared" / et) for x in parts)
                assert all(Path(f).is_relative_to(root / "prepared" / et) for f in export.files)
                assert (root / "prepared" / et / export_module.PREPARED_RECORD).exists()


def test_out_of_order_source_redoes_what_it_must_and_matches(tmp_path, monkeypatch):
    def backwards(batches):
        return list(reversed(batches))

    def interleaved(batches):  # the second half of the day first, then the first
        half = len(batches) // 2
        return batches[half:] + batches[:half]

    for arrange in (backwards, interleaved):
        serial, early = _both(tmp_path / arrange.__name__, monkeypatch, lambda: Rearranged(3000, arrange), [DAY])
        assert _outcome(early) == _outcome(serial)
        if arrange is interleaved:
            assert early.redone, "the first half of the day arrived after the second half was prepared"


def test_late_duplicates_are_dropped_as_without_early_preparation(tmp_path, monkeypatch):
    def replay(batches):  # the first quarter of the day delivered again at the end (exact duplicates)
        return batches + batches[: len(batches) // 4]

    serial, early = _both(tmp_path, monkeypatch, lambda: Rearranged(3000, replay), [DAY])
    assert _outcome(early) == _outcome(serial)
    assert sum(p.duplicates_dropped for p in early.prepared[PARTITION].values()) > 0
    assert early.redone  # the replayed hours had been prepared already


def _with_bad_row(batches, at: int):
    """A row of another app in batch ``at`` (pandera refuses it when that hour is validated)."""
    batch = batches[at]
    table = batch.data if isinstance(batch.data, pa.Table) else pa.Table.from_batches([batch.data])
    index = table.schema.get_field_index("app_token")
    mask = pa.array([i == 0 for i in range(table.num_rows)])
    table = table.set_column(index, "app_token", pc.if_else(mask, pa.scalar("NX-other0001"), table.column(index)))
    return batches[:at] + [SourceBatch(batch.where, table)] + batches[at + 1:]


def test_a_bad_row_refuses_the_day_with_the_same_error(tmp_path, monkeypatch):
    serial, early = _both(tmp_path, monkeypatch, lambda: Rearranged(3000, lambda b: _with_bad_row(b, 5)), [DAY])
    assert isinstance(early.prepared[PARTITION], ValidationError)
    assert "NX-other0001" in str(early.prepared[PARTITION]) or "app_token" in str(early.prepared[PARTITION])
    assert _outcome(early) == _outcome(serial)


def test_a_source_failing_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing(batches):
        def gen():
            yield from batches[:60]  # well past the first groups prepared early
            raise SourceError("chunk 61 is broken")
        return gen()

    class Failing(Rearranged):
        def extract(self, request):
            extraction = self.inner.extract(request)
            return Extraction(batches=failing(list(extraction.batches)), facts=extraction.facts)

    monkeypatch.setenv(EARLY_PREPARE_ENV, "1")
    job = make_job(tmp_path, formats=FORMATS)
    with pytest.raises(SourceError, match="chunk 61 is broken"):
        stage_and_prepare(job, [DAY], tmp_path / "staging", Failing(3000))
    assert [p for p in (tmp_path / "staging").rglob("*") if p.is_file()] == []


def test_setting(monkeypatch):
    monkeypatch.setenv(EARLY_PREPARE_ENV, "on")
    assert early_prepare_enabled() is True
    monkeypatch.delenv(EARLY_PREPARE_ENV)
    assert early_prepare_enabled() is False
    monkeypatch.setenv(EARLY_PREPARE_ENV, "sometimes")
    with pytest.raises(Exception, match=EARLY_PREPARE_ENV):
        early_prepare_enabled()


_CHILD = """
import sys
from pathlib import Path
from userpilot_sync import export, staging
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.source import demo
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job
export.VALIDATION_ROWS = 150
staging.COALESCE_ROWS = 100
demo.BATCH_ROWS = 1
root = Path(sys.argv[1])
sync_partition(make_job(root, formats={formats!r}), PARTITION, root / "staging", now=NOW)
"""


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _digest(str(p))
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_manifest.json"}


def test_killed_while_preparing_early_then_run_again(tmp_path, monkeypatch):
    """kill -9 while a group of hours is being prepared early: the temporary staging folder (staged
    hours and encoded parts) is left, nothing reached the destination; the next run removes the
    leftovers and exports the day exactly as an undisturbed run does."""
    clean = tmp_path / "clean"
    sync_partition(make_job(clean, formats=FORMATS), PARTITION, clean / "staging", now=NOW)

    root = tmp_path / "killed"
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = dict(os.environ, **{PAUSE_AT_ENV: "prepared_early", PAUSE_DIR_ENV: str(pauses), EARLY_PREPARE_ENV: "1"})
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD.format(formats=FORMATS)), str(root)],
                             env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        pid = wait_for_pause(pauses, "prepared_early", timeout=120, alive=lambda: child.poll() is None)
        assert pid == child.pid
        kill_worker(pid)
    finally:
        child.kill()
        child.wait()
    staging = root / "staging" / "demo"
    temporary = [p for p in staging.iterdir() if p.name.startswith(".staging-")]
    assert temporary and any((t / PARTITION / "prepared").is_dir() for t in temporary)
    assert not (root / "exports").exists() or _digests(root / "exports") == {}
    removed = remove_leftovers(root / "staging", "demo", pid_alive=process_alive, day_free=lambda day: True)
    assert {Path(r.path).name for r in removed} >= {t.name for t in temporary}

    monkeypatch.setenv(EARLY_PREPARE_ENV, "1")
    sync_partition(make_job(root, formats=FORMATS), PARTITION, root / "staging", now=NOW)
    assert _digests(root / "exports") == _digests(clean / "exports")
    assert [p.name for p in staging.iterdir() if p.name.startswith(".")] == []
