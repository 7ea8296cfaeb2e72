"""S3 and GCS destinations through the Dagster assets and IO managers (instance state included).

Each day's own materializations record its files (``userpilot/files``) and, on GCS, the
generations of its objects (``userpilot/generations``: ``{object key: generation}``), which the
next export of the day uses as preconditions.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import last_complete_days
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import make_job, run_sync
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

#: Userpilot's documented files the demo sync job writes by default (userpilot_files).
DOCUMENTED = ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions")

pytestmark = pytest.mark.integration
PK = last_complete_days(1)[0].isoformat()


def _run(defs, instance):
    return run_sync(defs, instance, PK)


def _records(instance, asset: str) -> list:
    """The day's materializations of ``demo/<asset>``, newest first."""
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", asset]), asset_partitions=[PK]), limit=100
    ).records


def _bucket(server, request) -> str:
    return server.create_bucket("d-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12])


def test_s3_partition_through_dagster_with_write_only_key(moto_s3, tmp_path, request, monkeypatch):
    bucket = _bucket(moto_s3, request)
    proxy = RecordingProxy(upstream=moto_s3.endpoint.split("//")[1])
    key_id, secret = moto_s3.keys["writer"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    job = make_job(tmp_path, destination={"kind": "s3", "bucket": bucket, "prefix": WRITE_PREFIX,
                                          "endpoint_url": proxy.url, "region": "us-east-1"})
    defs = build_definitions([job], tmp_path / "staging")
    try:
        with dg.instance_for_test() as instance:
            result = _run(defs, instance)
            assert result.success, failure_messages(result)
            admin = moto_s3.client("admin")
            keys = sorted(o["Key"] for o in admin.list_objects_v2(Bucket=bucket)["Contents"])
            folder = f"{WRITE_PREFIX}/{job.sync_folder}/{PK}"
            assert keys == sorted([f"{folder}/{n}.parquet" for n in (*EVENT_TYPES, *DOCUMENTED)]
                                  + [f"{folder}/_manifest.json"])
            manifest = json.loads(admin.get_object(Bucket=bucket, Key=f"{folder}/_manifest.json")["Body"].read())
            for f in manifest["files"]:
                body = admin.get_object(Bucket=bucket, Key=f"{WRITE_PREFIX}/{job.sync_folder}/{f['path']}")["Body"].read()
                assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["bytes"]
            assert {r.method for r in proxy.log} <= {"PUT", "POST"}
            # the day's own records name its objects by s3:// URI
            for et in EVENT_TYPES:
                md = _records(instance, et)[0].asset_materialization.metadata
                assert md["userpilot/status"].value == "exported"
                assert md["dagster/uri"].value == f"s3://{bucket}/{folder}/{et}.parquet"
                assert [f["uri"] for f in md["userpilot/files"].value] == [f"s3://{bucket}/{folder}/{et}.parquet"]
                assert "userpilot/generations" not in md  # GCS only
            manifest_md = _records(instance, "manifest")[0].asset_materialization.metadata
            assert manifest_md["dagster/uri"].value == f"s3://{bucket}/{folder}/_manifest.json"
            assert manifest_md["files"].value == len(manifest["files"]) == len(EVENT_TYPES) + len(DOCUMENTED)

            # the destination is fixed: another bucket fails before anything is written there
            other = moto_s3.create_bucket(bucket + "-new")
            moved = make_job(tmp_path, destination={"kind": "s3", "bucket": other, "prefix": WRITE_PREFIX,
                                                    "endpoint_url": proxy.url, "region": "us-east-1"})
            proxy.clear()
            result = _run(build_definitions([moved], tmp_path / "staging"), instance)
            assert not result.success
            [message] = failure_messages(result)
            assert message.startswith(f"sync job 'demo', partition {PK}: the destination changed since the first export")
            assert "create a new sync job" in message
            assert len(_records(instance, "manifest")) == 1  # no record of the refused run
            assert proxy.log == []
            assert admin.list_objects_v2(Bucket=other).get("KeyCount", 0) == 0
    finally:
        proxy.close()


@pytest.mark.parametrize("overwrite", ["overwrite", "refuse"])
def test_gcs_reexport_uses_recorded_generations(fake_gcs, tmp_path, request, monkeypatch, overwrite):
    bucket = _bucket(fake_gcs, request)
    proxy = RecordingProxy(upstream=fake_gcs.endpoint.split("//")[1])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    job = make_job(tmp_path, destination={"kind": "gcs", "bucket": bucket, "project": "test-project",
                                          "prefix": WRITE_PREFIX, "overwrite": overwrite})
    defs = build_definitions([job], tmp_path / "staging")
    try:
        with dg.instance_for_test() as instance:
            first = _run(defs, instance)
            assert first.success, failure_messages(first)
            creates = [r for r in proxy.log if r.method == "POST" and r.path.startswith("/upload/")]
            assert creates and all(r.query.get("ifGenerationMatch") == ["0"] for r in creates)
            folder = f"{WRITE_PREFIX}/{job.sync_folder}/{PK}"
            blobs = {b.name: b.generation for b in fake_gcs.client().list_blobs(bucket)}
            # each day's own record: {object key: generation} of exactly the objects it wrote
            first_generations = {}
            for asset, name in [*((n, f"{n}.parquet") for n in (*EVENT_TYPES, *DOCUMENTED)),
                                ("manifest", "_manifest.json")]:
                md = _records(instance, asset)[0].asset_materialization.metadata
                generations = md["userpilot/generations"].value
                assert generations == {f"{folder}/{name}": blobs[f"{folder}/{name}"]}, asset
                assert all(isinstance(g, int) and g > 0 for g in generations.values())
                first_generations.update(generations)
            assert first_generations == blobs  # every object of the day, nothing else
            proxy.clear()
            second = _run(defs, instance)
            if overwrite == "refuse":
                assert not second.success
                [message] = failure_messages(second)
                assert message.startswith(f"sync job 'demo', partition {PK}: this partition was exported before")
                assert "overwrite is 'refuse'" in message
                assert proxy.log == []  # refused before any request
                assert len(_records(instance, "track")) == 1  # nothing recorded
                assert {b.name: b.generation for b in fake_gcs.client().list_blobs(bucket)} == blobs
            else:
                assert second.success, failure_messages(second)
                recorded = set()
                for asset in [*EVENT_TYPES, *DOCUMENTED, "manifest"]:
                    newest, older = _records(instance, asset)[:2]
                    assert older.run_id == first.run_id and newest.run_id == second.run_id
                    recorded |= {str(g) for g in older.asset_materialization.metadata["userpilot/generations"].value.values()}
                uploads = [r for r in proxy.log if r.method == "POST" and r.path.startswith("/upload/")]
                # every overwrite is conditioned on the generation the first run recorded: the
                # 'replacing' manifest first, the data files, then the complete manifest, conditioned on
                # the generation the 'replacing' manifest got
                manifest_key = f"{folder}/_manifest.json"
                names = [next(n for n in [*blobs, "?"] if n == "?" or f'"name": "{n}"'.encode() in r.body
                              or f'"name":"{n}"'.encode() in r.body) for r in uploads]
                assert len(uploads) == len(EVENT_TYPES) + len(DOCUMENTED) + 2
                assert names[0] == names[-1] == manifest_key and manifest_key not in names[1:-1]
                assert {r.query["ifGenerationMatch"][0] for r in uploads[:-1]} == recorded == {str(g) for g in blobs.values()}
                assert uploads[0].query["ifGenerationMatch"] == [str(blobs[manifest_key])]
                assert uploads[-1].query["ifGenerationMatch"][0] not in recorded
                after = {b.name: b.generation for b in fake_gcs.client().list_blobs(bucket)}
                assert set(after) == set(blobs) and all(after[k] != blobs[k] for k in blobs)
                # the second run recorded the new generations (the next re-export's preconditions)
                newest = {}
                for asset in [*EVENT_TYPES, *DOCUMENTED, "manifest"]:
                    newest.update(_records(instance, asset)[0].asset_materialization.metadata["userpilot/generations"].value)
                assert newest == after
    finally:
        proxy.close()
