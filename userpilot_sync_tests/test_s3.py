"""S3 destination against a moto server with IAM enforcement (write-only keys), on loopback."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.check import check_destination, marker_key
from userpilot_sync.destination.s3 import S3Storage
from userpilot_sync.destination.storage import LocalStorage
from userpilot_sync.destination.superseded import delete_superseded, superseded_paths
from userpilot_sync.destination.transport import RetryPolicy, require_https
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.errors import DestinationError
from userpilot_sync.pipeline import sync_partition
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

pytestmark = pytest.mark.integration

FAST = RetryPolicy(max_attempts=6, initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=30,
                   connect_timeout_s=5, read_timeout_s=30)
MiB = 1024 * 1024


def s3_job(tmp_path: Path, bucket: str, endpoint: str, **dest) -> SyncJob:
    destination = {"kind": "s3", "bucket": bucket, "prefix": WRITE_PREFIX, "endpoint_url": endpoint,
                   "region": "us-east-1"}
    destination.update(dest)
    return make_job(tmp_path, destination=destination)


def storage(moto, job: SyncJob, user: str = "writer") -> S3Storage:
    key_id, secret = moto.keys[user]
    creds = SimpleNamespace(aws_access_key_id=key_id, aws_secret_access_key=secret)
    return S3Storage.from_config(job, credentials_from=creds, retry=FAST)


def objects(moto, bucket: str) -> dict[str, bytes]:
    admin = moto.client("admin")
    keys = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: admin.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def proxy(moto_s3):
    p = RecordingProxy(upstream=moto_s3.endpoint.split("//")[1])
    yield p
    p.close()


def _bucket(moto_s3, request) -> str:
    name = "b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    return moto_s3.create_bucket(name)


def assert_write_only(log) -> None:
    """Only PutObject / multipart (PUT, POST) and AbortMultipartUpload (DELETE ?uploadId)."""
    methods = {r.method for r in log if not (r.method == "DELETE" and "uploadId" in r.query)}
    assert methods <= {"PUT", "POST"}, methods
    for r in log:
        assert not ({"list-type", "uploads", "versions", "acl", "tagging"} & set(r.query)) or (
            r.method == "POST" and "uploads" in r.query), (r.method, r.path, r.query)


def test_partition_lands_with_write_only_key(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url)
    result = sync_partition(job, PARTITION, tmp_path / "staging", storage=storage(moto_s3, job), now=NOW)

    layout = layout_for(job)
    stored = objects(moto_s3, bucket)
    expected = {layout.key(f.path) for f in result.files} | {result.manifest_key}
    assert set(stored) == expected
    # 7 event types + all_users, all_companies, feature_tags_breakdown, feature_tags_definitions
    assert len(result.files) == 11
    assert sorted(f.file for f in result.files if f.file) == ["all_companies", "all_users", "feature_tags_breakdown",
                                                              "feature_tags_definitions"]
    for f in result.files:
        body = stored[layout.key(f.path)]
        assert len(body) == f.bytes
        assert hashlib.sha256(body).hexdigest() == f.sha256
    manifest = json.loads(stored[result.manifest_key])
    assert manifest["partition"] == PARTITION and len(manifest["files"]) == 11
    # manifest written last
    puts = [r.path for r in proxy.log if r.method == "PUT"]
    assert puts[-1].endswith("/_manifest.json")
    assert_write_only(proxy.log)
    head = moto_s3.client("admin").head_object(Bucket=bucket, Key=result.manifest_key)
    assert head["ContentType"] == "application/json"


def test_iam_is_enforced_for_the_writer_key(moto_s3, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    key = f"{WRITE_PREFIX}/x.txt"
    writer = moto_s3.client("writer")
    writer.put_object(Bucket=bucket, Key=key, Body=b"x")
    for call in (lambda: writer.get_object(Bucket=bucket, Key=key),
                 lambda: writer.list_objects_v2(Bucket=bucket),
                 lambda: writer.delete_object(Bucket=bucket, Key=key),
                 lambda: writer.put_object(Bucket=bucket, Key="elsewhere/x.txt", Body=b"x")):
        with pytest.raises(Exception) as err:
            call()
        assert "AccessDenied" in str(err.value) or "403" in str(err.value)


@pytest.mark.parametrize("checksum", ["when_supported", "sha256", "when_required", "none"])
def test_multipart_upload_above_threshold(moto_s3, proxy, tmp_path, request, checksum):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url, checksum=checksum, multipart_threshold_bytes=5 * MiB,
                 multipart_chunk_bytes=5 * MiB)
    data = os.urandom(12 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    st = storage(moto_s3, job)
    key = f"{WRITE_PREFIX}/big.parquet"
    st.put_file(key, path, content_type="application/vnd.apache.parquet")
    assert objects(moto_s3, bucket)[key] == data
    parts = [r for r in proxy.log if r.method == "PUT" and "partNumber" in r.query]
    assert len(parts) == 3
    assert_write_only(proxy.log)
    headers = {k for r in parts for k in r.headers}
    if checksum == "when_supported":
        assert "x-amz-checksum-crc32" in headers
    elif checksum == "sha256":
        assert "x-amz-checksum-sha256" in headers
    elif checksum == "when_required":
        assert "content-md5" in headers and not any(h.startswith("x-amz-checksum-") for h in headers)
    else:
        assert "content-md5" not in headers and not any(h.startswith("x-amz-checksum-") for h in headers)


def test_failure_mid_upload_aborts_and_leaves_no_object(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url, multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(11 * MiB))
    denied = (403, b"<Error><Code>AccessDenied</Code><Message>denied</Message></Error>",
              {"Content-Type": "application/xml"})
    proxy.fault = lambda r: denied if r.query.get("partNumber") == ["2"] else None
    with pytest.raises(DestinationError, match="s3:PutObject"):
        storage(moto_s3, job).put_file(f"{WRITE_PREFIX}/big.parquet", path, content_type="application/octet-stream")
    assert any(r.method == "DELETE" and "uploadId" in r.query for r in proxy.log)  # AbortMultipartUpload
    admin = moto_s3.client("admin")
    assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert objects(moto_s3, bucket) == {}


def test_transient_errors_are_retried_with_identical_output(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url)
    counter = {"n": 0}

    def flaky(r):
        counter["n"] += 1
        if counter["n"] % 3 == 1:
            code = 503 if counter["n"] % 2 else 500
            name = b"SlowDown" if code == 503 else b"InternalError"
            return code, b"<Error><Code>" + name + b"</Code></Error>", {"Content-Type": "application/xml"}
        return None

    proxy.fault = flaky
    result = sync_partition(job, PARTITION, tmp_path / "staging", storage=storage(moto_s3, job), now=NOW)
    assert any(r.status in (500, 503) for r in proxy.log)

    local_job = make_job(tmp_path / "local")
    reference = sync_partition(local_job, PARTITION, tmp_path / "staging2", storage=LocalStorage(tmp_path / "ref"),
                               now=NOW)
    assert [(f.path, f.bytes, f.sha256) for f in result.files] == [(f.path, f.bytes, f.sha256) for f in reference.files]
    stored = objects(moto_s3, bucket)
    layout = layout_for(job)
    for f in result.files:
        assert hashlib.sha256(stored[layout.key(f.path)]).hexdigest() == f.sha256


def test_lost_complete_answer_and_part_errors_in_multipart(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url, multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB)
    data = os.urandom(11 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    seen = set()

    def fault(r):
        kind = "complete" if (r.method == "POST" and "uploadId" in r.query) else r.query.get("partNumber", [""])[0]
        if kind in ("2", "complete") and kind not in seen:
            seen.add(kind)
            return "forward-then-503" if kind == "complete" else (503, b"<Error><Code>SlowDown</Code></Error>", {})
        return None

    proxy.fault = fault
    key = f"{WRITE_PREFIX}/big.parquet"
    storage(moto_s3, job).put_file(key, path, content_type="application/octet-stream")
    assert seen == {"2", "complete"}
    assert objects(moto_s3, bucket)[key] == data


def test_access_denied_fails_fast_with_a_clear_error(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url, prefix="not_allowed")
    with pytest.raises(DestinationError) as err:
        sync_partition(job, PARTITION, tmp_path / "staging", storage=storage(moto_s3, job), now=NOW)
    msg = str(err.value)
    assert f"s3://{bucket}/not_allowed" in msg and "s3:PutObject" in msg and "access denied" in msg
    assert moto_s3.keys["writer"][1] not in msg
    assert len(proxy.log) == 1  # no retries of a permanent error, nothing else attempted
    assert objects(moto_s3, bucket) == {}


def test_no_such_bucket_and_bad_credentials(moto_s3, tmp_path):
    job = s3_job(tmp_path, "missing-bucket-xyz", moto_s3.endpoint)
    with pytest.raises(DestinationError, match="does not exist"):
        storage(moto_s3, job).put_bytes(f"{WRITE_PREFIX}/a.json", b"{}", content_type="application/json")
    job = s3_job(tmp_path, moto_s3.create_bucket("creds-bucket"), moto_s3.endpoint)
    bogus = S3Storage.from_config(job, credentials_from=SimpleNamespace(
        aws_access_key_id="AKIAFAKEFAKEFAKE", aws_secret_access_key="very-secret-value"), retry=FAST)
    with pytest.raises(DestinationError, match="credentials were rejected") as err:
        bogus.put_bytes(f"{WRITE_PREFIX}/a.json", b"{}", content_type="application/json")
    assert "very-secret-value" not in str(err.value)


@pytest.mark.parametrize("sse,kms", [("AES256", None), ("aws:kms", "arn:aws:kms:us-east-1:123456789012:key/abc")])
def test_server_side_encryption_is_requested(moto_s3, proxy, tmp_path, request, sse, kms):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url, sse=sse, kms_key_id=kms, multipart_threshold_bytes=5 * MiB,
                 multipart_chunk_bytes=5 * MiB)
    st = storage(moto_s3, job)
    small, big = tmp_path / "s.bin", tmp_path / "b.bin"
    small.write_bytes(b"x" * 100)
    big.write_bytes(os.urandom(6 * MiB))
    st.put_file(f"{WRITE_PREFIX}/s.bin", small, content_type="application/octet-stream")
    st.put_file(f"{WRITE_PREFIX}/b.bin", big, content_type="application/octet-stream")
    for r in proxy.log:
        is_part = "partNumber" in r.query
        is_complete = r.method == "POST" and "uploadId" in r.query
        if is_part or is_complete:
            assert "x-amz-server-side-encryption" not in r.headers
        else:
            assert r.headers["x-amz-server-side-encryption"] == sse
            assert r.headers.get("x-amz-server-side-encryption-aws-kms-key-id") == kms


def test_https_is_required_for_non_loopback_endpoints(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="https"):
        s3_job(tmp_path, "bucket-a", "http://s3.example.com")
    assert s3_job(tmp_path, "bucket-a", "https://s3.example.com").destination.endpoint_url
    for ok in ("http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000", "https://x.example"):
        assert require_https(ok, "endpoint") == ok
    with pytest.raises(DestinationError, match="https"):
        require_https("http://10.0.0.5:9000", "S3 endpoint_url")


def test_reexport_with_fewer_parts_lists_superseded_and_deletes_only_when_allowed(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    first_job = s3_job(tmp_path, bucket, proxy.url)
    first_job = first_job.model_copy(update={"max_file_rows": 200})
    first = sync_partition(first_job, PARTITION, tmp_path / "s1", storage=storage(moto_s3, first_job), now=NOW)
    second_job = s3_job(tmp_path, bucket, proxy.url)
    second = sync_partition(second_job, PARTITION, tmp_path / "s2", storage=storage(moto_s3, second_job), now=NOW)
    old = superseded_paths(first.manifest["files"], second.files)
    assert old and all("_0000" in p for p in old)
    assert not set(old) & {f.path for f in second.files}
    layout = layout_for(second_job)

    # not allowed: nothing deleted, the storage itself refuses too
    assert delete_superseded(storage(moto_s3, second_job), layout, old, allow_deletes=False) == []
    with pytest.raises(DestinationError, match="allow_deletes"):
        storage(moto_s3, second_job).delete(layout.key(old[0]))
    assert {layout.key(p) for p in old} <= set(objects(moto_s3, bucket))
    assert not any(r.method == "DELETE" for r in proxy.log)

    # allowed (the credential then needs s3:DeleteObject)
    deleting_job = s3_job(tmp_path, bucket, proxy.url, allow_deletes=True)
    deleted = delete_superseded(storage(moto_s3, deleting_job, "deleter"), layout, old, allow_deletes=True)
    assert deleted == old
    remaining = set(objects(moto_s3, bucket))
    assert not {layout.key(p) for p in old} & remaining
    assert {layout.key(f.path) for f in second.files} <= remaining
    with pytest.raises(DestinationError, match="s3:DeleteObject"):
        storage(moto_s3, deleting_job, "writer").delete(layout.key(second.files[0].path))


def test_connection_check(moto_s3, proxy, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    job = s3_job(tmp_path, bucket, proxy.url)
    result = check_destination(job, storage(moto_s3, job))
    assert result.ok, result.problems
    assert result.uri == f"s3://{bucket}/{marker_key(job)}"
    assert json.loads(objects(moto_s3, bucket)[marker_key(job)])["sync_job"] == job.name
    assert set(objects(moto_s3, bucket)) == {marker_key(job)}  # the multipart probe left nothing
    assert_write_only(proxy.log)

    bad = check_destination(job, storage(moto_s3, job, "nobody"))
    assert not bad.ok
    assert "s3:PutObject" in bad.problems[0] and bucket in bad.message


def test_assume_role_with_external_id(moto_s3, tmp_path, request, monkeypatch):
    bucket = _bucket(moto_s3, request)
    import boto3

    key_id, secret = moto_s3.keys["admin"]
    iam = boto3.client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1",
                       aws_access_key_id=key_id, aws_secret_access_key=secret)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                     "Action": "sts:AssumeRole",
                                                     "Condition": {"StringEquals": {"sts:ExternalId": "ext-123"}}}]}
    role = iam.create_role(RoleName=f"writer-{bucket}", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.put_role_policy(RoleName=role["RoleName"], PolicyName="put", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:PutObject"],
                                                 "Resource": f"arn:aws:s3:::{bucket}/{WRITE_PREFIX}/*"}]}))
    monkeypatch.setenv("TEST_EXTERNAL_ID", "ext-123")
    job = s3_job(tmp_path, bucket, moto_s3.endpoint, role_arn=role["Arn"], external_id_env="TEST_EXTERNAL_ID",
                 sts_endpoint_url=moto_s3.endpoint)
    st = S3Storage.from_config(job, credentials_from=SimpleNamespace(aws_access_key_id=key_id,
                                                                      aws_secret_access_key=secret), retry=FAST)
    st.put_bytes(f"{WRITE_PREFIX}/role.json", b"{}", content_type="application/json")
    assert objects(moto_s3, bucket)[f"{WRITE_PREFIX}/role.json"] == b"{}"

    monkeypatch.delenv("TEST_EXTERNAL_ID")
    with pytest.raises(DestinationError, match="TEST_EXTERNAL_ID"):
        S3Storage.from_config(job, retry=FAST)
