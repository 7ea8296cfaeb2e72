"""Encode once: the files a day exports do not depend on the thread count, the row chunking or the
prefetch thread; what uploads is what preparation encoded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest

from userpilot_sync.config.model import FormatSpec
from userpilot_sync.destination.formats import PartsWriter, write_parts
from userpilot_sync.errors import SourceError
from userpilot_sync.pipeline import THREADS_ENV, prepare_threads, sync_partition
from userpilot_sync.staging import _prefetched
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_manifest.json"}


def test_same_files_with_one_or_several_threads(tmp_path, monkeypatch):
    formats = [{"format": "parquet"}, {"format": "ndjson", "compression": "gzip"}, {"format": "csv"}]
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv(THREADS_ENV, threads)
        root = tmp_path / f"t{threads}"
        job = make_job(root, formats=formats, max_file_rows=700, userpilot_files=[])
        result = sync_partition(job, PARTITION, root / "staging", now=NOW)
        results[threads] = (_digests(root / "exports"), result.manifest["event_types"])
    assert results["1"][0] == results["3"][0]
    assert len(results["1"][0]) > 7 * 3  # several parts per format
    assert results["1"][1] == results["3"][1]
    # the manifest's sha256 are those of the uploaded files (encoded once, uploaded as they are)
    assert sorted(f["sha256"] for f in result.manifest["files"]) == sorted(results["3"][0].values())


def test_prepare_threads_setting(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert prepare_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(Exception, match=THREADS_ENV):
        prepare_threads()


@pytest.mark.parametrize("fmt", ["parquet", "ndjson", "csv", "avro"])
def test_parts_writer_bytes_do_not_depend_on_chunking(tmp_path, fmt):
    n = 5_000
    table = pa.table({"id": [f"e{i:05d}" for i in range(n)], "n": pa.array(range(n), pa.int64())})
    spec = FormatSpec(format=fmt)
    whole = write_parts(table.to_batches(), table.schema, spec, tmp_path / "whole", "t", max_rows=1_800)
    writer = PartsWriter(table.schema, spec, tmp_path / "pieces", "t", max_rows=1_800)
    for offset, size in ((0, 7), (7, 1_990), (1_997, 3), (2_000, 3_000)):
        writer.write(table.slice(offset, size))
    pieces = writer.close()
    assert [p.rows for p in whole] == [p.rows for p in pieces] == [1_800, 1_800, 1_400]
    assert [p.sha256 for p in whole] == [p.sha256 for p in pieces]


def test_prefetch_keeps_order_and_raises_the_source_error_in_place():
    def source():
        yield 1
        yield 2
        raise SourceError("chunk 3 is broken")

    got = []
    with pytest.raises(SourceError, match="chunk 3"):
        for item in _prefetched(source()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_and_closes_the_source_when_the_consumer_stops():
    closed = []

    def source():
        try:
            for i in range(1_000):
                yield i
        finally:
            closed.append(True)

    batches = _prefetched(source())
    assert next(batches) == 0
    batches.close()
    assert closed == [True]
