"""Delta Lake output (``formats: [{format: delta}]``, ``destination/delta.py``).

A sync job writing Parquet and Delta exports 3 days (one range run), then re-exports day 2: each
table holds every day once, its history shows the replace, and ``deltalake`` and polars
(``scan_delta``) read per day exactly the rows of the day's Parquet export. The manifest gives
each table's version. Once on a local folder, once on S3 (moto in its own process, IAM enforced:
the credentials may put, get and list under the sync folder, nothing else). Without
``read_access: true`` the configuration is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from userpilot_sync.cli import failure_messages
from userpilot_sync.config.loader import load_sync_job_file
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.errors import ConfigError
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import make_job, run_sync
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, free_port, listens_on

DAYS = [d.isoformat() for d in last_complete_days(3)]
D1, D2, D3 = DAYS
#: Event types read back row by row (as exported: identify_user, interaction with its extra columns, track).
ROW_CHECKED = ("identify_user", "interaction", "track")
FORMATS = [{"format": "parquet"}, {"format": "delta"}]
#: Small days, no documented files: the module stays well under a minute on 2 cores.
SMALL = {"source": {"kind": "demo", "events_per_day": 800, "seed": 7}, "userpilot_files": [],
         "filters": {"event_types": ["identify_user", "interaction", "track"]}, "checks": {"empty_days": "expected"}}


def _export_and_reexport(job, tmp_path: Path, instance) -> None:
    defs = build_definitions([job], tmp_path / "staging")
    result = run_sync(defs, instance, D1, D3)
    assert result.success, failure_messages(result)
    result = run_sync(defs, instance, D2)
    assert result.success, failure_messages(result)


def _check_tables(job, read_bytes, table_uri, options: dict, instance) -> None:
    """The tables, their history, the readers and the manifests after 3 days + day 2 again."""
    manifests = {d: json.loads(read_bytes(f"{d}/_manifest.json")) for d in DAYS}
    for et in job.event_types:
        uri = table_uri(et)
        table = DeltaTable(uri, storage_options=options)
        # 3 days committed, then day 2 replaced: versions 0..3, the manifests name them
        assert table.version() == 3
        assert [manifests[d]["event_types"][et]["delta_version"] for d in DAYS] == [0, 3, 2]
        assert manifests[D2]["delta"][et]["version"] == 3
        assert manifests[D2]["delta"][et]["table"] == f"_delta/{et}"
        assert manifests[D2]["delta"][et]["uri"].endswith(f"{job.sync_folder}/_delta/{et}")
        # each day once: the table's rows per day equal the manifest's
        counts = pl.from_arrow(table.to_pyarrow_table(columns=["date"])).group_by("date").len()
        by_day = {str(d): n for d, n in counts.iter_rows()}
        expected = {d: manifests[d]["event_types"][et]["rows"] for d in DAYS if manifests[d]["event_types"][et]["rows"]}
        assert by_day == expected, et
        # the history shows the replace of day 2
        newest = table.history(limit=1)[0]
        assert newest["version"] == 3 and newest["userpilot_sync.partition"] == D2
        assert newest["operationParameters"]["mode"] == "Overwrite"
        assert D2 in newest["operationParameters"]["predicate"]
        if expected.get(D2):
            assert newest["operationMetrics"]["num_removed_files"] >= 1
            assert newest["operationMetrics"]["num_added_rows"] == expected[D2]
        assert {h["userpilot_sync.partition"] for h in table.history()} == set(DAYS)
    # row identity: Delta (deltalake and polars) = the Parquet export, per day
    for et in ROW_CHECKED:
        uri = table_uri(et)
        lazy = pl.scan_delta(uri, storage_options=options)
        assert lazy.collect_schema()["date"] == pl.Date
        table = DeltaTable(uri, storage_options=options).to_pyarrow_table()
        for d in DAYS:
            exported = pl.read_parquet(io.BytesIO(read_bytes(f"{d}/{et}.parquet")))
            from_polars = lazy.filter(pl.col("date") == pl.lit(d).str.to_date()).drop("date").collect()
            day_rows = table.filter(pa.compute.equal(table["date"], pa.scalar(pl.Series([d]).str.to_date()[0],
                                                                              pa.date32())))
            from_deltalake = pl.from_arrow(day_rows.drop_columns(["date"]))
            key = ["inserted_at", "internal_event_id"]  # the export's order
            assert from_polars.sort(key).equals(exported), (et, d)
            assert from_deltalake.sort(key).equals(exported), (et, d)
            assert exported.height == manifests[d]["event_types"][et]["rows"]
    # the manifest's files: no Delta file, and nothing superseded by the replace
    for d in DAYS:
        assert not [f for f in manifests[d]["files"] if f["path"].startswith("_delta")]
        assert manifests[d]["superseded"] == [] and manifests[d]["deleted"] == []
    # the day's own records: its version, its files without the table
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([job.name, "track"]), asset_partitions=[D2]), limit=10).records
    md = records[0].asset_materialization.metadata
    assert md["delta_version"].value == 3
    assert md["userpilot/delta"].value["version"] == 3
    assert [f["format"] for f in md["userpilot/files"].value] == ["parquet"]


def test_delta_local_three_days_and_a_replace(tmp_path):
    job = make_job(tmp_path, formats=FORMATS, **SMALL,
                   destination={"kind": "local", "path": str(tmp_path / "exports"), "prefix": WRITE_PREFIX,
                                "read_access": True})
    root = tmp_path / "exports" / WRITE_PREFIX / job.sync_folder
    with dg.instance_for_test() as instance:
        _export_and_reexport(job, tmp_path, instance)
        _check_tables(job, lambda rel: (root / rel).read_bytes(), lambda et: str(root / "_delta" / et), {}, instance)
    # the Parquet files of the re-exported day are still byte-identical to their manifest
    manifest = json.loads((root / D2 / "_manifest.json").read_text())
    for f in manifest["files"]:
        assert hashlib.sha256((root / f["path"]).read_bytes()).hexdigest() == f["sha256"]


# ---------------------------------------------------------------------------------- S3 (moto, own process)
def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    return urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="module")
def moto_process():
    """moto's S3 server in a process of its own (delta-rs calls it from Rust while the test's
    Python thread waits: an in-process server would share the test's GIL), IAM enforced: ``admin``
    (everything), ``delta`` (put and get under ``*/userpilot_events/*``, list the bucket) and
    ``writer`` (the write-only set: put under ``*/userpilot_events/*``)."""
    import boto3

    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None and listens_on(proc.pid, port):
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError("moto server did not start")
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        policies = {
            "admin": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            "delta": [{"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
                       "Resource": f"arn:aws:s3:::*/{WRITE_PREFIX}/*"},
                      {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::*"}],
            "writer": [{"Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                        "Resource": f"arn:aws:s3:::*/{WRITE_PREFIX}/*"}],  # the write-only set
        }
        keys = {}
        for user, statements in policies.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
        _post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on IAM is enforced
        yield endpoint, keys
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_delta_s3_three_days_and_a_replace(moto_process, tmp_path, monkeypatch):
    import boto3

    endpoint, keys = moto_process
    admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id=keys["admin"][0], aws_secret_access_key=keys["admin"][1])
    bucket = "delta-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    admin.create_bucket(Bucket=bucket)
    key_id, secret = keys["delta"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    job = make_job(tmp_path, formats=FORMATS, **SMALL,
                   destination={"kind": "s3", "bucket": bucket, "prefix": WRITE_PREFIX, "endpoint_url": endpoint,
                                "region": "us-east-1", "read_access": True})
    folder = f"{WRITE_PREFIX}/{job.sync_folder}"
    options = {"AWS_ACCESS_KEY_ID": keys["admin"][0], "AWS_SECRET_ACCESS_KEY": keys["admin"][1],
               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}
    with dg.instance_for_test() as instance:
        _export_and_reexport(job, tmp_path, instance)
        _check_tables(job, lambda rel: admin.get_object(Bucket=bucket, Key=f"{folder}/{rel}")["Body"].read(),
                      lambda et: f"s3://{bucket}/{folder}/_delta/{et}", options, instance)
    listed = [o["Key"] for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in page.get("Contents", [])]
    assert all(k.startswith(f"{folder}/") for k in listed)
    assert any(k.startswith(f"{folder}/_delta/track/_delta_log/") for k in listed)


@pytest.mark.integration
def test_delta_s3_with_write_only_credentials_names_the_permissions(moto_process, tmp_path, monkeypatch):
    import boto3

    from userpilot_sync.errors import DestinationError
    from userpilot_sync.pipeline import sync_partition
    from userpilot_sync_tests.fixtures_core import NOW, PARTITION

    endpoint, keys = moto_process
    admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id=keys["admin"][0], aws_secret_access_key=keys["admin"][1])
    bucket = "delta-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    admin.create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["writer"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["writer"][1])
    job = make_job(tmp_path, formats=FORMATS, **{**SMALL, "filters": {"event_types": ["track"]}},
                   destination={"kind": "s3", "bucket": bucket, "prefix": WRITE_PREFIX, "endpoint_url": endpoint,
                                "region": "us-east-1", "read_access": True})  # says so, but is not so
    with pytest.raises(DestinationError) as info:
        sync_partition(job, PARTITION, tmp_path / "staging", now=NOW)
    message = str(info.value)
    assert message.startswith(f"sync job 'demo', partition {PARTITION}, event type 'track': the Delta commit to "
                              f"s3://{bucket}/{WRITE_PREFIX}/{job.sync_folder}/_delta/track failed")
    assert "s3:GetObject" in message and "s3:ListBucket" in message and "docs/destinations.md" in message
    assert keys["writer"][1] not in message and "\x1b" not in message
    # no manifest: the day is not readable
    listed = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in listed if k.endswith("_manifest.json")]


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kind", ["s3", "gcs", "local"])
def test_delta_refused_without_read_access(tmp_path, kind):
    destination = {
        "s3": "{kind: s3, bucket: acme-events, prefix: userpilot}",
        "gcs": "{kind: gcs, bucket: acme-events, prefix: userpilot}",
        "local": "{kind: local, path: exports}",
    }[kind]
    jobs = tmp_path / "sync_jobs"
    jobs.mkdir()
    path = jobs / "acme.yaml"
    path.write_text("name: acme\nsync_id: \"42\"\napp_token: NX-acme\n"
                    f"destination: {destination}\nformats: [{{format: parquet}}, {{format: delta}}]\n")
    with pytest.raises(ConfigError) as info:
        load_sync_job_file(path)
    message = str(info.value)
    assert "sync job file acme.yaml" in message and "key destination.read_access" in message
    assert "sync job 'acme' writes format delta" in message
    assert "set destination.read_access: true" in message and "docs/destinations.md" in message
    where = "userpilot_datasync_42_NX-acme/_delta/"
    expected = {
        "s3": f"s3:GetObject and s3:PutObject on arn:aws:s3:::acme-events/userpilot/{where}* and s3:ListBucket",
        "gcs": f"storage.objects.get, storage.objects.list and storage.objects.create",
        "local": f"read, list and write access to the folder {where}",
    }[kind]
    assert expected in message
    # with read_access: true the same file loads, delta alone too (documented files then in Parquet)
    path.write_text(path.read_text().replace("}\nformats", ", read_access: true}\nformats")
                    .replace("[{format: parquet}, {format: delta}]", "[{format: delta}]"))
    job = load_sync_job_file(path)
    assert [f.label for f in job.formats] == ["delta/zstd"]
    assert [f.label for f in job.file_formats] == ["parquet/zstd"]


# ---------------------------------------------------------------------------------- empty days, cleanup
def test_delta_empty_export_then_rows_and_never_superseded(tmp_path):
    """An event type with no rows (no Parquet file) still commits its day (an empty partition), a
    later export fills it, and the exporter's cleanup never names a Delta path."""
    from userpilot_sync.destination.superseded import delete_superseded, superseded_paths
    from userpilot_sync.pipeline import sync_partition
    from userpilot_sync_tests.fixtures_core import NOW, PARTITION

    dest = {"kind": "local", "path": str(tmp_path / "exports"), "read_access": True}
    base = {**SMALL, "filters": {"event_types": ["track"]}}
    nothing = make_job(tmp_path, formats=[{"format": "delta", "compression": "snappy"}], destination=dest,
                       **{**base, "filters": {"event_types": ["track"], "event_names_include": ["no_such_event*"]}})
    first = sync_partition(nothing, PARTITION, tmp_path / "staging", now=NOW).manifest
    assert first["status"] == "empty" and first["files"] == []
    assert first["event_types"]["track"]["delta_version"] == 0
    assert first["delta"]["track"]["rows"] == 0 and first["delta"]["track"]["compression"] == "snappy"
    uri = str(tmp_path / "exports" / nothing.sync_folder / "_delta" / "track")
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 0
    assert DeltaTable(uri).schema().fields[-1].name == "date"

    rows = make_job(tmp_path, formats=[{"format": "delta", "compression": "snappy"}], destination=dest, **base)
    second = sync_partition(rows, PARTITION, tmp_path / "staging", now=NOW).manifest
    assert second["event_types"]["track"]["delta_version"] == 1
    n = second["event_types"]["track"]["rows"]
    assert n > 0 and DeltaTable(uri).to_pyarrow_table().num_rows == n == second["delta"]["track"]["rows"]
    assert second["delta"]["track"]["bytes"] > 0 and second["delta"]["track"]["files_added"] == 1

    assert superseded_paths(["_delta/track", "_delta/track/date=x/part.parquet", "2026-03-09/track.parquet"], []) \
        == ["2026-03-09/track.parquet"]

    class Refuses:
        def delete(self, key):
            raise AssertionError(f"deleted {key}")

    from userpilot_sync.destination.layout import layout_for

    assert delete_superseded(Refuses(), layout_for(rows), ["_delta/track"], allow_deletes=True) == []
