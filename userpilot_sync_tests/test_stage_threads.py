"""Staging on several threads (``staging.stage_days``): source groups are normalised and split per
(day, event type, hour) on ``stage_threads()`` threads, and appended to the staged files in source
order by one thread. The staged files, counts and errors are the same for any number of threads;
``_ordered_map`` keeps order, errors and early stops as one thread would."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from userpilot_sync import staging as staging_module
from userpilot_sync.errors import ConfigError, SourceError, ValidationError
from userpilot_sync.pipeline import extract_and_stage
from userpilot_sync.source import demo as demo_module
from userpilot_sync.source.base import Extraction, SourceBatch
from userpilot_sync.source.demo import DemoSource
from userpilot_sync.staging import STAGE_THREADS_ENV, _ordered_map, stage_threads
from userpilot_sync_tests.fixtures_core import DAY, PARTITION, make_job


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Source groups of ~100 rows, the demo source one batch per 15-minute block: a 3,000-event day
    is staged in ~30 groups, so several are in flight on the staging threads at once."""
    monkeypatch.setattr(staging_module, "COALESCE_ROWS", 100)
    monkeypatch.setattr(demo_module, "BATCH_ROWS", 1)


#: the batch whose group is the last one the source completes before failing after batch 60 (groups of
#: ~3 demo batches); test_a_bad_group_before_a_failing_source_is_the_error_reported checks it is
BAD_BATCH = 56


class Arranged:
    """The demo source with its batches rearranged (or altered) by ``arrange(list) -> iterable``."""

    kind = "demo"

    def __init__(self, arrange=lambda batches: batches, events_per_day: int = 3000):
        self.inner = DemoSource("NX-demo0001", events_per_day=events_per_day, seed=7)
        self.arrange = arrange

    def extract(self, request) -> Extraction:
        extraction = self.inner.extract(request)
        return Extraction(batches=iter(self.arrange(list(extraction.batches))), facts=extraction.facts)


def _staged(tmp_path: Path, monkeypatch, threads: int, days, source) -> dict:
    """Stage ``days`` on ``threads`` threads: every staged file's sha256 and each StagedDay's record
    (paths and times left out)."""
    monkeypatch.setenv(STAGE_THREADS_ENV, str(threads))
    root = tmp_path / f"threads-{threads}"
    staged = extract_and_stage(make_job(root), days, root / "staging", source)
    out = {}
    for key, day in staged.items():
        record = {k: v for k, v in asdict(day).items() if k not in ("path", "staged_at")}
        files = {p.relative_to(day.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(day.root.rglob("*.arrow"))}
        out[key] = {"record": record, "files": files}
    leftovers = [p.name for p in (root / "staging" / "demo").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left in staging: {leftovers}"
    return out


def _with_value(batches, at: int, value: str, column: str = "event_type"):
    """Batch ``at`` with its first row's ``column`` set to ``value``."""
    batch = batches[at]
    table = batch.data if isinstance(batch.data, pa.Table) else pa.Table.from_batches([batch.data])
    index = table.schema.get_field_index(column)
    mask = pa.array([i == 0 for i in range(table.num_rows)])
    table = table.set_column(index, column, pc.if_else(mask, pa.scalar(value), table.column(index)))
    return batches[:at] + [SourceBatch(batch.where, table)] + batches[at + 1:]


@pytest.mark.parametrize("arrange", [
    pytest.param(lambda b: b, id="in-order"),
    pytest.param(lambda b: list(reversed(b)), id="backwards"),
    pytest.param(lambda b: b + b[: len(b) // 4], id="replayed-quarter"),
])
def test_staged_files_and_counts_do_not_depend_on_the_threads(tmp_path, monkeypatch, arrange):
    days = [DAY - timedelta(days=2), DAY - timedelta(days=1), DAY]
    for span in ([DAY], days):
        results = [_staged(tmp_path / str(len(span)), monkeypatch, threads, span, Arranged(arrange))
                   for threads in (1, 2, 3)]
        assert results[0], "nothing was staged"
        assert sum(d["record"]["rows_received"] for d in results[0].values()) >= 3000 * len(span)
        assert all(d["files"] for d in results[0].values())
        assert results[1] == results[0]
        assert results[2] == results[0]


def test_an_unknown_event_type_gives_the_same_error_on_any_number_of_threads(tmp_path, monkeypatch):
    # one day: refused with the first bad group's message, although the next groups (batches ~10-15,
    # 'tracked') are split at the same time on other threads and fail too
    messages = []
    for threads in (1, 2, 3):
        monkeypatch.setenv(STAGE_THREADS_ENV, str(threads))
        root = tmp_path / f"one-{threads}"
        with pytest.raises(ValidationError) as caught:
            extract_and_stage(make_job(root), [DAY], root / "staging", Arranged(
                lambda b: _with_value(_with_value(_with_value(b, 13, "tracked"), 10, "tracked"), 7, "bogus")))
        messages.append(str(caught.value))
        assert [p for p in (root / "staging").rglob("*") if p.is_file()] == []
    assert messages[0] == messages[1] == messages[2]
    assert "'bogus'" in messages[0] and f"partition {PARTITION}" in messages[0]
    # a range: the day is marked failed with the same message, the other days staged as usual
    days = [DAY - timedelta(days=1), DAY]
    ranged = [_staged(tmp_path / "range", monkeypatch, threads, days,
                      Arranged(lambda b: _with_value(b, len(b) - 3, "bogus")))
              for threads in (1, 2)]
    assert ranged[0] == ranged[1]
    assert "'bogus'" in ranged[0][PARTITION]["record"]["error"]


def _refused_on_any_threads(tmp_path: Path, monkeypatch, source, error: type, match: str) -> None:
    """Staging one day from ``source`` raises ``error`` on 1 and 2 threads and leaves no file."""
    for threads in (1, 2):
        monkeypatch.setenv(STAGE_THREADS_ENV, str(threads))
        root = tmp_path / str(threads)
        with pytest.raises(error, match=match):
            extract_and_stage(make_job(root), [DAY], root / "staging", source)
        assert [p for p in (root / "staging").rglob("*") if p.is_file() or p.name.startswith(".")] == []
        assert not [t.name for t in threading.enumerate() if t.name.startswith("userpilot_sync-")]


def test_a_source_failing_midway_raises_its_error_and_leaves_nothing(tmp_path, monkeypatch):
    def failing(batches):
        yield from batches[:60]
        raise SourceError("chunk 61 is broken")

    _refused_on_any_threads(tmp_path, monkeypatch, Arranged(failing), SourceError, "chunk 61 is broken")


def test_a_bad_group_before_a_failing_source_is_the_error_reported(tmp_path, monkeypatch):
    """Errors surface in source order: an unknown event type in the last group the source completes
    wins over the source failing right after it, as with one thread. With two threads the source's
    error is read while that group is still being split or waits its turn (the failure is reached)."""
    reached = []

    def bad_then_failing(batches):
        yield from _with_value(batches, BAD_BATCH, "bogus")[:60]
        reached.append(True)
        raise SourceError("chunk 61 is broken")

    _refused_on_any_threads(tmp_path, monkeypatch, Arranged(bad_then_failing), ValidationError, "'bogus'")
    assert reached, "the source's failure was never read: the case does not test what it says"


def test_a_bad_batch_before_a_broken_one_in_a_group_is_the_error_reported(tmp_path, monkeypatch):
    """A coalesced group with an error is redone batch by batch: an unknown event type in batch 7
    comes before batch 8's unreadable metadata, as batch by batch, on any number of threads."""
    def two_bad(batches):
        return _with_value(_with_value(batches, 8, "not json", column="metadata"), 7, "bogus")

    _refused_on_any_threads(tmp_path, monkeypatch, Arranged(two_bad), ValidationError, "'bogus'")
    # and the broken batch alone is refused as unreadable, naming it
    _refused_on_any_threads(tmp_path / "alone", monkeypatch,
                            Arranged(lambda b: _with_value(b, 8, "not json", column="metadata")),
                            SourceError, "metadata")


def test_ordered_map_keeps_order_and_uses_the_threads():
    running, peak, lock = [0], [0], threading.Lock()

    def slow(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 if i % 2 == 0 else 0.001)  # later items often finish first
        with lock:
            running[0] -= 1
        return i * 10

    assert list(_ordered_map(slow, range(20), threads=2)) == [i * 10 for i in range(20)]
    assert peak[0] == 2
    assert list(_ordered_map(slow, range(5), threads=1)) == [0, 10, 20, 30, 40]
    assert list(_ordered_map(slow, [], threads=2)) == []


def test_ordered_map_raises_errors_in_order():
    def fn(i: int) -> int:
        if i == 3:
            time.sleep(0.05)  # the failing item is slower than the ones after it
            raise ValueError("item 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 3"):
        for value in _ordered_map(fn, range(10), threads=2):
            seen.append(value)
    assert seen == [0, 1, 2]

    def items():  # the items' own error comes after the results of the items before it
        yield from range(4)
        raise OSError("source gone")

    seen = []
    with pytest.raises(OSError, match="source gone"):
        for value in _ordered_map(lambda i: i, items(), threads=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3]


def test_ordered_map_closed_early_starts_nothing_more():
    started = []

    def fn(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    results = _ordered_map(fn, range(100), threads=2)
    assert next(results) == 0
    results.close()
    count = len(started)
    time.sleep(0.05)
    assert len(started) == count <= 3
    assert not any(t.name.startswith("userpilot_sync-normalize") for t in threading.enumerate())


def test_stage_threads_setting(monkeypatch):
    monkeypatch.delenv(STAGE_THREADS_ENV, raising=False)
    assert 1 <= stage_threads() <= 2
    monkeypatch.setenv(STAGE_THREADS_ENV, "3")
    assert stage_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(STAGE_THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=STAGE_THREADS_ENV):
            stage_threads()


def test_a_bad_thread_setting_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGE_THREADS_ENV, "two")
    with pytest.raises(ConfigError, match=STAGE_THREADS_ENV):
        extract_and_stage(make_job(tmp_path), [DAY], tmp_path / "staging", Arranged())
    assert not any((tmp_path / "staging").rglob(".staging*"))
