"""S3 and GCS destinations through the Dagster assets and IO manager (instance state included)."""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import pytest

from userpilot_sync.cli import failure_messages
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.partitions import last_complete_days
from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync_tests.fixtures_core import make_job
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

pytestmark = pytest.mark.integration
PK = last_complete_days(1)[0].isoformat()


def _run(defs, instance):
    return defs.resolve_job_def("demo_sync").execute_in_process(partition_key=PK, instance=instance, raise_on_error=False)


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
            assert keys == sorted([f"{folder}/{et}.parquet" for et in EVENT_TYPES] + [f"{folder}/_manifest.json"])
            manifest = json.loads(admin.get_object(Bucket=bucket, Key=f"{folder}/_manifest.json")["Body"].read())
            for f in manifest["files"]:
                body = admin.get_object(Bucket=bucket, Key=f"{WRITE_PREFIX}/{job.sync_folder}/{f['path']}")["Body"].read()
                assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["bytes"]
            assert {r.method for r in proxy.log} <= {"PUT", "POST"}

            # the destination is fixed: another bucket fails before anything is written there
            other = moto_s3.create_bucket(bucket + "-new")
            moved = make_job(tmp_path, destination={"kind": "s3", "bucket": other, "prefix": WRITE_PREFIX,
                                                    "endpoint_url": proxy.url, "region": "us-east-1"})
            proxy.clear()
            result = _run(build_definitions([moved], tmp_path / "staging"), instance)
            assert not result.success
            assert "create a new sync job" in "\n".join(failure_messages(result))
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
            mat = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", "track"]), asset_partitions=[PK]), limit=1
            ).records[0].asset_materialization
            generations = mat.metadata["userpilot/generations"].value[PK]
            track_key = f"{WRITE_PREFIX}/{job.sync_folder}/{PK}/track.parquet"
            assert generations[track_key] > 0
            proxy.clear()
            second = _run(defs, instance)
            if overwrite == "refuse":
                assert not second.success
                assert "overwrite is 'refuse'" in "\n".join(failure_messages(second))
                assert proxy.log == []  # refused before any request
            else:
                assert second.success, failure_messages(second)
                recorded = set()
                for asset in [*EVENT_TYPES, "manifest"]:
                    rec = instance.fetch_materializations(
                        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["demo", asset]), asset_partitions=[PK]), limit=2
                    ).records[1].asset_materialization  # the first run's record
                    recorded |= {str(g) for g in rec.metadata["userpilot/generations"].value[PK].values()}
                uploads = [r for r in proxy.log if r.method == "POST" and r.path.startswith("/upload/")]
                # every overwrite is conditioned on the generation the first run recorded
                assert len(uploads) == 8
                assert {r.query["ifGenerationMatch"][0] for r in uploads} == recorded
                names = {b.name for b in fake_gcs.client().list_blobs(bucket)}
                assert len(names) == 8
    finally:
        proxy.close()
