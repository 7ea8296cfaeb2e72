"""Crash leftovers in the destination (the upload journal): a killed writer's local temp files and
S3 multipart uploads are cleaned by the next run from local records only — never by listing or
reading the destination (the tests list, as an admin, to verify)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.journal import (
    JOURNAL_FOLDER,
    UploadJournal,
    clean_leftover_uploads,
    journal_folder,
)
from userpilot_sync.destination.s3 import S3Storage
from userpilot_sync.destination.storage import LocalStorage
from userpilot_sync.destination.transport import RetryPolicy
from userpilot_sync.errors import DestinationError
from userpilot_sync.faults import PAUSE_AT_ENV, PAUSE_DIR_ENV
from userpilot_sync_tests.fixtures_core import make_job
from userpilot_sync_tests.fixtures_storage import WRITE_PREFIX, RecordingProxy, _policy

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=20,
                   connect_timeout_s=5, read_timeout_s=30)
KEY = f"{WRITE_PREFIX}/userpilot_datasync_10001_NX-demo0001/2026-03-09/track.parquet"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _collect() -> tuple[list[str], Callable[[str], None]]:
    lines: list[str] = []
    return lines, lines.append


# ------------------------------------------------------------------------------------- core (local)
# A writer killed after it wrote its temp file, before the rename: the process ends at once
# (no finally block runs), as with kill -9.
_CRASHING_LOCAL_WRITER = """
import os, sys
from pathlib import Path
from userpilot_sync.destination.journal import UploadJournal
from userpilot_sync.destination.storage import LocalStorage
root, journal, key = sys.argv[1:]
write_bytes = Path.write_bytes
def write_then_die(self, data):
    write_bytes(self, data)
    os._exit(9)
Path.write_bytes = write_then_die
LocalStorage(Path(root), journal=UploadJournal(journal)).put_bytes(key, b"x" * 1500, content_type="application/octet-stream")
"""


def test_a_dead_writers_temp_file_is_removed_and_logged_with_its_size(tmp_path):
    job = make_job(tmp_path)
    journal = UploadJournal.for_sync_job(tmp_path / "staging", job.name)
    assert journal.folder == tmp_path / "staging" / "demo" / JOURNAL_FOLDER == journal_folder(tmp_path / "staging", "demo")
    storage = build_storage(job, journal=journal)
    crashed = subprocess.Popen([sys.executable, "-c", _CRASHING_LOCAL_WRITER, str(storage.root), str(journal.folder),
                                KEY], cwd=REPO, stderr=subprocess.PIPE, text=True)
    _, stderr = crashed.communicate(timeout=60)
    assert crashed.returncode == 9, stderr
    target = storage.path(KEY)
    leftovers = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1500 and not target.exists()
    [record] = journal.records()
    assert (record.kind, record.key, record.tmp_name, record.pid) == ("local_tmp", KEY, leftovers[0].name, crashed.pid)
    assert record.size == 1500 and record.created.endswith("+00:00") and record.start_time

    lines, log = _collect()
    later = datetime.now(timezone.utc) + timedelta(hours=3)
    [leftover] = clean_leftover_uploads(journal, lambda: storage, log, now=later)
    assert (leftover.kind, leftover.key, leftover.outcome, leftover.bytes) == ("local_tmp", KEY, "removed", 1500)
    assert leftover.cleaned and 3 * 3600 - 60 < leftover.age_s < 3 * 3600 + 60
    assert not leftovers[0].exists() and journal.records() == []
    assert len(lines) == 1 and KEY in lines[0] and "1,500 bytes" in lines[0] and "3.0 h old" in lines[0]
    # nothing else in the destination was touched, and a second cleanup finds nothing
    assert clean_leftover_uploads(journal, storage, log) == [] and len(lines) == 1


def test_a_live_writers_records_are_never_touched(tmp_path):
    storage = LocalStorage(tmp_path / "exports")
    journal = UploadJournal(tmp_path / "journal")
    target = storage.path(KEY)
    target.parent.mkdir(parents=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    mine = journal.begin("local_tmp", KEY, tmp_name=tmp.name, path=tmp)  # this process: alive
    tmp.write_bytes(b"partial")
    called = []
    lines, log = _collect()
    assert clean_leftover_uploads(journal, lambda: called.append(1) or storage, log) == []
    assert tmp.exists() and journal.records() == [mine] and lines == [] and called == []  # no storage built

    # the same pid with another start time is another process (pid reuse): the writer is dead
    journal.update(mine, start_time="1")
    [leftover] = clean_leftover_uploads(journal, storage, log)
    assert leftover.outcome == "removed" and not tmp.exists() and journal.records() == []


def test_writes_with_a_journal_leave_no_records_and_without_one_behave_as_before(tmp_path):
    journal = UploadJournal(tmp_path / "journal")
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 100)
    with_journal = LocalStorage(tmp_path / "a", journal=journal)
    with_journal.put_file(KEY, src, content_type="application/octet-stream")
    with_journal.put_bytes(KEY + ".json", b"{}", content_type="application/json")
    assert journal.records() == [] and with_journal.path(KEY).read_bytes() == src.read_bytes()
    plain = LocalStorage(tmp_path / "b")
    plain.put_file(KEY, src, content_type="application/octet-stream")
    assert plain.journal is None and plain.path(KEY).read_bytes() == src.read_bytes()
    assert not (tmp_path / "b" / JOURNAL_FOLDER).exists()
    assert sorted(p.name for p in with_journal.path(KEY).parent.iterdir()) == ["track.parquet", "track.parquet.json"]


def test_records_a_storage_cannot_clean_are_kept_and_logged_once(tmp_path):
    journal = UploadJournal(tmp_path / "journal")
    storage = LocalStorage(tmp_path / "exports")
    s3_record = journal.begin("s3_multipart", KEY, bucket="lake", upload_id="u-1", size=10)
    journal.update(s3_record, pid=_dead_pid(), start_time="1", bytes=5)
    lines, log = _collect()
    [kept] = clean_leftover_uploads(journal, storage, log)
    assert kept.outcome == "kept" and not kept.cleaned and "'local'" in kept.detail
    assert len(lines) == 1 and "s3://lake/" + KEY in lines[0] and "logged once" in lines[0]
    assert clean_leftover_uploads(journal, storage, log)[0].outcome == "kept" and len(lines) == 1
    assert len(journal.records()) == 1

    # a temp-file name that is not one of the storage's temp files is never deleted
    victim = storage.path(KEY)
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"the real export")
    bogus = journal.begin("local_tmp", KEY, tmp_name=victim.name)
    journal.update(bogus, pid=_dead_pid(), start_time="1")
    outcomes = {r.kind: r for r in clean_leftover_uploads(journal, storage, log)}
    assert outcomes["local_tmp"].outcome == "failed" and "refusing" in outcomes["local_tmp"].detail
    assert victim.read_bytes() == b"the real export"
    with pytest.raises(DestinationError, match="refusing"):
        clean_leftover_uploads(journal, storage, log, strict=True)


def test_a_writer_killed_before_it_learnt_the_upload_id_is_reported(tmp_path):
    journal = UploadJournal(tmp_path / "journal")
    record = journal.begin("s3_multipart", KEY, bucket="lake", size=10)
    journal.update(record, pid=_dead_pid(), start_time="1")
    storage = S3Storage(client=None, bucket="lake", prefix=WRITE_PREFIX)  # no request may be sent
    lines, log = _collect()
    [leftover] = clean_leftover_uploads(journal, storage, log)
    assert leftover.outcome == "untracked" and journal.records() == []
    assert "AbortIncompleteMultipartUpload" in lines[0] and KEY in lines[0]


# ------------------------------------------------------------------------------------- S3 (moto)
def _bucket(moto_s3, request) -> str:
    return moto_s3.create_bucket("j-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12])


def _s3_job(tmp_path: Path, bucket: str, endpoint: str):
    return make_job(tmp_path, destination={"kind": "s3", "bucket": bucket, "prefix": WRITE_PREFIX,
                                           "endpoint_url": endpoint, "region": "us-east-1",
                                           "multipart_threshold_bytes": 5 * MiB, "multipart_chunk_bytes": 5 * MiB})


def _storage(moto_s3, job, keys, journal=None) -> S3Storage:
    key_id, secret = keys
    return S3Storage.from_config(job, credentials_from=SimpleNamespace(aws_access_key_id=key_id,
                                                                       aws_secret_access_key=secret),
                                 retry=FAST, journal=journal)


def _uploads(moto_s3, bucket: str) -> list[dict]:
    return moto_s3.client("admin").list_multipart_uploads(Bucket=bucket).get("Uploads", [])


_PAUSING_S3_WRITER = """
import sys
from pathlib import Path
from types import SimpleNamespace
from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.journal import UploadJournal
from userpilot_sync.destination.s3 import S3Storage
job, key_id, secret, journal, path, key = sys.argv[1:]
storage = S3Storage.from_config(SyncJob.model_validate_json(job), journal=UploadJournal(journal),
    credentials_from=SimpleNamespace(aws_access_key_id=key_id, aws_secret_access_key=secret))
storage.put_file(key, Path(path), content_type="application/vnd.apache.parquet")
"""


@pytest.mark.integration
def test_a_killed_multipart_upload_is_aborted_by_the_next_run(moto_s3, tmp_path, request):
    bucket = _bucket(moto_s3, request)
    proxy = RecordingProxy(upstream=moto_s3.endpoint.split("//")[1])
    try:
        job = _s3_job(tmp_path, bucket, proxy.url)
        journal = UploadJournal.for_sync_job(tmp_path / "staging", job.name)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 * MiB))
        pause_dir = tmp_path / "pause"
        pause_dir.mkdir()
        env = dict(os.environ, **{PAUSE_AT_ENV: "multipart", PAUSE_DIR_ENV: str(pause_dir)})
        key_id, secret = moto_s3.keys["writer"]
        writer = subprocess.Popen(
            [sys.executable, "-c", _PAUSING_S3_WRITER, job.model_dump_json(), key_id, secret, str(journal.folder),
             str(big), KEY], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not (pause_dir / "multipart").exists():
                assert writer.poll() is None, writer.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the writer never reached the multipart pause point"
                time.sleep(0.05)
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        finally:
            if writer.poll() is None:
                os.killpg(writer.pid, signal.SIGKILL)
                writer.wait()

        [upload] = _uploads(moto_s3, bucket)
        assert upload["Key"] == KEY
        [record] = journal.records()
        assert (record.kind, record.bucket, record.key, record.upload_id) == ("s3_multipart", bucket, KEY,
                                                                             upload["UploadId"])
        assert record.pid == writer.pid and record.bytes == 5 * MiB and record.size == 12 * MiB

        proxy.clear()
        lines, log = _collect()
        later = datetime.now(timezone.utc) + timedelta(hours=2)
        [leftover] = clean_leftover_uploads(journal, lambda: _storage(moto_s3, job, moto_s3.keys["writer"]), log,
                                            now=later)
        assert (leftover.outcome, leftover.key, leftover.bytes, leftover.upload_id) == (
            "aborted", KEY, 5 * MiB, upload["UploadId"])
        assert _uploads(moto_s3, bucket) == [] and journal.records() == []
        assert len(lines) == 1 and KEY in lines[0] and "5,242,880 bytes" in lines[0] and "2.0 h old" in lines[0]
        # exactly one request, an AbortMultipartUpload: nothing listed, headed or read
        assert [(r.method, sorted(r.query)) for r in proxy.log] == [("DELETE", ["uploadId"])]
        assert proxy.log[0].status == 204
    finally:
        proxy.close()


@pytest.mark.integration
def test_abort_needs_only_the_write_only_credential_and_a_missing_permission_is_named(moto_s3, tmp_path, request):
    import boto3

    bucket = _bucket(moto_s3, request)
    job = _s3_job(tmp_path, bucket, moto_s3.endpoint)
    journal = UploadJournal(tmp_path / "journal")

    # a multipart upload through the storage with a journal: completed, so no record is left
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB))
    _storage(moto_s3, job, moto_s3.keys["writer"], journal).put_file(KEY, big, content_type="application/octet-stream")
    assert journal.records() == [] and _uploads(moto_s3, bucket) == []

    # an upload a dead writer left: one part stored, the record names the dead writer
    admin = moto_s3.client("admin")
    upload_id = admin.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
    admin.upload_part(Bucket=bucket, Key=KEY, UploadId=upload_id, PartNumber=1, Body=b"x" * (5 * MiB))
    record = journal.begin("s3_multipart", KEY, bucket=bucket, upload_id=upload_id, size=12 * MiB)
    journal.update(record, pid=_dead_pid(), start_time="1", bytes=5 * MiB)

    # PutObject only (no s3:AbortMultipartUpload): the record is kept and the permission named
    key_id, secret = moto_s3.keys["admin"]
    iam = boto3.client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1",
                       aws_access_key_id=key_id, aws_secret_access_key=secret)
    user = f"putonly-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="put", PolicyDocument=_policy(
        "s3:PutObject", resource=f"arn:aws:s3:::*/{WRITE_PREFIX}/*"))
    access = iam.create_access_key(UserName=user)["AccessKey"]
    put_only = _storage(moto_s3, job, (access["AccessKeyId"], access["SecretAccessKey"]))
    lines, log = _collect()
    [failed] = clean_leftover_uploads(journal, put_only, log)
    assert failed.outcome == "failed" and "s3:AbortMultipartUpload" in failed.detail
    assert "s3:AbortMultipartUpload" in lines[0] and access["SecretAccessKey"] not in lines[0]
    assert len(journal.records()) == 1 and len(_uploads(moto_s3, bucket)) == 1
    with pytest.raises(DestinationError, match="s3:AbortMultipartUpload"):
        clean_leftover_uploads(journal, put_only, strict=True)

    # the write-only credential (s3:PutObject + s3:AbortMultipartUpload) cleans it
    [aborted] = clean_leftover_uploads(journal, _storage(moto_s3, job, moto_s3.keys["writer"]), log)
    assert aborted.outcome == "aborted" and _uploads(moto_s3, bucket) == [] and journal.records() == []

    # an upload that no longer exists (completed or aborted meanwhile) counts as gone
    again = journal.begin("s3_multipart", KEY, bucket=bucket, upload_id=upload_id)
    journal.update(again, pid=_dead_pid(), start_time="1")
    [gone] = clean_leftover_uploads(journal, _storage(moto_s3, job, moto_s3.keys["writer"]), log)
    assert gone.outcome == "gone" and gone.cleaned and journal.records() == []
