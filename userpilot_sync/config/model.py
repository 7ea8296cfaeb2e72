"""Pydantic models of one sync job (one Userpilot environment -> one bucket location).

See docs/configuration.md for every key with an example. Editable settings (title, frequency,
filters, formats, layout, file sizes) may change between runs; the destination may not (its
fingerprint is recorded by the first export and checked by every later one).
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import date
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core import ValidationError as PydanticCoreValidationError

from userpilot_sync.net import is_loopback, require_https
from userpilot_sync.schema.events import COLUMN_NAMES, EVENT_TYPES, REQUIRED_COLUMNS

MAX_WINDOW_DAYS = 365
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_BUCKET_S3 = re.compile(r"^(?!xn--)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_GCS = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def _key_error(loc: tuple[str, ...], message: str, value: object) -> PydanticCoreValidationError:
    """A validation error of a cross-field rule, located at the key ``loc`` (for ConfigError messages)."""
    return PydanticCoreValidationError.from_exception_data(
        "SyncJob",
        [InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=loc, input=value)],
    )


def _env_var_name(v: str | None) -> str | None:
    """Check the NAME of an environment variable holding a secret (the value is never echoed)."""
    if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(
            "is not an environment variable name (letters, digits, '_'); give the NAME of the variable "
            "that holds the secret, never the secret itself (the value is not repeated here)"
        )
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------- sources
class DemoSourceConfig(_Model):
    """The embedded demo generator (no credentials)."""

    kind: Literal["demo"] = "demo"
    events_per_day: int = Field(5000, ge=0, le=50_000_000)
    seed: int = 42


class FilesSourceConfig(_Model):
    """A local folder of export chunk files (parquet, ndjson, csv, avro; any number per day)."""

    kind: Literal["files"] = "files"
    path: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _folder_path(v)


class ExportApiSourceConfig(_Model):
    """Userpilot's Bulk Data Export API. The API key is read from the env var ``api_key_env``."""

    kind: Literal["export_api"] = "export_api"
    base_url: str = "https://appex.userpilot.io"
    api_key_env: str = "USERPILOT_API_KEY"
    chunk_format: Literal["parquet", "ndjson", "csv", "avro"] = "parquet"
    #: Seconds between status polls (first poll), growing by ``poll_backoff`` up to ``poll_max_interval_s``.
    poll_interval_s: float = Field(5.0, gt=0)
    poll_backoff: float = Field(1.5, ge=1)
    poll_max_interval_s: float = Field(60.0, gt=0)
    #: Bounded total wait for one export job (seconds).
    max_wait_s: float = Field(3600.0, gt=0)
    #: Bounded wait while another export job of the app token runs (409), seconds.
    conflict_wait_s: float = Field(1800.0, ge=0)
    max_retries: int = Field(6, ge=0, le=20)
    request_timeout_s: float = Field(60.0, gt=0)
    #: Backoff after 429/5xx/transport errors: ``retry_base_s * 2**n`` with jitter, capped at
    #: ``retry_max_s`` (seconds); a Retry-After header wins (capped at ``max_wait_s``).
    retry_base_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(60.0, gt=0)
    #: Re-downloads of a chunk that arrives truncated or unreadable before the partition fails.
    chunk_retries: int = Field(2, ge=0, le=10)
    #: Fresh presigned URLs fetched (job status, or a new export job) after 403/410 downloads.
    max_url_refreshes: int = Field(3, ge=0, le=20)
    #: Records per page when following the lookup endpoints' cursors.
    lookup_page_size: int = Field(100, ge=1, le=1000)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        # never echo a URL that may carry credentials (user:key@host, ?api_key=...)
        if parts.username or parts.password or "@" in parts.netloc:
            raise ValueError("base_url must not contain credentials (user:key@); the API key comes from api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("base_url takes no query or fragment (the value is not repeated here)")
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL, e.g. https://appex.userpilot.io")
        if parts.scheme != "https" and not is_loopback(parts.hostname):
            raise ValueError(f"{v!r}: the Export API must be reached over HTTPS (plain http only on loopback)")
        return v.strip().rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        return _env_var_name(v)


Source = Annotated[Union[DemoSourceConfig, FilesSourceConfig, ExportApiSourceConfig], Field(discriminator="kind")]


# ---------------------------------------------------------------------------------- destinations
def _https_or_loopback(v: str | None) -> str | None:
    """Endpoints must be https:// unless they point at a loopback address (tests, local stores).

    Raises ValueError (:class:`userpilot_sync.net.InsecureUrlError`) for any other endpoint.
    """
    if v is None:
        return v
    return require_https(v, "endpoint")


def _control_characters(v: str) -> list[str]:
    """The control characters and line/paragraph separators in ``v``, as escapes (``'\\n'``)."""
    found = [c for c in v if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
    return sorted({repr(c)[1:-1] for c in found})


def _object_prefix(v: str) -> str:
    """Check a destination ``prefix``: the same object keys on every backend (local, S3, GCS).

    Leading and trailing ``/`` are ignored (the layout strips them on every backend). Raises
    ValueError for anything a backend would treat differently or refuse: ``..`` or ``.`` segments
    (normalised away by a file system, literal on S3/GCS), empty segments (``a//b``), ``\\``,
    control characters and newlines.
    """
    control = _control_characters(v)
    if control:
        raise ValueError(
            f"{v!r} contains control character(s) {', '.join(control)} (a newline, tab, ...); object keys "
            "must be printable text. Remove them (a stray line break in the YAML value?)"
        )
    if "\\" in v:
        raise ValueError(
            f"{v!r} contains '\\'; separate the folders of a prefix with '/' (e.g. userpilot/events)"
        )
    inner = v.strip("/")
    if not inner:
        return v
    segments = inner.split("/")
    if "" in segments:
        raise ValueError(
            f"{v!r} has an empty folder ('//'): a local folder would merge it, S3 and GCS keep it, so the same "
            "sync job would write different keys per destination. Write single '/' between folders"
        )
    if ".." in segments:
        raise ValueError(
            f"{v!r} has a '..' folder: on a local disk it would leave the destination folder, S3 and GCS keep "
            "it literally. Write the prefix without '..', e.g. userpilot/events"
        )
    if "." in segments:
        raise ValueError(
            f"{v!r} has a '.' folder: a local folder ignores it, S3 and GCS keep it literally, so the same sync "
            "job would write different keys per destination. Write the prefix without '.', e.g. userpilot/events"
        )
    return v


def _folder_path(v: str) -> str:
    """Check a local folder ``path``: not empty, without control characters or newlines.

    Raises ValueError otherwise (``..`` is allowed: it is a folder on this machine, not an object key).
    """
    if not v.strip():
        raise ValueError("is empty; give a folder, e.g. exports")
    control = _control_characters(v)
    if control:
        raise ValueError(
            f"{v!r} contains control character(s) {', '.join(control)} (a newline, tab, ...); give the folder "
            "as printable text (a stray line break in the YAML value?)"
        )
    return v


def _s3_bucket(v: str) -> str:
    if not _BUCKET_S3.match(v) or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", v):
        raise ValueError(f"{v!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, '.', '-')")
    return v


def _gcs_bucket(v: str) -> str:
    if not _BUCKET_GCS.match(v) or ".." in v or v.startswith("goog"):
        raise ValueError(f"{v!r} is not a valid GCS bucket name")
    return v


class _Destination(_Model):
    """What every destination (and object-store state store) has: the key ``prefix`` under which
    its objects live."""

    prefix: str = ""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _object_prefix(v)


class _ExportDestination(_Destination):
    """What every export destination has besides its ``prefix``: ``read_access``."""

    #: The credentials may also read and list ``<prefix>/<sync folder>/_delta/`` (needed by the
    #: ``delta`` format, which reads its own transaction log; docs/destinations.md, "Delta Lake").
    #: False (default): the destination is write-only and the ``delta`` format is refused.
    read_access: bool = False


class LocalDestination(_ExportDestination):
    """A local folder (``path``; the loader resolves relative paths against the project folder)."""

    kind: Literal["local"] = "local"
    path: str = "exports"  # relative: to the project folder (the loader resolves it)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _folder_path(v)

    def fingerprint(self) -> dict:
        # the resolved folder: "out", "./out" and its absolute path are one destination
        return {"kind": self.kind, "path": os.path.abspath(self.path), "prefix": self.prefix.strip("/")}


class S3Destination(_ExportDestination):
    """An Amazon S3 (or S3-compatible) bucket; credentials from the standard AWS chain."""

    kind: Literal["s3"] = "s3"
    bucket: str
    region: str | None = None
    #: S3-compatible stores / VPC endpoints; must be https:// unless loopback.
    endpoint_url: str | None = None
    #: Assume this role through STS (the identity from the AWS chain needs sts:AssumeRole).
    role_arn: str | None = None
    #: Env var holding the external id the role's trust policy requires (never the value itself).
    external_id_env: str | None = None
    #: STS endpoint for role_arn (default: the regional AWS endpoint); https:// unless loopback.
    sts_endpoint_url: str | None = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None
    #: when_supported|crc32: CRC32 per request; sha256; when_required: Content-MD5; none.
    checksum: Literal["when_supported", "when_required", "crc32", "sha256", "none"] = "when_supported"
    #: Files larger than this (bytes) use a multipart upload of multipart_chunk_bytes parts.
    multipart_threshold_bytes: int = Field(64 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_chunk_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024 * 1024 * 1024)
    allow_deletes: bool = False

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return _s3_bucket(v)

    @field_validator("endpoint_url", "sts_endpoint_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        return _https_or_loopback(v)

    @field_validator("external_id_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _env_var_name(v)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "bucket": self.bucket, "prefix": self.prefix.strip("/"),
                "endpoint_url": self.endpoint_url or ""}


class GcsDestination(_ExportDestination):
    """A Google Cloud Storage bucket in ``project``; standard Google credentials."""

    kind: Literal["gcs"] = "gcs"
    bucket: str
    project: str | None = None
    #: CMEK: projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k> (the bucket's service agent
    #: needs cloudkms.cryptoKeyEncrypterDecrypter on it).
    kms_key_name: str | None = None
    #: Env var holding the path of a service-account JSON file (default: the Google ADC chain).
    credentials_file_env: str | None = None
    #: Files larger than this (bytes, at most 8 MiB) use a resumable upload.
    resumable_threshold_bytes: int = Field(8 * 1024 * 1024, ge=256 * 1024, le=8 * 1024 * 1024)
    #: Chunk of a resumable upload (bytes, a multiple of 256 KiB).
    resumable_chunk_bytes: int = Field(16 * 1024 * 1024, ge=256 * 1024)
    #: Integrity value computed locally and sent with each upload (the server verifies it).
    checksum: Literal["crc32c", "md5", "none"] = "crc32c"
    allow_deletes: bool = False
    #: How a re-export replaces an existing object: "overwrite" needs storage.objects.delete
    #: (a custom role, see docs/destinations.md); "refuse" fails before writing.
    overwrite: Literal["overwrite", "refuse"] = "overwrite"

    @field_validator("resumable_chunk_bytes")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v % (256 * 1024):
            raise ValueError("resumable_chunk_bytes must be a multiple of 262144 (256 KiB)")
        return v

    @field_validator("credentials_file_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _env_var_name(v)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return _gcs_bucket(v)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "bucket": self.bucket, "project": self.project or "",
                "prefix": self.prefix.strip("/")}


Destination = Annotated[Union[LocalDestination, S3Destination, GcsDestination], Field(discriminator="kind")]


# ---------------------------------------------------------------------------------- settings
class SyncBack(_Model):
    """Weekly re-export of the trailing ``days`` days (1..365), on ``weekday`` at ``hour`` UTC."""

    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "sunday"
    hour: int = Field(4, ge=0, le=23)
    days: int = Field(7, ge=1, le=MAX_WINDOW_DAYS)


class Filters(_Model):
    """Which events a sync job exports (applied per event type before validation)."""

    event_types: tuple[str, ...] = EVENT_TYPES
    event_names_include: tuple[str, ...] = ()
    event_names_exclude: tuple[str, ...] = ()
    user_ids_include: tuple[str, ...] = ()
    user_ids_exclude: tuple[str, ...] = ()
    company_ids_include: tuple[str, ...] = ()
    company_ids_exclude: tuple[str, ...] = ()
    exclude_columns: tuple[str, ...] = ()

    @field_validator("event_types")
    @classmethod
    def _event_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in v if e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; known: {', '.join(EVENT_TYPES)}")
        if not v:
            raise ValueError("at least one event type is needed")
        # keep the documented order, drop repeats
        return tuple(e for e in EVENT_TYPES if e in set(v))

    @field_validator("exclude_columns")
    @classmethod
    def _exclude(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in COLUMN_NAMES]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; columns are {', '.join(COLUMN_NAMES)}")
        required = sorted(set(v) & REQUIRED_COLUMNS)
        if required:
            raise ValueError(f"required column(s) {required} cannot be excluded")
        return tuple(sorted(set(v)))


class FormatSpec(_Model):
    """One export format and its compression."""

    #: ``delta``: one Delta Lake table per event type (``destination/delta.py``; needs
    #: ``destination.read_access: true``); its compression is that of the table's Parquet files.
    format: Literal["parquet", "ndjson", "csv", "avro", "delta"]
    compression: str | None = None

    @model_validator(mode="after")
    def _compression(self) -> "FormatSpec":
        allowed = {
            "parquet": ("zstd", "snappy", "gzip", "none"),
            "ndjson": ("gzip", "none"),
            "csv": ("gzip", "none"),
            "avro": ("deflate", "snappy", "none"),
            "delta": ("zstd", "snappy", "gzip", "none"),
        }[self.format]
        if self.compression is None:
            object.__setattr__(self, "compression", allowed[0] if self.format in ("parquet", "delta") else "none")
        if self.compression not in allowed:
            raise _key_error(
                ("compression",),
                f"compression {self.compression!r} is not available for {self.format} (choose one of {', '.join(allowed)})",
                self.compression,
            )
        return self

    @property
    def extension(self) -> str:
        """File extension, e.g. ``parquet``, ``ndjson.gz``, ``csv``, ``avro``."""
        if self.format in ("ndjson", "csv") and self.compression == "gzip":
            return f"{self.format}.gz"
        return self.format

    @property
    def label(self) -> str:
        return f"{self.format}/{self.compression}"


# ---------------------------------------------------------------------------------- documented files
#: Userpilot's documented files beyond the event-type exports a sync job can write per day
#: (Userpilot Data Sync documentation, "bucket layout"), in documented order.
USERPILOT_FILES = ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions",
                   "track_feature_per_tag", "track_labeled_per_label")
#: Written unless the sync job lists ``userpilot_files`` itself (the per-tag/label files are opt-in).
DEFAULT_USERPILOT_FILES = USERPILOT_FILES[:4]


class _StateStore(_Model):
    """Where the exporter keeps the state behind ``all_users``/``all_companies`` (never the
    destination: it is write-only). Readable and writable by the exporter alone."""

    #: A full state is kept for every this many days (plus the newest day): a re-export of an
    #: older day replays the per-day changes from the nearest one. Bounds disk use.
    checkpoint_every_days: int = Field(30, ge=1, le=MAX_WINDOW_DAYS)


class LocalStateStore(_StateStore):
    """A local folder; ``path`` None = ``_state/`` in the staging root (``.staging/_state``)."""

    kind: Literal["local"] = "local"
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else _folder_path(v)


class S3StateStore(_StateStore, _Destination):
    """An S3 prefix the exporter may read, write, list and delete (credentials: the AWS chain)."""

    kind: Literal["s3"] = "s3"
    bucket: str
    region: str | None = None
    endpoint_url: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return _s3_bucket(v)

    @field_validator("endpoint_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        return _https_or_loopback(v)


class GcsStateStore(_StateStore, _Destination):
    """A GCS prefix the exporter may read, write, list and delete (credentials: Google ADC or
    the service-account file named by ``credentials_file_env``)."""

    kind: Literal["gcs"] = "gcs"
    bucket: str
    project: str | None = None
    credentials_file_env: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return _gcs_bucket(v)

    @field_validator("credentials_file_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return _env_var_name(v)


StateStore = Annotated[Union[LocalStateStore, S3StateStore, GcsStateStore], Field(discriminator="kind")]


# ---------------------------------------------------------------------------------- checks
class VolumeCheck(_Model):
    """Rows per event type of a day against the median of the last ``baseline_days`` exported days.

    A day is outside the expected volume when its rows are below ``min_ratio`` or above
    ``max_ratio`` times that median (both inclusive bounds are fine).
    """

    baseline_days: int = Field(14, ge=1, le=MAX_WINDOW_DAYS)
    min_ratio: float = Field(0.5, ge=0)
    max_ratio: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _ratios(self) -> "VolumeCheck":
        if self.min_ratio >= self.max_ratio:
            raise _key_error(
                ("min_ratio",),
                f"min_ratio ({self.min_ratio:g}) must be less than max_ratio ({self.max_ratio:g})",
                self.min_ratio,
            )
        return self


class ChecksSettings(_Model):
    """The checks every exported day gets (see docs/configuration.md, ``checks``)."""

    volume: VolumeCheck = Field(default_factory=VolumeCheck)
    #: A day with 0 rows after days with rows: ``error`` (the check fails at ERROR), ``warn``
    #: (the check fails at WARN), ``expected`` (an empty day is normal for this app).
    empty_days: Literal["error", "warn", "expected"] = "error"
    #: Share of rows (0..1) a re-export may lose per event type before it is refused.
    max_shrink: float = Field(0.5, ge=0, le=1)
    #: Each day must be exported by 03:00 UTC of the next day (weekly jobs: their Monday 03:00
    #: UTC tick) plus this many hours; later is ``late``.
    deadline_hours: float = Field(6, gt=0, le=72)


# ---------------------------------------------------------------------------------- notifications
#: The events a notification entry can subscribe to (``on``), in documented order.
NOTIFY_EVENTS = ("failed", "late", "check_failed", "exported")
_SECRET_ENV = re.compile(r"[A-Z_][A-Z0-9_]*")
_SNS_TOPIC_ARN = re.compile(r"arn:(aws[a-z-]*):sns:([a-z]{2}(?:-[a-z]+)+-\d+):(\d{12}):([A-Za-z0-9_-]{1,256}(?:\.fifo)?)")
_AWS_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")


def _secret_env_name(v: str) -> str:
    """Check the NAME of an environment variable holding a notification secret.

    Stricter than :func:`_env_var_name`: upper-case letters, digits and ``_`` only, so that a
    pasted secret (a Slack webhook URL, a random token with lower-case letters) is refused. The
    value is never repeated in the message.
    """
    if not _SECRET_ENV.fullmatch(v):
        hint = " (this looks like a URL: a webhook URL is a secret, put it in a variable)" if "://" in v else ""
        raise ValueError(
            "is not an environment variable name (upper-case letters, digits, '_', e.g. UP_WEBHOOK_SECRET); give "
            f"the NAME of the variable that holds the secret, never the secret itself{hint} (the value is not "
            "repeated here)"
        )
    return v


def _notification_url(v: str, what: str) -> str:
    """An https:// URL (plain http only on loopback), without credentials, query or fragment."""
    v = v.strip()
    parts = urlsplit(v)
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValueError(f"{what} must not contain credentials (user:password@); the value is not repeated here")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} is not an http(s) URL, e.g. https://hooks.example.com/userpilot")
    return require_https(v, what)


class _Notification(_Model):
    """What every notification entry has: the events it is sent for (``on``)."""

    on: tuple[str, ...]

    @field_validator("on", mode="before")
    @classmethod
    def _on_list(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v  # "on: failed" is one event

    @field_validator("on")
    @classmethod
    def _on(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"at least one event is needed; valid events: {', '.join(NOTIFY_EVENTS)}")
        unknown = [e for e in v if e not in NOTIFY_EVENTS]
        if unknown:
            raise ValueError(f"unknown event(s) {unknown}; valid events: {', '.join(NOTIFY_EVENTS)}")
        return tuple(e for e in NOTIFY_EVENTS if e in set(v))  # documented order, no repeats

    @property
    def target(self) -> str:
        """What identifies the receiver (no secret): the URL, the env var name or the topic ARN."""
        raise NotImplementedError


class _WithUi(_Notification):
    #: The Dagster UI's base URL: notices carry ``<ui_url>/runs/<run_id>`` as ``run_url``.
    ui_url: str | None = None

    @field_validator("ui_url")
    @classmethod
    def _ui_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v.strip())
        if parts.query or parts.fragment:
            raise ValueError("ui_url takes no query or fragment, e.g. https://dagster.example.com")
        return _notification_url(v, "ui_url").rstrip("/")


class WebhookNotification(_WithUi):
    """A JSON POST to ``url``, signed with HMAC-SHA256 under the secret in env var ``secret_env``."""

    kind: Literal["webhook"] = "webhook"
    url: str
    secret_env: str

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _notification_url(v, "webhook url")

    @field_validator("secret_env")
    @classmethod
    def _secret(cls, v: str) -> str:
        return _secret_env_name(v)

    @property
    def target(self) -> str:
        return self.url


class SlackNotification(_WithUi):
    """A Slack incoming webhook; its URL is a secret, read from env var ``url_env`` when sending."""

    kind: Literal["slack"] = "slack"
    url_env: str

    @field_validator("url_env")
    @classmethod
    def _secret(cls, v: str) -> str:
        return _secret_env_name(v)

    @property
    def target(self) -> str:
        return self.url_env


class SnsNotification(_Notification):
    """An Amazon SNS topic (credentials from the standard AWS chain); ``region`` defaults to the ARN's."""

    kind: Literal["sns"] = "sns"
    topic_arn: str
    region: str | None = None
    #: SNS-compatible endpoint (tests, VPC endpoints); https:// unless loopback.
    endpoint_url: str | None = None

    @field_validator("topic_arn")
    @classmethod
    def _arn(cls, v: str) -> str:
        if not _SNS_TOPIC_ARN.fullmatch(v):
            raise ValueError(
                f"{v!r} is not an SNS topic ARN, e.g. arn:aws:sns:us-east-1:123456789012:up-sync"
            )
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _AWS_REGION.fullmatch(v):
            raise ValueError(f"{v!r} is not an AWS region, e.g. us-east-1")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return _https_or_loopback(v)

    @model_validator(mode="after")
    def _same_region(self) -> "SnsNotification":
        arn_region = _SNS_TOPIC_ARN.fullmatch(self.topic_arn).group(2)
        if self.region is None:
            object.__setattr__(self, "region", arn_region)
        elif self.region != arn_region:
            raise _key_error(
                ("region",),
                f"region {self.region!r} differs from the topic's region {arn_region!r} (in topic_arn); "
                "SNS publishes to a topic in its own region: remove region or make them equal",
                self.region,
            )
        return self

    @property
    def target(self) -> str:
        return self.topic_arn


Notification = Annotated[
    Union[WebhookNotification, SlackNotification, SnsNotification], Field(discriminator="kind")
]


def delta_permission_set(job: "SyncJob") -> str:
    """The permissions the ``delta`` format needs on ``<prefix>/<sync folder>/_delta/``, in words
    (besides the write-only set of docs/destinations.md)."""
    prefix = job.destination.prefix.strip("/")
    where = f"{prefix}/{job.sync_folder}/_delta/" if prefix else f"{job.sync_folder}/_delta/"
    dest = job.destination
    if dest.kind == "s3":
        return (f"s3:GetObject and s3:PutObject on arn:aws:s3:::{dest.bucket}/{where}* and s3:ListBucket on "
                f"arn:aws:s3:::{dest.bucket} (condition s3:prefix {where}*)")
    if dest.kind == "gcs":
        return (f"storage.objects.get, storage.objects.list and storage.objects.create, plus storage.objects.delete "
                f"(to overwrite _delta_log/_last_checkpoint), on gs://{dest.bucket}/{where}")
    return f"read, list and write access to the folder {where}"


class SyncJob(_Model):
    """One configured export: a Userpilot environment to one destination location."""

    name: str
    sync_id: str
    title: str = ""
    app_token: str
    enabled: bool = True
    source: Source = Field(default_factory=DemoSourceConfig)
    destination: Destination = Field(default_factory=LocalDestination)
    frequency: Literal["daily", "weekly"] = "daily"
    sync_back: SyncBack | None = None
    backfill_days: int = Field(0, ge=0, le=MAX_WINDOW_DAYS)
    filters: Filters = Field(default_factory=Filters)
    formats: tuple[FormatSpec, ...] = (FormatSpec(format="parquet", compression="zstd"),)
    layout: Literal["userpilot", "hive"] = "userpilot"
    max_file_rows: int | None = Field(None, ge=1)
    max_file_bytes: int | None = Field(None, ge=1024)
    #: Oldest day this sync job may ever export (e.g. the day the app started sending events);
    #: None = the 365-day window alone decides. The UI lists the window's days from here on.
    partitions_start: date | None = None
    #: Days one backfill run exports at most (Dagster backfill policy multi_run); one extraction
    #: covers the whole range and is split by day. 1 = one run per day.
    backfill_days_per_run: int = Field(31, ge=1, le=MAX_WINDOW_DAYS)
    #: Days to keep staged raw events after a partition's manifest is written (0 = remove at once).
    keep_staging_days: int = Field(0, ge=0, le=30)
    #: Schedules start running when the code location loads (the demo ships with False).
    schedules_running: bool = True
    owners: tuple[str, ...] = ()
    #: Checks of every exported day (volume, empty days, shrinking re-exports, deadline).
    checks: ChecksSettings = Field(default_factory=ChecksSettings)
    #: Where failures, late days, failed checks and exports are announced (webhook, Slack, SNS).
    notifications: tuple[Notification, ...] = ()
    #: Userpilot's documented files written with every exported day (see USERPILOT_FILES).
    userpilot_files: tuple[Literal[USERPILOT_FILES], ...] = DEFAULT_USERPILOT_FILES  # type: ignore[valid-type]
    #: Where the state of the user and company snapshots lives (not the destination).
    state: StateStore = Field(default_factory=LocalStateStore)
    #: Where this job was read from (set by the loader, for error messages).
    source_file: str | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(
                f"{v!r} is not a valid sync job name: use lower-case letters, digits and '_', starting with a letter"
            )
        return v

    @field_validator("sync_id", mode="before")
    @classmethod
    def _sync_id_text(cls, v: object) -> object:
        # YAML reads 13214 as a number and 0123 as octal 83: a sync_id must be quoted text, or the
        # sync folder (fixed at the first export) could silently differ from Userpilot's.
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError(
                f"{v!r} was read as a number (YAML reads 0123 as the octal 83); write the sync_id in quotes "
                f"exactly as Userpilot shows it, e.g. sync_id: \"13214\""
            )
        return v

    @field_validator("sync_id")
    @classmethod
    def _sync_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(v)):
            raise ValueError(f"{v!r} is not a valid sync_id (letters, digits, '_' and '-')")
        return str(v)

    @field_validator("app_token")
    @classmethod
    def _app_token(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{2,64}", v):
            raise ValueError(f"{v!r} is not a valid app token (e.g. NX-1a2b3c4d)")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: tuple[FormatSpec, ...]) -> tuple[FormatSpec, ...]:
        if not v:
            raise ValueError("at least one format is needed")
        seen = [f.format for f in v]
        dupes = sorted({f for f in seen if seen.count(f) > 1})
        if dupes:
            raise ValueError(f"format(s) {dupes} listed twice; each format is written once per export")
        return v

    @field_validator("userpilot_files")
    @classmethod
    def _userpilot_files(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # documented order, repeats dropped: the same list always means the same files
        return tuple(f for f in USERPILOT_FILES if f in set(v))

    @field_validator("notifications")
    @classmethod
    def _notifications(cls, v: tuple) -> tuple:
        seen: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(v):
            key = (entry.kind, entry.target)
            if key in seen:
                raise ValueError(
                    f"entries {seen[key]} and {i} both send {entry.kind} notifications to the same "
                    f"{'topic' if entry.kind == 'sns' else 'receiver'}; list it once with all its events in 'on'"
                )
            seen[key] = i
        return v

    @model_validator(mode="after")
    def _consistency(self) -> "SyncJob":
        if self.max_file_rows and self.max_file_bytes:
            raise _key_error(("max_file_bytes",), "set max_file_rows or max_file_bytes, not both", self.max_file_bytes)
        sb = self.sync_back
        if sb and self.frequency == "weekly" and sb.days < 7:
            raise _key_error(
                ("sync_back", "days"),
                f"{sb.days} days is less than the 7 days the weekly sync already exports every Monday; "
                f"a weekly sync job's sync back needs days from 7 to {MAX_WINDOW_DAYS}",
                sb.days,
            )
        if sb and sb.hour == 3 and (self.frequency == "daily" or sb.weekday == "monday"):
            when = "every day" if self.frequency == "daily" else "on Mondays"
            raise _key_error(
                ("sync_back", "hour"),
                f"the sync back would start at the same time as the {self.frequency} sync ({when} at 03:00 UTC) "
                f"and export the same partitions twice at once; choose another hour"
                + (" or weekday" if self.frequency == "weekly" else ""),
                sb.hour,
            )
        if any(f.format == "delta" for f in self.formats) and not self.destination.read_access:
            raise _key_error(
                ("destination", "read_access"),
                f"sync job {self.name!r} writes format delta, which reads and lists its own Delta tables "
                f"(<sync folder>/_delta/), but the destination is write-only (read_access is false). Grant the "
                f"credentials {delta_permission_set(self)} (docs/destinations.md, 'Delta Lake') and set "
                f"destination.read_access: true, or remove delta from formats",
                self.destination.read_access,
            )
        if self.kms_mismatch():
            raise _key_error(("destination", "kms_key_id"), "destination.kms_key_id is only used with sse: aws:kms",
                             getattr(self.destination, "kms_key_id", None))
        return self

    def kms_mismatch(self) -> bool:
        d = self.destination
        return isinstance(d, S3Destination) and d.kms_key_id is not None and d.sse != "aws:kms"

    # ------------------------------------------------------------------ derived names
    @property
    def event_types(self) -> tuple[str, ...]:
        """Event types this sync job exports (one export asset each)."""
        return self.filters.event_types

    @property
    def extract_event_types(self) -> tuple[str, ...]:
        """Event types the extraction asks for: the exported ones plus those the documented files
        need (identify_* for the snapshots, track_feature for feature tags, track for labels)."""
        needed = set(self.event_types)
        files = set(self.userpilot_files)
        if "all_users" in files:
            needed.add("identify_user")
        if "all_companies" in files:
            needed.add("identify_company")
        if files & {"feature_tags_breakdown", "track_feature_per_tag"}:
            needed.add("track_feature")
        if "track_labeled_per_label" in files:
            needed.add("track")
        return tuple(e for e in EVENT_TYPES if e in needed)

    @property
    def file_formats(self) -> tuple[FormatSpec, ...]:
        """The formats written as files (every format but ``delta``, which is a table per event
        type). Userpilot's documented files are written in these; with ``delta`` alone, in Parquet
        (zstd)."""
        files = tuple(f for f in self.formats if f.format != "delta")
        return files or (FormatSpec(format="parquet", compression="zstd"),)

    @property
    def pool(self) -> str:
        """Dagster pool that serialises export jobs of one app token (limit 1)."""
        return "userpilot_export_" + re.sub(r"[^A-Za-z0-9_]", "_", self.app_token)

    @property
    def sync_folder(self) -> str:
        """Folder name of the documented layout: ``userpilot_datasync_<sync_id>_<app_token>``."""
        return f"userpilot_datasync_{self.sync_id}_{self.app_token}"

    def settings_summary(self) -> dict:
        """The editable settings that produced an export (recorded in every manifest)."""
        return {
            "formats": [f.label for f in self.formats],
            "layout": self.layout,
            "filters": self.filters.model_dump(mode="json"),
            "max_file_rows": self.max_file_rows,
            "max_file_bytes": self.max_file_bytes,
            "userpilot_files": list(self.userpilot_files),
        }
