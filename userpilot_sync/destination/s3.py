"""Amazon S3 (and S3-compatible) destination: write-only, streaming, retried, checked.

What the exporter sends (and nothing else):

* ``PutObject`` for files up to ``multipart_threshold_bytes`` and for manifests/markers;
* ``CreateMultipartUpload`` / ``UploadPart`` / ``CompleteMultipartUpload`` (all covered by
  ``s3:PutObject``) above the threshold, reading the file one ``multipart_chunk_bytes`` part
  at a time, and ``AbortMultipartUpload`` when an upload fails, so no object and no orphaned
  parts are left — and, through the upload journal (``journal.py``), for the upload a killed
  process left behind (:meth:`S3Storage.abort_upload`, by its recorded upload id);
* ``DeleteObject`` only when the sync job sets ``allow_deletes: true``.

It never calls HeadObject, GetObject or List*. boto3's managed transfer (``upload_file``) is not
used: its threads, retries and part checksums are not under the exporter's control, and a failed
upload must be aborted for sure; the multipart protocol is spoken directly instead.

Integrity (``checksum``): ``when_supported``/``crc32`` send a CRC32 per request (composite CRC32
for multipart), ``sha256`` a SHA-256, ``when_required`` a Content-MD5 (accepted by stores that
reject the flexible checksums boto3 >= 1.36 sends by default), ``none`` no checksum header.

Errors: transient failures (HTTP 5xx, 429, SlowDown, RequestTimeout, timeouts, connection
resets) are retried with exponential backoff (:class:`~userpilot_sync.destination.transport.RetryPolicy`);
AccessDenied, NoSuchBucket, rejected credentials, wrong region or a rejected checksum fail at
once with a :class:`~userpilot_sync.errors.DestinationError` naming the bucket, the key prefix
and the missing permission. Secrets never appear in messages.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import boto3
import botocore.exceptions
from botocore.config import Config
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from userpilot_sync.destination.journal import JournalError
from userpilot_sync.destination.storage import _safe_key
from userpilot_sync.destination.transport import RetryPolicy, require_https
from userpilot_sync.errors import DestinationError
from userpilot_sync.faults import pause_point

if TYPE_CHECKING:
    from userpilot_sync.destination.journal import UploadJournal

#: S3 error codes retried with backoff (besides any HTTP status >= 500).
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody",
})
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException",
})
_PERMISSION = {
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "DeleteObject": "s3:DeleteObject",
}
_ALGORITHM = {"when_supported": "CRC32", "crc32": "CRC32", "sha256": "SHA256"}


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx/429/SlowDown/timeouts, dropped or reset connections."""
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code") in TRANSIENT_CODES or status >= 500 or status == 429
    return False



def boto3_session(dest: Any, credentials_from: Any, environ: dict[str, str]) -> tuple[Any, str | None]:
    """``(boto3 Session, region)`` of an S3 destination: the fields of ``credentials_from`` (a
    dagster-aws ``S3Resource`` or anything with its attribute names) or the standard AWS chain,
    region from the destination or ``credentials_from.region_name``; with ``dest.role_arn`` the
    identity assumes the role through STS (refreshed before expiry). Raises DestinationError
    (missing external id variable)."""
    src = credentials_from
    session_kwargs = {}
    if src is not None:
        for name in ("profile_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            value = getattr(src, name, None)
            if value:
                session_kwargs[name] = value
    region = dest.region or (getattr(src, "region_name", None) if src is not None else None)
    session = boto3.session.Session(region_name=region, **session_kwargs)
    if dest.role_arn:
        session = _assumed_role_session(session, dest, region, getattr(dest, "sts_endpoint_url", None), environ)
    return session, region

def build_s3_client(dest: Any, *, credentials_from: Any = None, retry: RetryPolicy | None = None,
                    environ: dict[str, str] | None = None) -> Any:
    """A boto3 S3 client for an :class:`~userpilot_sync.config.model.S3Destination`.

    Credentials: the standard AWS chain (environment, profile, instance/task role), or the
    fields of ``credentials_from`` (a dagster-aws ``S3Resource`` or anything with its attribute
    names: ``profile_name``, ``aws_access_key_id``, ``aws_secret_access_key``,
    ``aws_session_token``, ``region_name``). With ``dest.role_arn`` that identity assumes the role
    through STS (external id read from the env var ``dest.external_id_env``), refreshed before
    expiry. dagster-aws' own ``get_client()`` is not used because it accepts no botocore
    ``Config`` (checksum mode, timeouts). Raises DestinationError (non-HTTPS endpoint, missing
    external id variable).
    """
    retry = retry or RetryPolicy()
    environ = os.environ if environ is None else environ
    if dest.endpoint_url:
        require_https(dest.endpoint_url, "S3 endpoint_url")
    sts_endpoint = getattr(dest, "sts_endpoint_url", None)
    if sts_endpoint:
        require_https(sts_endpoint, "S3 sts_endpoint_url")
    session, region = boto3_session(dest, credentials_from, environ)
    checksum = dest.checksum
    flexible = "when_supported" if checksum in _ALGORITHM else "when_required"
    config = Config(
        # botocore does not retry: every call goes through S3Storage._call (tenacity), which
        # re-opens/rewinds bodies and knows which S3 error codes are transient.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=retry.connect_timeout_s,
        read_timeout=retry.read_timeout_s,
        request_checksum_calculation=flexible,
        response_checksum_validation="when_required",
        s3={"addressing_style": "auto"},
    )
    return session.client("s3", endpoint_url=dest.endpoint_url, config=config)


def _assumed_role_session(base: Any, dest: Any, region: str | None, sts_endpoint: str | None,
                          environ: dict[str, str]) -> Any:
    from botocore.credentials import RefreshableCredentials
    from botocore.session import get_session

    external_id = None
    if dest.external_id_env:
        external_id = environ.get(dest.external_id_env)
        if not external_id:
            raise DestinationError(
                f"S3 destination s3://{dest.bucket}/{dest.prefix.strip('/')}: environment variable "
                f"{dest.external_id_env} (the external id for role_arn) is not set"
            )
    sts = base.client("sts", region_name=region, endpoint_url=sts_endpoint)

    def refresh() -> dict:
        kwargs = {"RoleArn": dest.role_arn, "RoleSessionName": "userpilot-sync", "DurationSeconds": 3600}
        if external_id:
            kwargs["ExternalId"] = external_id
        try:
            creds = sts.assume_role(**kwargs)["Credentials"]
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise DestinationError(
                f"S3 destination s3://{dest.bucket}: cannot assume role {dest.role_arn} ({code}); the base "
                "identity needs sts:AssumeRole and the role's trust policy must accept it"
                + (" with this external id" if external_id else "")
            ) from None
        return {"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"], "expiry_time": creds["Expiration"].isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(
        metadata=refresh(), refresh_using=refresh, method="sts-assume-role")
    botocore_session = get_session()
    botocore_session._credentials = credentials  # the documented way to inject refreshable creds
    return boto3.session.Session(botocore_session=botocore_session, region_name=region)


class S3Storage:
    """Write-only S3 storage rooted at ``bucket`` (keys are full object keys, prefix included).

    ``client`` is a boto3 S3 client (see :func:`build_s3_client`); sizes are bytes. ``sse`` is
    ``none`` | ``AES256`` (SSE-S3) | ``aws:kms`` (SSE-KMS, ``kms_key_id`` optional: the
    account's AWS-managed key otherwise). ``prefix`` only shapes error messages and ``uri``.
    ``journal``: records every multipart upload (its UploadId as soon as it is known) until it is
    completed or aborted, so the next run can abort one a killed process left (None: no records).
    """

    kind = "s3"

    def __init__(
        self,
        client: Any,
        *,
        bucket: str,
        prefix: str = "",
        sse: str = "none",
        kms_key_id: str | None = None,
        checksum: str = "when_supported",
        multipart_threshold_bytes: int = 64 * 1024 * 1024,
        multipart_chunk_bytes: int = 16 * 1024 * 1024,
        allow_deletes: bool = False,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        journal: "UploadJournal | None" = None,
    ):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.checksum = checksum
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_chunk_bytes = multipart_chunk_bytes
        self.allow_deletes = allow_deletes
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.journal = journal

    @classmethod
    def from_config(cls, job: Any, *, client: Any = None, credentials_from: Any = None,
                    retry: RetryPolicy | None = None, journal: "UploadJournal | None" = None) -> "S3Storage":
        """The storage of ``job.destination`` (an S3Destination); ``journal``: see the class.
        Raises DestinationError."""
        dest = job.destination
        if dest.endpoint_url:
            require_https(dest.endpoint_url, "S3 endpoint_url")
        client = client or build_s3_client(dest, credentials_from=credentials_from, retry=retry)
        return cls(client, bucket=dest.bucket, prefix=dest.prefix, sse=dest.sse, kms_key_id=dest.kms_key_id,
                   checksum=dest.checksum, multipart_threshold_bytes=dest.multipart_threshold_bytes,
                   multipart_chunk_bytes=dest.multipart_chunk_bytes, allow_deletes=dest.allow_deletes,
                   retry=retry, journal=journal)

    # ------------------------------------------------------------------ Storage protocol
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None) -> None:
        """Stream ``path`` to ``key`` (PutObject, or multipart above the threshold; bytes).

        A failed multipart upload is aborted (no object, no stored parts). Raises DestinationError.
        """
        key = _safe_key(key)
        path = Path(path)
        size = path.stat().st_size
        extra = self._object_args(content_type, content_encoding)
        if size > self.multipart_threshold_bytes:
            self._put_multipart(key, path, extra, size)
            return

        def put() -> Any:
            with open(path, "rb") as body:
                return self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                              **extra, **self._body_checksum(path=path))

        self._call("PutObject", key, put)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Upload a small object (manifest, marker) with one PutObject. Raises DestinationError."""
        key = _safe_key(key)
        extra = self._object_args(content_type, None)
        self._call("PutObject", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentLength=len(data), **extra, **self._body_checksum(data=data)))

    def delete(self, key: str) -> None:
        """DeleteObject (needs s3:DeleteObject). Raises DestinationError unless ``allow_deletes``."""
        key = _safe_key(key)
        if not self.allow_deletes:
            raise DestinationError(
                f"refusing to delete {self.uri(key)}: the sync job does not set destination.allow_deletes")
        self._call("DeleteObject", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def check_multipart(self, key: str) -> None:
        """Start and abort one multipart upload at ``key`` (proves s3:AbortMultipartUpload)."""
        key = _safe_key(key)
        extra = self._object_args("application/octet-stream", None)
        created = self._call("CreateMultipartUpload", key, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, **extra, **self._algorithm_arg()))
        self._abort(key, created["UploadId"], raise_errors=True)

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort the multipart upload ``upload_id`` of ``key`` (one AbortMultipartUpload, retried on
        transient errors): True if it was aborted, False if S3 no longer has it (NoSuchUpload:
        completed, or aborted already). Used for uploads a killed process left behind (the upload
        journal); nothing is listed. Raises DestinationError (AccessDenied names the missing
        s3:AbortMultipartUpload)."""
        key = _safe_key(key)

        def abort() -> bool:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return False  # also when an earlier attempt aborted it and its answer was lost
                raise
            return True

        return self._call("AbortMultipartUpload", key, abort)

    # ------------------------------------------------------------------ internals
    def _object_args(self, content_type: str, content_encoding: str | None) -> dict:
        args: dict[str, Any] = {"ContentType": content_type}
        if content_encoding:
            args["ContentEncoding"] = content_encoding
        if self.sse == "AES256":
            args["ServerSideEncryption"] = "AES256"
        elif self.sse == "aws:kms":
            args["ServerSideEncryption"] = "aws:kms"
            if self.kms_key_id:
                args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def _algorithm_arg(self) -> dict:
        alg = _ALGORITHM.get(self.checksum)
        return {"ChecksumAlgorithm": alg} if alg else {}

    def _body_checksum(self, *, data: bytes | None = None, path: Path | None = None) -> dict:
        if self.checksum in _ALGORITHM:
            return self._algorithm_arg()  # botocore computes the value from the body
        if self.checksum == "when_required":
            md5 = hashlib.md5(usedforsecurity=False)
            if data is not None:
                md5.update(data)
            else:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1024 * 1024), b""):
                        md5.update(block)
            return {"ContentMD5": base64.b64encode(md5.digest()).decode("ascii")}
        return {}

    def _put_multipart(self, key: str, path: Path, extra: dict, size: int | None = None) -> None:
        journal = self.journal
        # Recorded before the upload exists, with its UploadId as soon as S3 answers: a process
        # killed in between leaves a record without an id (logged by the cleanup; the bucket's
        # AbortIncompleteMultipartUpload lifecycle rule removes such an upload).
        record = journal.begin("s3_multipart", key, bucket=self.bucket, size=size) if journal else None
        try:
            created = self._call("CreateMultipartUpload", key, lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, **extra, **self._algorithm_arg()))
        except BaseException:
            if record is not None:
                journal.end(record)
            raise
        upload_id = created["UploadId"]
        alg = _ALGORITHM.get(self.checksum)
        parts: list[dict] = []
        uploaded = 0
        try:
            if record is not None:
                record = journal.update(record, upload_id=upload_id)
            with open(path, "rb") as f:
                number = 1
                while True:
                    chunk = f.read(self.multipart_chunk_bytes)
                    if not chunk:
                        break
                    response = self._call("UploadPart", key, lambda c=chunk, n=number: self.client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=c,
                        **self._body_checksum(data=c)))
                    part = {"PartNumber": number, "ETag": response["ETag"]}
                    if alg and response.get(f"Checksum{alg}"):
                        part[f"Checksum{alg}"] = response[f"Checksum{alg}"]
                    parts.append(part)
                    uploaded += len(chunk)
                    if record is not None:
                        try:  # progress only (the record with the upload id is what crash safety needs)
                            record = journal.update(record, bytes=uploaded)
                        except JournalError:
                            pass
                    if number == 1:
                        pause_point("multipart")  # fault tests: first part stored, upload not completed
                    number += 1
            self._call("CompleteMultipartUpload", key, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}),
                completes=True)
        except BaseException:
            if self._abort(key, upload_id) and record is not None:
                journal.end(record)
            # else the record stays: the next run after this process has exited aborts it again
            raise
        if record is not None:
            journal.end(record)

    def _abort(self, key: str, upload_id: str, raise_errors: bool = False) -> bool:
        """Abort an upload of this process; True when S3 confirmed it (or no longer has it)."""
        try:
            self.abort_upload(key, upload_id)
        except DestinationError:
            if raise_errors:
                raise
            # The original error is more useful; the journal's record (if any) stays for the next
            # run, and a lifecycle rule (AbortIncompleteMultipartUpload) removes what nobody aborts.
            return False
        return True

    def _call(self, operation: str, key: str, fn: Callable[[], Any], completes: bool = False) -> Any:
        """Run one S3 request with retries on transient errors; map the rest to DestinationError."""
        attempts = {"n": 0}

        def attempt() -> Any:
            attempts["n"] += 1
            try:
                return fn()
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if completes and code == "NoSuchUpload" and attempts["n"] > 1:
                    # An earlier attempt completed the upload but its answer was lost.
                    return {}
                raise

        p = self.retry
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(p.max_attempts) | stop_after_delay(p.deadline_s),
            wait=wait_random_exponential(multiplier=p.initial_backoff_s, exp_base=p.multiplier, max=p.max_backoff_s),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except DestinationError:
            raise
        except botocore.exceptions.NoCredentialsError:
            raise DestinationError(
                f"S3 destination {self._where()}: no AWS credentials found (environment, profile, instance "
                "role or role_arn)") from None
        except botocore.exceptions.ClientError as exc:
            raise self._permanent(operation, key, exc, attempts["n"]) from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                ConnectionError, TimeoutError) as exc:
            raise DestinationError(
                f"S3 destination {self._where()}: {operation} of {key} failed after {attempts['n']} attempt(s) "
                f"({type(exc).__name__}); the endpoint is unreachable or keeps timing out") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise DestinationError(
                f"S3 destination {self._where()}: {operation} of {key} failed ({type(exc).__name__})") from None

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _permanent(self, operation: str, key: str, exc: botocore.exceptions.ClientError, attempts: int) -> DestinationError:
        err = exc.response.get("Error", {})
        code = err.get("Code") or "error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = self._where()
        resource = f"arn:aws:s3:::{self.bucket}/{self.prefix + '/' if self.prefix else ''}*"
        if is_transient(exc):
            return DestinationError(
                f"S3 destination {where}: {operation} of {key} still failing after {attempts} attempts "
                f"({code}, HTTP {status}); the service is unavailable or throttling, retry later")
        if code.startswith("KMS.") or (code == "AccessDenied" and "kms" in str(err.get("Message", "")).lower()):
            return DestinationError(
                f"S3 destination {where}: SSE-KMS key {self.kms_key_id or '(AWS-managed)'} refused {operation} "
                f"({code}); the credential needs kms:GenerateDataKey and kms:Decrypt on the key")
        if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem") or (status == 403 and code not in _CREDENTIAL_CODES):
            permission = _PERMISSION.get(operation, "s3:PutObject")
            extra = " (and kms:GenerateDataKey, kms:Decrypt on the SSE-KMS key)" if self.sse == "aws:kms" else ""
            return DestinationError(
                f"S3 destination {where}: access denied for {operation} of {key} ({code}); the credential "
                f"needs {permission} on {resource}{extra}")
        if code == "NoSuchBucket":
            return DestinationError(
                f"S3 destination {where}: bucket {self.bucket} does not exist (NoSuchBucket); check "
                "destination.bucket, region and endpoint_url")
        if code in _CREDENTIAL_CODES:
            return DestinationError(
                f"S3 destination {where}: the AWS credentials were rejected ({code}); check the access key, "
                "secret and session token of the sync job's identity")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return DestinationError(
                f"S3 destination {where}: the bucket is in another region ({code}); set destination.region")
        if code in ("InvalidArgument", "InvalidRequest", "NotImplemented", "InvalidDigest", "MissingContentLength"):
            return DestinationError(
                f"S3 destination {where}: {operation} of {key} rejected ({code}); if this S3-compatible store "
                "rejects checksum or encryption headers, set destination.checksum: when_required (or none) "
                "and check destination.sse")
        return DestinationError(f"S3 destination {where}: {operation} of {key} failed ({code}, HTTP {status})")
