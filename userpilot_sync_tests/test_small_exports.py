"""Small exports validated together (``export.prepare_small_exports``, used by
``pipeline.prepare_days``): the event types of the days of a range that are one group of hours each
are validated with one pandera call per batch of days. Files, counts and errors must be exactly
what preparing each export alone gives: for clean days, for a day with a row of another app, for a
day whose ids clash, and for a day whose rows lie outside it."""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from userpilot_sync import export as export_module
from userpilot_sync import staging as staging_module
from userpilot_sync.errors import ValidationError
from userpilot_sync.pipeline import EARLY_PREPARE_ENV, extract_and_stage, prepare_days, stage_and_prepare
from userpilot_sync.schema import validation as validation_module
from userpilot_sync.source import demo as demo_module
from userpilot_sync.source.base import SourceBatch
from userpilot_sync_tests.fixtures_core import DAY, make_job
from userpilot_sync_tests.test_early_prepare import Rearranged, _outcome, _with_bad_row

FORMATS = [{"format": "parquet"}, {"format": "csv"}]
DAYS = [DAY - timedelta(days=n) for n in (4, 3, 2, 1, 0)]
PER_DAY_BATCHES = 96  # the demo source's 15-minute blocks (BATCH_ROWS = 1)


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Days of 2,000 events; a small export is under 1,000 staged rows (track and page_view are
    not, the others are), batches of days up to 1,000 rows."""
    monkeypatch.setattr(export_module, "VALIDATION_ROWS", 1000)
    monkeypatch.setattr(staging_module, "COALESCE_ROWS", 100)
    monkeypatch.setattr(demo_module, "BATCH_ROWS", 1)
    monkeypatch.setenv(EARLY_PREPARE_ENV, "0")


class Calls:
    """Counts pandera validations (calls of validate_export_frame), calling through."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = validation_module.validate_export_frame

        def counted(*args, **kwargs):
            self.n += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(export_module, "validate_export_frame", counted)


ORIGINAL_IS_SMALL = export_module.is_small_export


def _run(tmp_path, name, monkeypatch, arrange, *, together: bool, **job):
    # alone: every export prepared on its own, as before batches existed
    monkeypatch.setattr(export_module, "is_small_export", ORIGINAL_IS_SMALL if together else (lambda staged, et: False))
    calls = Calls(monkeypatch)
    root = tmp_path / name
    result = stage_and_prepare(make_job(root, formats=FORMATS, **job), DAYS, root / "staging", Rearranged(2000, arrange))
    return result, calls.n


def _both(tmp_path, monkeypatch, arrange=lambda b: b, **job):
    alone, alone_calls = _run(tmp_path, "alone", monkeypatch, arrange, together=False, **job)
    together, together_calls = _run(tmp_path, "together", monkeypatch, arrange, together=True, **job)
    assert _outcome(together) == _outcome(alone)
    return alone, together, alone_calls, together_calls


def test_clean_days_give_the_same_files_with_fewer_validations(tmp_path, monkeypatch):
    alone, together, alone_calls, together_calls = _both(
        tmp_path, monkeypatch, userpilot_files=["all_users", "feature_tags_breakdown"],
        filters={"event_names_exclude": ["*:SEEN"]})
    assert all(isinstance(p, dict) for p in together.prepared.values())
    assert together_calls < alone_calls / 2, (together_calls, alone_calls)


def test_a_bad_row_refuses_its_day_only_with_the_same_error(tmp_path, monkeypatch):
    at = 2 * PER_DAY_BATCHES + 5  # a batch of the third day
    alone, together, *_ = _both(tmp_path, monkeypatch, lambda b: _with_bad_row(b, at))
    refused = {pk for pk, p in together.prepared.items() if isinstance(p, ValidationError)}
    assert refused == {DAYS[2].isoformat()}
    error = str(together.prepared[DAYS[2].isoformat()])
    assert f"partition {DAYS[2].isoformat()}" in error and "NX-other0001" in error


def _with_clash(batches, at: int):
    """Batch ``at`` with its first row repeated under the same id, its source changed: an id seen
    twice with different content."""
    batch = batches[at]
    table = batch.data if isinstance(batch.data, pa.Table) else pa.Table.from_batches([batch.data])
    first = table.slice(0, 1)
    index = first.schema.get_field_index("source")
    twin = first.set_column(index, "source", pa.array(["clash-src"], first.schema.field("source").type))
    return batches[:at] + [SourceBatch(batch.where, pa.concat_tables([table, twin]))] + batches[at + 1:]


def test_ids_that_clash_refuse_their_day_only_with_the_same_error(tmp_path, monkeypatch):
    at = 3 * PER_DAY_BATCHES + 40
    alone, together, *_ = _both(tmp_path, monkeypatch, lambda b: _with_clash(b, at))
    refused = {pk for pk, p in together.prepared.items() if isinstance(p, ValidationError)}
    assert refused == {DAYS[3].isoformat()}
    assert "sharing an id with different content" in str(together.prepared[DAYS[3].isoformat()])


def test_rows_outside_their_day_are_caught_per_day(tmp_path, monkeypatch):
    """A staged day whose identify_company rows were moved a day later fails its own day check,
    although the batch's bounds (the range) hold them."""
    root = tmp_path / "moved"
    job = make_job(root, formats=FORMATS)
    staged = extract_and_stage(job, DAYS, root / "staging", Rearranged(2000))
    day = staged[DAYS[1].isoformat()]
    for et in ("identify_company",):  # its rows' inserted_at one day later, in the staged files
        for path in day.staged_files(et):
            table = pa.ipc.open_file(path).read_all()
            index = table.schema.get_field_index("inserted_at")
            shifted = pc.add(table.column(index), pa.scalar(86_400_000_000, pa.duration("us")))
            table = table.set_column(index, table.schema.field(index), shifted.cast(table.schema.field(index).type))
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    together = prepare_days(job, [staged[d.isoformat()] for d in DAYS])
    error = together[DAYS[1].isoformat()]
    assert isinstance(error, ValidationError), error
    assert "inserted_at" in str(error) and f"partition {DAYS[1].isoformat()}" in str(error)
    assert all(isinstance(together[d.isoformat()], dict) for d in DAYS if d != DAYS[1])
