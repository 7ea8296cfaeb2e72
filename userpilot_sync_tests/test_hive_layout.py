"""The hive layout's table folder per format (``<ext>/<event_type>/date=<D>/``) and empty exports.

* A day written with the hive keys of before (every format in ``<event_type>/date=<D>/``) and
  re-exported now lists every old file as superseded: the ledger's earlier paths never equal a
  current key, exactly like any other settings change that drops files; deleting them (what
  ``allow_deletes`` does) leaves table folders a reader can point at.
* A day that had rows and is re-exported with none (allowed shrink) writes no file for the event
  type and lists the files of before as superseded: nothing stale is left where deletes are allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.destination.layout import Layout, layout_for, legacy_hive_data_path
from userpilot_sync.destination.storage import LocalStorage
from userpilot_sync.destination.superseded import delete_superseded
from userpilot_sync.guards import ALLOW_SHRINK_TAG
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import make_job, run_sync

PK = last_complete_days(1)[0].isoformat()
FORMATS = [{"format": "parquet"}, {"format": "ndjson", "compression": "gzip"}]


def _root(job) -> Path:
    return Path(job.destination.path) / job.destination.prefix / job.sync_folder


def _manifest(job) -> dict:
    return json.loads((_root(job) / "_manifests" / f"date={PK}" / "_manifest.json").read_text())


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "_manifests" not in p.parts}


def test_hive_keys_have_one_format_per_table_folder():
    layout = Layout("hive", "lake", "userpilot_datasync_1_NX-a")
    assert layout.data_path(PK, "track", "parquet", 0, 1) == f"parquet/track/date={PK}/part-00000.parquet"
    assert layout.data_path(PK, "track", "ndjson.gz", 1, 2) == f"ndjson.gz/track/date={PK}/part-00001.ndjson.gz"
    assert layout.documented_path(PK, "all_users", "csv", 0, 1) == f"csv/all_users/date={PK}/part-00000.csv"
    assert layout.documented_path(PK, "track_feature_per_tag", "avro", 0, 1, ("track_feature", "tag"), "t%2E1") == \
        f"avro/track_feature_per_tag/tag=t%2E1/date={PK}/part-00000.avro"
    assert layout.manifest_path(PK) == f"_manifests/date={PK}/_manifest.json"
    # the keys of before never equal a current key: a re-export supersedes every one of them
    assert legacy_hive_data_path(PK, "track", "parquet", 0) == f"track/date={PK}/part-00000.parquet"
    assert Layout("userpilot", "", "s").data_path(PK, "track", "parquet", 0, 1) == f"{PK}/track.parquet"


def test_a_day_written_with_the_old_hive_keys_is_superseded_by_its_reexport(tmp_path, monkeypatch):
    job = make_job(tmp_path, layout="hive", formats=FORMATS, userpilot_files=["all_users"],
                   source={"kind": "demo", "events_per_day": 400, "seed": 5})
    defs = build_definitions([job], tmp_path / "staging")
    root = _root(job)
    current_data_path, current_documented_path = Layout.data_path, Layout.documented_path

    def old_data_path(self, partition, event_type, extension, part, parts):
        return legacy_hive_data_path(partition, event_type, extension, part)

    def old_documented_path(self, partition, name, extension, part, parts, split=None, escaped_id=None):
        return legacy_hive_data_path(partition, name, extension, part)

    with dg.instance_for_test() as instance:
        monkeypatch.setattr(Layout, "data_path", old_data_path)  # the code of before: one folder, every format
        monkeypatch.setattr(Layout, "documented_path", old_documented_path)
        first = run_sync(defs, instance, PK)
        assert first.success, failure_messages(first)
        old = {f["path"] for f in _manifest(job)["files"]}
        assert f"track/date={PK}/part-00000.parquet" in old and f"track/date={PK}/part-00000.ndjson.gz" in old
        assert _files(root) == old

        monkeypatch.setattr(Layout, "data_path", current_data_path)
        monkeypatch.setattr(Layout, "documented_path", current_documented_path)
        second = run_sync(defs, instance, PK)
        assert second.success, failure_messages(second)
    manifest = _manifest(job)
    new = {f["path"] for f in manifest["files"]}
    assert f"parquet/track/date={PK}/part-00000.parquet" in new
    assert all(p.split("/")[0] in ("parquet", "ndjson.gz") for p in new)
    # every file of the old keys is accounted for as superseded (a local folder never deletes)
    assert manifest["superseded"] == sorted(old) and manifest["deleted"] == []
    assert _files(root) == old | new
    # deleting them (what allow_deletes: true does on S3/GCS) leaves clean table folders
    assert delete_superseded(LocalStorage(job.destination.path), layout_for(job), manifest["superseded"],
                             allow_deletes=True) == sorted(old)
    assert _files(root) == new
    table = pl.scan_parquet(f"{root}/parquet/track/").collect()
    assert table.height == manifest["event_types"]["track"]["rows"]
    assert table.get_column("date").cast(pl.String).unique().to_list() == [PK]


def test_a_day_reexported_empty_writes_no_file_and_supersedes_the_old_ones(tmp_path):
    kept = make_job(tmp_path, layout="hive", formats=FORMATS, userpilot_files=[], filters={"event_types": ["track"]},
                    source={"kind": "demo", "events_per_day": 400, "seed": 5})
    none = make_job(tmp_path, layout="hive", formats=FORMATS, userpilot_files=[],
                    filters={"event_types": ["track"], "event_names_include": ["No such event"]},
                    source={"kind": "demo", "events_per_day": 400, "seed": 5})
    with dg.instance_for_test() as instance:
        first = run_sync(build_definitions([kept], tmp_path / "staging"), instance, PK)
        assert first.success, failure_messages(first)
        before = _manifest(kept)
        assert before["event_types"]["track"]["rows"] > 0 and len(before["files"]) == 2
        emptied = run_sync(build_definitions([none], tmp_path / "staging"), instance, PK,
                           tags={ALLOW_SHRINK_TAG: "true"})
        assert emptied.success, failure_messages(emptied)
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", "track"]), asset_partitions=[PK]), limit=1).records[0]
        md = record.asset_materialization.metadata
    manifest = _manifest(none)
    assert manifest["status"] == "empty" and manifest["event_types"]["track"]["rows"] == 0
    assert manifest["event_types"]["track"]["status"] == "empty" and "event_names_include" in manifest[
        "event_types"]["track"]["reason"]
    assert manifest["files"] == []  # no 0-row file ...
    assert manifest["superseded"] == sorted(f["path"] for f in before["files"])  # ... and the old ones named
    # the day's record: 0 rows, 0 files, the sync folder as its URI
    assert md["dagster/row_count"].value == 0 and md["files"].value == 0 and md["userpilot/files"].value == []


def test_an_export_without_rows_encodes_no_file(tmp_path):
    import pyarrow as pa

    from userpilot_sync.config.model import FormatSpec
    from userpilot_sync.destination.formats import PartsWriter, write_parts

    schema = pa.schema([("id", pa.string()), ("at", pa.timestamp("us", "UTC"))])
    for fmt in ("parquet", "ndjson", "csv", "avro"):
        spec = FormatSpec(format=fmt)
        writer = PartsWriter(schema, spec, tmp_path / fmt, "t")
        writer.write(schema.empty_table())
        assert writer.close() == []
        assert write_parts(iter(()), schema, spec, tmp_path / f"{fmt}2", "t") == []
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing encoded, nothing to upload
