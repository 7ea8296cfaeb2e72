"""Google Cloud Storage destination: write-only, generation preconditions, resumable uploads.

Requests sent (and nothing else): object inserts (``POST /upload/storage/v1/b/<bucket>/o``,
multipart up to ``resumable_threshold_bytes``, resumable sessions of ``resumable_chunk_bytes``
chunks above it) and, only when the sync job sets ``allow_deletes``, ``DELETE`` of superseded
objects. No get, list or metadata read: the generation of every object the exporter wrote is
recorded by the caller (the Dagster instance), not read from the bucket.

**Generations.** ``GcsStorage.generations`` is a ``{object key: generation}`` mapping the caller
loads from the instance before a run (e.g. the previous materialization's metadata) and persists
after it (``GcsStorage.written`` holds what this run wrote). Every upload carries
``ifGenerationMatch``: the recorded generation for an overwrite, ``0`` for a first write, so a
retried upload can never clobber a newer object. After a successful upload the new generation is
stored in both mappings and returned.

**Re-exports (overwrites).** On GCS replacing an object needs ``storage.objects.delete`` besides
``storage.objects.create``; ``roles/storage.objectCreator`` lacks it. ``overwrite`` chooses:

* ``overwrite`` (default): re-exports replace objects in place, so glob readers never see a day
  twice. The credential needs a custom role with ``storage.objects.create`` +
  ``storage.objects.delete`` (no get, no list; see docs/destinations.md). When a first-write
  precondition (``0``) fails, the object exists without a generation in the instance (the lost
  answer of our own retried upload, or an instance that lost its state): the upload is repeated
  without a precondition (the sync job's run lock makes this run the only writer of the
  partition). When a *recorded* generation no longer matches, someone else changed the object:
  DestinationError, nothing replaced.
* ``refuse``: for a plain ``roles/storage.objectCreator`` credential. Every upload is a first
  write (``ifGenerationMatch=0``); :meth:`GcsStorage.assert_can_write` (call it with the
  partition's manifest key and its previously recorded files before writing) and every upload of
  a key with a recorded generation raise :class:`ObjectExistsError` before any byte is sent.

Transient errors (429, 5xx, timeouts, connection resets) are retried with exponential backoff
(google-api-core ``Retry``); 401/403/404 fail at once with a DestinationError naming the bucket,
prefix and missing permission. ``STORAGE_EMULATOR_HOST`` (tests) must be loopback or https.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, MutableMapping

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage.retry import _should_retry

from userpilot_sync.destination.storage import _safe_key
from userpilot_sync.destination.transport import RetryPolicy, require_https
from userpilot_sync.errors import DestinationError

#: OAuth scope of an object-creating credential (read_write: full_control is not needed).
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_MULTIPART_MAX = 8 * 1024 * 1024  # google-cloud-storage uses resumable uploads above this size


class ObjectExistsError(DestinationError):
    """The object exists and the destination may not (or cannot safely) replace it."""


def build_gcs_client(dest: Any, *, credentials: Any = None, environ: dict[str, str] | None = None) -> storage.Client:
    """A google-cloud-storage client for a :class:`~userpilot_sync.config.model.GcsDestination`.

    Credentials: ``credentials`` if given; else the service-account JSON file named by the env var
    ``dest.credentials_file_env``; else the Google ADC chain (what dagster-gcp's ``GCSResource``
    uses; pass ``client=GCSResource(project=...).get_client()`` to :meth:`GcsStorage.from_config`
    instead when that is all you need). With ``STORAGE_EMULATOR_HOST`` set (tests) and no
    credentials, requests are anonymous. Raises DestinationError (non-HTTPS emulator host, file
    variable unset, unreadable key file, no credentials found); never includes key material.
    """
    environ = os.environ if environ is None else environ
    emulator = environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        require_https(emulator, "STORAGE_EMULATOR_HOST")
    where = _where(dest.bucket, dest.prefix)
    if credentials is None and dest.credentials_file_env:
        path = environ.get(dest.credentials_file_env)
        if not path:
            raise DestinationError(f"GCS destination {where}: environment variable {dest.credentials_file_env} "
                                   "(path of the service-account key file) is not set")
        from google.oauth2 import service_account

        try:
            credentials = service_account.Credentials.from_service_account_file(path, scopes=[SCOPE])
        except (OSError, ValueError) as exc:
            raise DestinationError(f"GCS destination {where}: cannot load the service-account key file named by "
                                   f"{dest.credentials_file_env} ({type(exc).__name__})") from None
    kwargs: dict[str, Any] = {}
    if emulator:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        kwargs["client_options"] = ClientOptions(api_endpoint=emulator if "://" in emulator else f"http://{emulator}")
        credentials = credentials or AnonymousCredentials()
    try:
        return storage.Client(project=dest.project or ("emulator" if emulator else None), credentials=credentials,
                              **kwargs)
    except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise DestinationError(f"GCS destination {where}: no Google credentials found ({type(exc).__name__}); "
                               "set credentials_file_env or configure Application Default Credentials") from None


def _where(bucket: str, prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


class GcsStorage:
    """Write-only GCS storage rooted at ``bucket`` (keys are full object names, prefix included).

    ``generations`` (``{key: generation}``) is read for preconditions and updated after each
    upload/delete; ``written`` collects ``{key: generation}`` of this object's uploads and
    ``deleted`` the keys it deleted, for the caller to persist. Sizes are bytes.
    """

    kind = "gcs"

    def __init__(
        self,
        client: storage.Client,
        *,
        bucket: str,
        prefix: str = "",
        kms_key_name: str | None = None,
        checksum: str = "crc32c",
        resumable_threshold_bytes: int = 8 * 1024 * 1024,
        resumable_chunk_bytes: int = 16 * 1024 * 1024,
        allow_deletes: bool = False,
        overwrite: str = "overwrite",
        generations: MutableMapping[str, int] | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.client = client
        # google-cloud-storage >= 3.x fetches bucket metadata (a storage.buckets.get read) in a
        # background thread for its telemetry; a write-only exporter must not read anything.
        if getattr(client, "_bucket_metadata_cache", None) is not None:
            client._bucket_metadata_cache = None
        self.bucket_name = bucket
        self.bucket = client.bucket(bucket, user_project=None)
        self.prefix = prefix.strip("/")
        self.kms_key_name = kms_key_name
        self.checksum = checksum
        self.resumable_threshold_bytes = min(resumable_threshold_bytes, _MULTIPART_MAX)
        self.resumable_chunk_bytes = resumable_chunk_bytes
        self.allow_deletes = allow_deletes
        self.overwrite = overwrite
        self.generations: MutableMapping[str, int] = {} if generations is None else generations
        self.written: dict[str, int] = {}
        self.deleted: list[str] = []
        self.policy = retry or RetryPolicy()
        p = self.policy
        self._retry = Retry(predicate=_should_retry, initial=p.initial_backoff_s, maximum=p.max_backoff_s,
                            multiplier=p.multiplier, timeout=p.deadline_s)
        self._timeout = (p.connect_timeout_s, p.read_timeout_s)

    @classmethod
    def from_config(cls, job: Any, *, client: storage.Client | None = None, credentials: Any = None,
                    generations: MutableMapping[str, int] | None = None,
                    retry: RetryPolicy | None = None) -> "GcsStorage":
        """The storage of ``job.destination`` (a GcsDestination). Raises DestinationError."""
        dest = job.destination
        client = client or build_gcs_client(dest, credentials=credentials)
        return cls(client, bucket=dest.bucket, prefix=dest.prefix, kms_key_name=dest.kms_key_name,
                   checksum=dest.checksum, resumable_threshold_bytes=dest.resumable_threshold_bytes,
                   resumable_chunk_bytes=dest.resumable_chunk_bytes, allow_deletes=dest.allow_deletes,
                   overwrite=dest.overwrite, generations=generations, retry=retry)

    # ------------------------------------------------------------------ Storage protocol
    def uri(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None,
                 if_generation_match: int | None = None) -> int:
        """Upload ``path`` to ``key``; returns the new generation.

        ``if_generation_match`` overrides the recorded generation (``0`` = must not exist).
        Raises ObjectExistsError / DestinationError.
        """
        path = Path(path)
        size = path.stat().st_size
        return self._upload(_safe_key(key), lambda: open(path, "rb"), size, content_type, content_encoding,
                            if_generation_match, crc_source=lambda: _crc32c_file(path))

    def put_bytes(self, key: str, data: bytes, *, content_type: str, if_generation_match: int | None = None) -> int:
        """Upload a small object (manifest, marker); returns the new generation. Raises DestinationError."""
        import io

        return self._upload(_safe_key(key), lambda: io.BytesIO(data), len(data), content_type, None,
                            if_generation_match, crc_source=lambda: _crc32c_b64(google_crc32c.value(data)))

    def delete(self, key: str) -> None:
        """Delete ``key`` (needs storage.objects.delete), guarded by its recorded generation.

        Raises DestinationError unless ``allow_deletes``; an object already gone counts as deleted.
        """
        key = _safe_key(key)
        if not self.allow_deletes:
            raise DestinationError(f"refusing to delete {self.uri(key)}: the sync job does not set "
                                   "destination.allow_deletes")
        blob = self.bucket.blob(key)
        try:
            blob.delete(if_generation_match=self.generations.get(key), retry=self._retry, timeout=self._timeout)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise self._error("delete", key, exc, overwriting=False) from None
        self.generations.pop(key, None)
        self.written.pop(key, None)
        self.deleted.append(key)

    def assert_can_write(self, keys: Iterable[str]) -> None:
        """Refuse (``overwrite: refuse``) before any write when one of ``keys`` was written before.

        Pass the partition's manifest key and the keys of its previously recorded files. Raises
        ObjectExistsError; does nothing in ``overwrite`` mode.
        """
        if self.overwrite != "refuse":
            return
        existing = sorted(k for k in keys if self.generations.get(k))
        if existing:
            raise ObjectExistsError(
                f"GCS destination {self._where()}: {len(existing)} object(s) of this partition were exported before "
                f"(e.g. {existing[0]}) and destination.overwrite is 'refuse' (a roles/storage.objectCreator "
                "credential cannot replace objects); grant the custom role with storage.objects.delete and set "
                "overwrite: overwrite to re-export")

    # ------------------------------------------------------------------ internals
    def _where(self) -> str:
        return _where(self.bucket_name, self.prefix)

    def _upload(self, key: str, open_stream: Callable[[], BinaryIO], size: int, content_type: str,
                content_encoding: str | None, expected: int | None, crc_source: Callable[[], str]) -> int:
        if expected is None:
            expected = int(self.generations.get(key) or 0)
        if expected and self.overwrite == "refuse":
            raise ObjectExistsError(
                f"GCS destination {self._where()}: refusing to replace {key} (exported before, generation "
                f"{expected}) because destination.overwrite is 'refuse'")
        resumable = size > self.resumable_threshold_bytes
        blob = self.bucket.blob(key, chunk_size=self.resumable_chunk_bytes if resumable else None,
                                kms_key_name=self.kms_key_name)
        blob.content_type = content_type
        if content_encoding:
            blob.content_encoding = content_encoding
        kwargs: dict[str, Any] = {
            "content_type": content_type,
            # Sizes up to 8 MiB go multipart when given; an unknown size forces a resumable session.
            "size": size if (not resumable or size > _MULTIPART_MAX) else None,
            "checksum": None if self.checksum == "none" else self.checksum,
            "retry": self._retry,
            "timeout": self._timeout,
        }
        if resumable and self.checksum == "crc32c":
            # Sent with the final chunk: the server rejects a corrupted object.
            kwargs["crc32c_checksum_value"] = crc_source()

        def send(precondition: int | None) -> None:
            with open_stream() as stream:
                blob.upload_from_file(stream, if_generation_match=precondition, **kwargs)

        overwriting = bool(expected)
        try:
            try:
                send(expected)
            except gexc.PreconditionFailed:
                if expected:
                    raise DestinationError(
                        f"GCS destination {self._where()}: {key} changed since generation {expected} was recorded "
                        "(another writer?); nothing was replaced. Check that no other deployment writes to this "
                        "destination, then clear this partition's recorded generations to take over") from None
                if self.overwrite != "overwrite":
                    raise ObjectExistsError(
                        f"GCS destination {self._where()}: {key} already exists and destination.overwrite is "
                        "'refuse'; nothing was replaced") from None
                overwriting = True
                send(None)  # exists without a recorded generation: replace it (see module docstring)
        except DestinationError:
            raise
        except gexc.GoogleAPICallError as exc:
            raise self._error("upload", key, exc, overwriting=overwriting) from None
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise DestinationError(f"GCS destination {self._where()}: upload of {key} failed ({type(exc).__name__}); "
                                   "the endpoint is unreachable or keeps timing out") from None
        except Exception as exc:  # google-auth refresh failures, requests/urllib3 transport errors
            if type(exc).__module__.startswith("google.auth"):
                raise DestinationError(f"GCS destination {self._where()}: the Google credentials were rejected or "
                                       f"could not be refreshed ({type(exc).__name__}); check the service account "
                                       "key or ADC of the sync job") from None
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise DestinationError(f"GCS destination {self._where()}: upload of {key} failed "
                                       f"({type(exc).__name__}); check credentials and network") from None
            raise
        generation = int(blob.generation)
        self.generations[key] = generation
        self.written[key] = generation
        return generation

    def _error(self, action: str, key: str, exc: gexc.GoogleAPICallError, *, overwriting: bool) -> DestinationError:
        code = getattr(exc, "code", None)
        where = self._where()
        if isinstance(exc, gexc.Unauthorized):
            return DestinationError(f"GCS destination {where}: the Google credentials were rejected (HTTP 401); check "
                                    "the service account key or ADC of the sync job")
        if isinstance(exc, gexc.Forbidden):
            if action == "delete":
                need = "storage.objects.delete"
            elif overwriting:
                need = ("storage.objects.create and storage.objects.delete (replacing an object needs delete; "
                        "roles/storage.objectCreator lacks it: use the custom role in docs/destinations.md or set "
                        "overwrite: refuse)")
            else:
                need = "storage.objects.create"
            kms = (f"; with CMEK the bucket's service agent also needs cloudkms.cryptoKeyEncrypterDecrypter on "
                   f"{self.kms_key_name}") if self.kms_key_name else ""
            return DestinationError(f"GCS destination {where}: access denied for {action} of {key} (HTTP 403); the "
                                    f"credential needs {need} on bucket {self.bucket_name}{kms}")
        if isinstance(exc, gexc.NotFound):
            return DestinationError(f"GCS destination {where}: bucket {self.bucket_name} does not exist (HTTP 404); "
                                    "check destination.bucket and project")
        if code and (code >= 500 or code == 429):
            return DestinationError(f"GCS destination {where}: {action} of {key} still failing after retries "
                                    f"(HTTP {code}); the service is unavailable or throttling, retry later")
        return DestinationError(f"GCS destination {where}: {action} of {key} failed (HTTP {code}, "
                                f"{type(exc).__name__})")


def _crc32c_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def _crc32c_file(path: Path) -> str:
    crc = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            crc.update(block)
    return base64.b64encode(crc.digest()).decode("ascii")


def md5_b64(data: bytes) -> str:
    """Base64 MD5 of ``data`` (the form GCS reports in ``md5Hash``)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
