"""Preparing an export in slices (``export.ExportPreparer``): a group of staged hours larger than one
slice (``export.ENCODE_ROWS``) is read as its sort keys first, then one slice of the sorted order at a
time from the memory-mapped staged files. The result must be byte for byte what reading the whole
group gives: in time order, reversed, shuffled, with filters and the interaction columns, with rows
kept for the documented files; ids that repeat fall back to the whole group; bad rows give the same
refusal."""

from __future__ import annotations

import random
import re

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from userpilot_sync import export as export_module
from userpilot_sync import staging as staging_module
from userpilot_sync.errors import ValidationError
from userpilot_sync.pipeline import EARLY_PREPARE_ENV, stage_and_prepare
from userpilot_sync.source import demo as demo_module
from userpilot_sync.source.base import SourceBatch
from userpilot_sync_tests.fixtures_core import DAY, PARTITION, make_job
from userpilot_sync_tests.test_early_prepare import Rearranged, _outcome, _with_bad_row

FORMATS = [{"format": "parquet"}, {"format": "csv"}, {"format": "ndjson"}]
SLICE = 64  # rows per slice in the sliced runs; groups are >= 150 staged rows


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    monkeypatch.setattr(export_module, "VALIDATION_ROWS", 150)
    monkeypatch.setattr(staging_module, "COALESCE_ROWS", 100)
    monkeypatch.setattr(demo_module, "BATCH_ROWS", 1)
    monkeypatch.setenv(EARLY_PREPARE_ENV, "0")


class Counting:
    """Counts the slices gathered and the groups read whole, calling through."""

    def __init__(self, monkeypatch):
        self.slices = self.whole = 0
        take, read = export_module._MappedBatches.take, export_module.ExportPreparer._add_read

        def counted_take(mapped, rows, starts):
            self.slices += 1
            return take(mapped, rows, starts)

        def counted_read(preparer, group):
            self.whole += 1
            return read(preparer, group)

        monkeypatch.setattr(export_module._MappedBatches, "take", counted_take)
        monkeypatch.setattr(export_module.ExportPreparer, "_add_read", counted_read)


def _same(result) -> dict:
    """``_outcome`` with the rows kept for the documented files compared as tables: those local files
    are written one table per slice (their record batches and buffers differ), and they never upload."""
    out = _outcome(result)
    for pk, prepared in result.prepared.items():
        if isinstance(prepared, ValidationError):
            continue
        for et, export in prepared.items():
            tables = [pa.ipc.open_file(f).read_all() for f in export.files]
            out[pk][et]["kept"] = pa.concat_tables(tables).combine_chunks() if tables else None  # compared with equals
    return out


def _prepare(tmp_path, name, monkeypatch, arrange, encode_rows, **job):
    monkeypatch.setattr(export_module, "ENCODE_ROWS", encode_rows)
    root = tmp_path / name
    return stage_and_prepare(make_job(root, formats=FORMATS, **job), [DAY], root / "staging", Rearranged(3000, arrange))


def _shuffled(batches):
    batches = list(batches)
    random.Random(5).shuffle(batches)
    return batches


def _backwards(batches):
    return list(reversed(batches))


def _in_order(batches):
    return batches


@pytest.mark.parametrize("arrange", [_in_order, _backwards, _shuffled])
@pytest.mark.parametrize("job", [
    pytest.param({}, id="plain"),
    pytest.param({"filters": {"event_names_exclude": ["*:SEEN", "Exported*"], "user_ids_exclude": ["user-00001"]},
                  "userpilot_files": ["all_users", "feature_tags_breakdown"]}, id="filters_and_kept_rows"),
])
def test_sliced_groups_give_the_same_bytes_as_whole_groups(tmp_path, monkeypatch, arrange, job):
    whole = _prepare(tmp_path, "whole", monkeypatch, arrange, 10**9, **job)
    counting = Counting(monkeypatch)
    sliced = _prepare(tmp_path, "sliced", monkeypatch, arrange, SLICE, **job)
    assert _same(sliced) == _same(whole)
    assert counting.slices > 3 * len(sliced.prepared[PARTITION]), "most groups were prepared in slices"
    if "filters" in job:
        assert sum(p.filtered_out for p in sliced.prepared[PARTITION].values()) > 0


def test_repeated_ids_fall_back_to_the_whole_group(tmp_path, monkeypatch):
    def replay(batches):  # the first quarter of the day again at the end: exact duplicates
        return batches + batches[: len(batches) // 4]

    whole = _prepare(tmp_path, "whole", monkeypatch, replay, 10**9)
    counting = Counting(monkeypatch)
    sliced = _prepare(tmp_path, "sliced", monkeypatch, replay, SLICE)
    assert _same(sliced) == _same(whole)
    assert sum(p.duplicates_dropped for p in sliced.prepared[PARTITION].values()) > 0
    assert counting.whole > 0 and counting.slices > 0  # the replayed hours whole, the rest in slices


def test_a_bad_row_is_refused_the_same_way_in_slices(tmp_path, monkeypatch):
    whole = _prepare(tmp_path, "whole", monkeypatch, lambda b: _with_bad_row(b, 5), 10**9)
    sliced = _prepare(tmp_path, "sliced", monkeypatch, lambda b: _with_bad_row(b, 5), SLICE)
    for result in (whole, sliced):
        error = result.prepared[PARTITION]
        assert isinstance(error, ValidationError)
        assert "column 'app_token'" in str(error) and "NX-other0001" in str(error)
        assert f"partition {PARTITION}" in str(error)
    assert str(sliced.prepared[PARTITION]) == str(whole.prepared[PARTITION])


def _track_of_another_app(batches, at: int, changed: list[int]):
    """Batch ``at`` with its track rows' app_token set to another app (their number appended to
    ``changed``)."""
    batch = batches[at]
    table = batch.data if isinstance(batch.data, pa.Table) else pa.Table.from_batches([batch.data])
    index = table.schema.get_field_index("app_token")
    is_track = pc.equal(table.column("event_type"), "track")
    changed.append(pc.sum(is_track).as_py() or 0)
    table = table.set_column(index, "app_token", pc.if_else(is_track, pa.scalar("NX-other0001"), table.column(index)))
    return batches[:at] + [SourceBatch(batch.where, table)] + batches[at + 1:]


def test_bad_rows_in_several_slices_give_the_whole_groups_error(tmp_path, monkeypatch):
    """Track rows of another app in several slices of one group (most of the day): the refusal
    counts and samples the group, as reading it whole does, not the first failing slice."""
    monkeypatch.setattr(export_module, "VALIDATION_ROWS", 2000)

    changed: list[int] = []

    def bad_rows(batches):
        changed.clear()
        for at in (5, 30, 55, 80):  # four 15-minute blocks hours apart: four slices of the group
            batches = _track_of_another_app(batches, at, changed)
        return batches

    job = {"filters": {"event_types": ["track"]}, "userpilot_files": []}
    whole = _prepare(tmp_path, "whole", monkeypatch, bad_rows, 10**9, **job)
    counting = Counting(monkeypatch)
    sliced = _prepare(tmp_path, "sliced", monkeypatch, bad_rows, SLICE, **job)
    error = sliced.prepared[PARTITION]
    assert isinstance(error, ValidationError)
    assert counting.slices > 0
    assert str(error) == str(whole.prepared[PARTITION])
    counted = int(re.search(r"failed equal_to\(NX-demo0001\): (\d+) value", str(error)).group(1))
    assert counted == sum(changed) > max(changed), (changed, str(error))  # the group's count, not one slice's
