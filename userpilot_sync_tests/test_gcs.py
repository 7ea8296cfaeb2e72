"""GCS destination against fake-gcs-server on loopback, behind a token-checking proxy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.check import check_destination, marker_key
from userpilot_sync.destination.gcs import GcsStorage, ObjectExistsError, build_gcs_client
from userpilot_sync.destination.superseded import delete_superseded, superseded_paths
from userpilot_sync.destination.transport import RetryPolicy
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.errors import DestinationError
from userpilot_sync.pipeline import sync_partition
from userpilot_sync_tests.fixtures_core import NOW, PARTITION, make_job
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy

pytestmark = pytest.mark.integration

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=30, connect_timeout_s=5, read_timeout_s=30)
WRITER, CREATOR, ADMIN = "writer-token", "creator-token", "admin-token"
KMS = "projects/p/locations/eu/keyRings/r/cryptoKeys/k"


def is_upload(r) -> bool:
    """Object inserts: POST /upload/storage/v1/b/<b>/o, and PUTs to a resumable session."""
    return r.path.startswith("/upload/storage/v1/b/") and r.method in ("POST", "PUT")


def is_create(r) -> bool:
    return is_upload(r) and r.method == "POST"


@pytest.fixture
def proxy(fake_gcs):
    """Bearer-token IAM in front of the emulator: writer = create + delete (the custom role),
    creator = roles/storage.objectCreator (create only, no overwrite), admin = everything."""
    p = RecordingProxy(upstream=fake_gcs.endpoint.split("//")[1], keep_bodies=False)

    def deny(msg=b"forbidden"):
        body = json.dumps({"error": {"code": 403, "message": msg.decode()}}).encode()
        return 403, body, {"Content-Type": "application/json"}

    def iam(r):
        token = r.headers.get("authorization", "").removeprefix("Bearer ")
        if token == ADMIN:
            return p.extra_fault(r) if p.extra_fault else None
        if token not in (WRITER, CREATOR):
            return 401, b'{"error": {"code": 401, "message": "no credentials"}}', {"Content-Type": "application/json"}
        if token == WRITER and r.method == "DELETE" and r.path.startswith("/storage/v1/b/") and "/o/" in r.path:
            return p.extra_fault(r) if p.extra_fault else None
        if not is_upload(r):
            return deny()
        if token == CREATOR and is_create(r) and "ifGenerationMatch" not in r.query:
            return deny(b"storage.objects.delete needed to overwrite")
        return p.extra_fault(r) if p.extra_fault else None

    p.extra_fault = None
    p.fault = iam
    yield p
    p.close()


def gcs_job(tmp_path: Path, bucket: str, **dest) -> SyncJob:
    destination = {"kind": "gcs", "bucket": bucket, "project": "test-project", "prefix": WRITE_PREFIX}
    destination.update(dest)
    return make_job(tmp_path, destination=destination)


def storage(fake_gcs, job, endpoint=None, token=WRITER, generations=None) -> GcsStorage:
    return GcsStorage.from_config(job, client=fake_gcs.client(endpoint=endpoint, token=token),
                                  generations=generations, retry=FAST)


def objects(fake_gcs, bucket: str) -> dict[str, bytes]:
    client = fake_gcs.client()
    return {b.name: b.download_as_bytes() for b in client.list_blobs(bucket)}


def _bucket(fake_gcs, request) -> str:
    return fake_gcs.create_bucket("b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12])


def test_partition_lands_write_only(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    job = gcs_job(tmp_path, bucket, kms_key_name=KMS)
    st = storage(fake_gcs, job, proxy.url)
    result = sync_partition(job, PARTITION, tmp_path / "staging", storage=st, now=NOW)

    layout = layout_for(job)
    stored = objects(fake_gcs, bucket)
    assert set(stored) == {layout.key(f.path) for f in result.files} | {result.manifest_key}
    for f in result.files:
        body = stored[layout.key(f.path)]
        assert len(body) == f.bytes and hashlib.sha256(body).hexdigest() == f.sha256
    assert json.loads(stored[result.manifest_key])["partition"] == PARTITION
    # write-only: every request was an upload that the token proxy let through
    assert proxy.log and all(is_upload(r) and r.status == 200 for r in proxy.log)
    creates = [r for r in proxy.log if is_create(r)]
    assert all(r.query["ifGenerationMatch"] == ["0"] for r in creates)  # first writes
    assert all(r.query.get("kmsKeyName") == [KMS] for r in creates)  # CMEK requested (emulator ignores it)
    assert all(b'"crc32c"' in r.body for r in creates if r.query["uploadType"] == ["multipart"])
    # the storage recorded every generation for the instance to persist
    assert set(st.written) == set(stored) and all(g > 0 for g in st.written.values())


def test_reads_lists_and_deletes_are_refused_by_the_proxy(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    writer = fake_gcs.client(endpoint=proxy.url, token=WRITER)
    from google.api_core.exceptions import Forbidden

    with pytest.raises(Forbidden):
        list(writer.list_blobs(bucket))
    with pytest.raises(Forbidden):
        writer.bucket(bucket).blob("x").download_as_bytes()


def test_resumable_upload_with_crc32c_and_injected_errors(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    job = gcs_job(tmp_path, bucket, resumable_threshold_bytes=256 * 1024, resumable_chunk_bytes=256 * 1024)
    data = os.urandom(900 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    count = {"n": 0}

    def flaky(r):
        count["n"] += 1
        return (503, b"{}", {"Content-Type": "application/json"}) if count["n"] in (1, 3) else None

    proxy.extra_fault = flaky
    st = storage(fake_gcs, job, proxy.url)
    key = f"{WRITE_PREFIX}/big.parquet"
    gen = st.put_file(key, path, content_type="application/vnd.apache.parquet")
    assert objects(fake_gcs, bucket)[key] == data
    assert st.generations[key] == gen
    assert [r.query.get("uploadType") for r in proxy.log if is_create(r)][0] == ["resumable"]
    assert sum(1 for r in proxy.log if r.method == "PUT") >= 4  # chunks
    assert any(r.status == 503 for r in proxy.log)
    final = [r for r in proxy.log if r.method == "PUT" and r.status == 200][-1]
    assert "crc32c=" in final.headers.get("x-goog-hash", "")


def test_generation_preconditions_on_retry_and_overwrite(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    job = gcs_job(tmp_path, bucket)
    generations: dict[str, int] = {}
    st = storage(fake_gcs, job, proxy.url, generations=generations)
    key = f"{WRITE_PREFIX}/m.json"

    # the first answer is lost after the server stored the object: the retry (ifGenerationMatch=0)
    # gets 412, and the storage replaces its own object (no recorded generation yet)
    lost = {"done": False}

    def lose_first(r):
        if is_create(r) and not lost["done"]:
            lost["done"] = True
            return "forward-then-503"
        return None

    proxy.extra_fault = lose_first
    g1 = st.put_bytes(key, b"one", content_type="application/json")
    creates = [r for r in proxy.log if is_create(r)]
    assert [c.query.get("ifGenerationMatch") for c in creates] == [["0"], ["0"], None]
    assert [c.status for c in creates] == [503, 412, 200]
    assert generations[key] == g1

    # an overwrite carries the recorded generation
    proxy.clear()
    g2 = st.put_bytes(key, b"two", content_type="application/json")
    assert [r.query.get("ifGenerationMatch") for r in proxy.log if is_create(r)] == [[str(g1)]]
    assert g2 != g1 and generations[key] == g2

    # a stale recorded generation (someone else wrote since) fails: nothing replaced
    fake_gcs.client().bucket(bucket).blob(key).upload_from_string(b"other")
    with pytest.raises(DestinationError, match="changed since generation"):
        st.put_bytes(key, b"three", content_type="application/json")
    assert objects(fake_gcs, bucket)[key] == b"other"


def test_objectcreator_credential_refuses_reexport_before_writing(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    job = gcs_job(tmp_path, bucket, overwrite="refuse")
    generations: dict[str, int] = {}
    first = sync_partition(job, PARTITION, tmp_path / "s1",
                           storage=storage(fake_gcs, job, proxy.url, CREATOR, generations), now=NOW)
    assert first.manifest_key in generations
    proxy.clear()
    st = storage(fake_gcs, job, proxy.url, CREATOR, generations)
    with pytest.raises(ObjectExistsError, match="overwrite"):
        st.assert_can_write([first.manifest_key])
    with pytest.raises(ObjectExistsError, match="refuse"):
        sync_partition(job, PARTITION, tmp_path / "s2", storage=st, now=NOW)
    assert proxy.log == []  # refused before any request

    # instance state lost: the first-write precondition protects the object
    st = storage(fake_gcs, job, proxy.url, CREATOR, {})
    with pytest.raises(ObjectExistsError, match="already exists"):
        st.put_bytes(first.manifest_key, b"{}", content_type="application/json")

    # in overwrite mode the same credential cannot replace: a clear error naming the permission
    over = gcs_job(tmp_path, bucket, overwrite="overwrite")
    with pytest.raises(DestinationError, match="storage.objects.delete"):
        storage(fake_gcs, over, proxy.url, CREATOR, {}).put_bytes(first.manifest_key, b"{}",
                                                                   content_type="application/json")


def test_reexport_overwrites_in_place_and_superseded_deletes(fake_gcs, proxy, tmp_path, request):
    bucket = _bucket(fake_gcs, request)
    generations: dict[str, int] = {}
    first_job = gcs_job(tmp_path, bucket).model_copy(update={"max_file_rows": 200})
    first = sync_partition(first_job, PARTITION, tmp_path / "s1",
                           storage=storage(fake_gcs, first_job, proxy.url, generations=generations), now=NOW)
    job = gcs_job(tmp_path, bucket)
    manifest_gen = generations[first.manifest_key]
    proxy.clear()
    second = sync_partition(job, PARTITION, tmp_path / "s2",
                            storage=storage(fake_gcs, job, proxy.url, generations=generations), now=NOW)
    # the manifest is replaced in place under the generation the first run recorded
    creates = [r for r in proxy.log if is_create(r)]
    assert creates[-1].query["ifGenerationMatch"] == [str(manifest_gen)]
    assert all(r.status == 200 for r in creates)  # no 412: recorded generations matched
    assert generations[second.manifest_key] != manifest_gen
    old = superseded_paths(first.files, second.files)
    assert old and all("_0000" in p for p in old)
    layout = layout_for(job)
    assert delete_superseded(storage(fake_gcs, job, proxy.url, generations=generations), layout, old,
                             allow_deletes=False) == []
    assert not any(r.method == "DELETE" for r in proxy.log)
    deleting = gcs_job(tmp_path, bucket, allow_deletes=True)
    st = storage(fake_gcs, deleting, proxy.url, generations=generations)
    assert delete_superseded(st, layout, old, allow_deletes=True) == old
    deletes = [r for r in proxy.log if r.method == "DELETE"]
    assert len(deletes) == len(old) and all(r.query.get("ifGenerationMatch") for r in deletes)
    remaining = set(objects(fake_gcs, bucket))
    assert not {layout.key(p) for p in old} & remaining
    assert {layout.key(f.path) for f in second.files} | {second.manifest_key} <= remaining
    assert not {layout.key(p) for p in old} & set(generations)


def test_errors_are_clear_and_fast(fake_gcs, proxy, tmp_path, request):
    job = gcs_job(tmp_path, "missing-bucket-gcs")
    with pytest.raises(DestinationError, match="does not exist"):
        storage(fake_gcs, job, proxy.url).put_bytes(f"{WRITE_PREFIX}/a", b"x", content_type="text/plain")
    bucket = _bucket(fake_gcs, request)
    with pytest.raises(DestinationError, match="credentials were rejected"):
        storage(fake_gcs, gcs_job(tmp_path, bucket), proxy.url, token="bogus").put_bytes(
            f"{WRITE_PREFIX}/a", b"x", content_type="text/plain")


def test_connection_check(fake_gcs, proxy, tmp_path, request, monkeypatch):
    bucket = _bucket(fake_gcs, request)
    job = gcs_job(tmp_path, bucket)
    result = check_destination(job, storage(fake_gcs, job, proxy.url))
    assert result.ok and result.uri == f"gs://{bucket}/{marker_key(job)}"
    assert json.loads(objects(fake_gcs, bucket)[marker_key(job)])["sync_job"] == job.name
    again = check_destination(job, storage(fake_gcs, job, proxy.url, CREATOR))  # refuse-less overwrite: denied
    assert not again.ok and "storage.objects.delete" in again.message
    refuse = gcs_job(tmp_path, bucket, overwrite="refuse")
    assert check_destination(refuse, storage(fake_gcs, refuse, proxy.url, CREATOR)).ok
    bad = check_destination(job, storage(fake_gcs, job, proxy.url, token="bogus"))
    assert not bad.ok and "credentials" in bad.message


def test_emulator_host_must_be_loopback_or_https(tmp_path, fake_gcs):
    job = gcs_job(tmp_path, "some-bucket")
    with pytest.raises(DestinationError, match="https"):
        build_gcs_client(job.destination, environ={"STORAGE_EMULATOR_HOST": "http://10.1.2.3:4443"})
    client = build_gcs_client(job.destination, environ={"STORAGE_EMULATOR_HOST": fake_gcs.endpoint})
    assert client is not None
    job = gcs_job(tmp_path, "some-bucket", credentials_file_env="NO_SUCH_VAR_FOR_TEST")
    with pytest.raises(DestinationError, match="NO_SUCH_VAR_FOR_TEST"):
        build_gcs_client(job.destination, environ={})
