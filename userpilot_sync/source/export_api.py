"""The Bulk Data Export API source: Userpilot's raw events for a UTC window, over HTTPS.

For one :class:`~userpilot_sync.source.base.ExtractRequest` the source

1. creates an export job: ``POST /api/v1/analytics/exports`` with the JSON body
   ``{"from", "to", "event_type": [...], "format"}`` (``from``/``to`` are the request's window as
   ISO-8601 UTC text, ``to`` exclusive on our side: rows outside the window are counted and
   dropped by staging) and ``Authorization: Token <API key>``. A 409 (another export job of the
   app token is running) is waited out, bounded by ``conflict_wait_s``;
2. polls ``GET /api/v1/analytics/exports/jobs/{job_id}`` with growing intervals
   (``poll_interval_s`` x ``poll_backoff`` up to ``poll_max_interval_s``) until the job is
   ``completed`` or ``failed``, bounded by ``max_wait_s``;
3. streams every presigned URL (``presigned_urls: [{filename, url}]``) to ``request.work_dir``
   with a separate HTTP client that never carries the API key, follows redirects itself (HTTPS
   only, unless loopback) and checks the byte count against ``Content-Length``; a 403/410 from
   the storage host fetches fresh URLs from the job status (or, once the job's status is gone,
   creates a new export job); a truncated or unreadable chunk is downloaded again up to
   ``chunk_retries`` times;
4. parses every downloaded chunk fully once (so nothing is staged from a broken chunk), then
   yields its record batches through :func:`~userpilot_sync.source.chunks.iter_chunk_batches`.

Every API call is retried on 429, 5xx and transport errors with exponential backoff and jitter
(``retry_base_s`` doubling up to ``retry_max_s``), honouring ``Retry-After``; ``max_retries``
retries per call. A 401 fails at once. Errors are :class:`ExportApiError` subclasses of
:class:`~userpilot_sync.errors.SourceError`; the API key never appears in errors, logs, facts or
``repr`` (it is read from the environment variable ``api_key_env`` when an extraction starts).

``Extraction.facts`` (JSON, copied into the manifest's ``source``): ``kind``, ``base_url``,
``export_job_id``, ``export_job_ids`` (every job created, when a job had to be replaced),
``format``, ``chunks``, ``chunk_files``, ``chunk_rows``, ``chunk_bytes``, ``retries`` (per
reason: ``rate_limited``, ``server_error``, ``transport_error``, ``conflict``, ``url_refresh``,
``new_export_job``, ``chunk_redownload``) and ``retries_total``.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

import httpx
import tenacity

from userpilot_sync.config.model import ExportApiSourceConfig, SyncJob
from userpilot_sync.errors import SourceError
from userpilot_sync.source.base import Extraction, ExtractRequest, SourceBatch
from userpilot_sync.source.chunks import chunk_format, iter_chunk_batches
from userpilot_sync.source.urls import is_loopback, redact_url

log = logging.getLogger(__name__)


class _RedactUrlQueries(logging.Filter):
    """Drops query strings (presigned signatures) from the URLs httpx logs at INFO level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(redact_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactUrlQueries) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactUrlQueries())

EXPORTS_PATH = "/api/v1/analytics/exports"
JOB_PATH = "/api/v1/analytics/exports/jobs/{job_id}"
LOOKUP_PATH = "/api/v1/analytics/exports/lookups/{kind}"
#: Base URLs of the Export API. US is documented; EU follows the ingestion API's ``-eu`` naming
#: (an assumption: confirm the host on the Environment page of an EU workspace).
BASE_URLS = {"us": "https://appex.userpilot.io", "eu": "https://appex-eu.userpilot.io"}

_DONE = {"completed", "complete", "done", "finished", "succeeded", "success"}
_FAILED = {"failed", "failure", "error", "errored", "cancelled", "canceled", "expired"}
_MAX_REDIRECTS = 5
_DOWNLOAD_PIECE = 1 << 20
RETRY_REASONS = (
    "rate_limited", "server_error", "transport_error", "conflict",
    "url_refresh", "new_export_job", "chunk_redownload",
)


# ---------------------------------------------------------------------------------- errors
class ExportApiError(SourceError):
    """The Bulk Data Export API (or its download host) failed; the message says what to do."""


class ApiKeyError(ExportApiError):
    """The API key is missing from the environment or was rejected (401/403)."""


class ExportJobConflict(ExportApiError):
    """Another export job of the app token kept running beyond ``conflict_wait_s`` (409)."""


class ExportJobFailed(ExportApiError):
    """The export job ended ``failed`` (message names the job id and the API's message)."""


class ExportJobTimeout(ExportApiError):
    """The export job did not finish within ``max_wait_s``."""


class ApiUnavailable(ExportApiError):
    """429/5xx/transport errors persisted through every retry."""


class ChunkDownloadError(ExportApiError):
    """A chunk could not be downloaded completely or parsed, even after re-downloads."""


class _Retryable(Exception):
    """Internal: a response or transport error worth retrying (429, 5xx, connect/read errors)."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _UrlRejected(Exception):
    """Internal: the storage host answered 403/410 (expired or forbidden presigned URL)."""


class _ChunkBroken(Exception):
    """Internal: a chunk arrived truncated or does not parse."""


class _JobGone(Exception):
    """Internal: the job status is no longer available (404 after the 3-day retention)."""


class _Secret:
    """Holds the API key; its repr/str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


# ---------------------------------------------------------------------------------- helpers
def iso_utc(ts: datetime) -> str:
    """``ts`` as ISO-8601 UTC text with a ``Z`` suffix (µs only when not zero)."""
    ts = ts.astimezone(timezone.utc)
    text = ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


def api_error_message(response: httpx.Response) -> str:
    """The API's message from an error body ``{"errors": [{message, error, error_code, details}]}``."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:200] if text else response.reason_phrase
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        message = first.get("message") or first.get("error") or first.get("details") or ""
        code = first.get("error_code")
        return f"{message} (error_code {code})" if code else str(message)
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if body.get(key):
                return str(body[key])
    return response.reason_phrase


def _unwrap(body: Any) -> dict:
    """Job objects may come wrapped as ``{"data": {...}}``; return the job dict."""
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and "status" not in body:
        return body["data"]
    return body if isinstance(body, dict) else {}


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_filename(name: str, index: int, fmt: str) -> str:
    base = _SAFE_NAME.sub("_", Path(str(name or "")).name).strip("._") or f"export-part{index + 1}.{fmt}"
    return f"{index:05d}-{base}"


@dataclass(frozen=True)
class _Chunk:
    filename: str
    url: str


@dataclass
class _Downloaded:
    filename: str
    path: Path
    fmt: str
    rows: int
    bytes: int


# ---------------------------------------------------------------------------------- client
class ExportApiClient:
    """One authenticated session with the Export API (and a key-less one for downloads).

    Use as a context manager; obtained from :meth:`ExportApiSource.client`. ``retries`` counts
    retries per reason (see :data:`RETRY_REASONS`). Methods raise :class:`ExportApiError`.
    """

    def __init__(self, source: "ExportApiSource", key: _Secret, sync_job: str, app_token: str):
        self.source = source
        self.cfg = source.config
        self.sync_job = sync_job
        self.app_token = app_token
        self._key = key
        self.retries: Counter = Counter()
        base = self.cfg.base_url
        host = urlsplit(base).hostname
        self._api = httpx.Client(
            base_url=base,
            headers={"Authorization": f"Token {key.reveal()}", "Accept": "application/json",
                     "User-Agent": "userpilot-sync"},
            timeout=self.cfg.request_timeout_s,
            follow_redirects=False,
            trust_env=not is_loopback(host),
            transport=source.transport,
        )
        # Presigned URLs carry their own authorisation: this client has no Authorization header.
        self._dl = httpx.Client(
            headers={"User-Agent": "userpilot-sync"},
            timeout=self.cfg.request_timeout_s,
            follow_redirects=False,
            trust_env=True,
            mounts={"all://127.0.0.1": httpx.HTTPTransport(), "all://localhost": httpx.HTTPTransport(),
                    "all://[::1]": httpx.HTTPTransport()},
            transport=source.download_transport,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "ExportApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._api.close()
        self._dl.close()

    def __repr__(self) -> str:
        return f"ExportApiClient(base_url={self.cfg.base_url!r}, sync_job={self.sync_job!r})"

    # -- messages ----------------------------------------------------------------------------
    def _who(self) -> str:
        return f"sync job {self.sync_job!r} (app token {self.app_token})"

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` (defence in depth for API messages)."""
        key = self._key.reveal()
        return text.replace(key, "***") if key else text

    # -- retries -----------------------------------------------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        base = min(self.cfg.retry_max_s, self.cfg.retry_base_s * (2 ** (state.attempt_number - 1)))
        delay = base / 2 + self.source.jitter() * base / 2  # "equal jitter"
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            delay = min(exc.retry_after, self.cfg.max_wait_s)
        return delay

    def _before_sleep(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        def hook(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = exc.reason if isinstance(exc, _Retryable) else "transport_error"
            self.retries[reason] += 1
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s: %s for %s; retry %d of %d in %.2f s",
                self._who(), self.redact(str(exc)), what, state.attempt_number, self.cfg.max_retries, delay,
            )

        return hook

    def with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn``; retry :class:`_Retryable` failures with backoff. Raises ApiUnavailable."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            stop=tenacity.stop_after_attempt(self.cfg.max_retries + 1),
            wait=self._wait,
            sleep=self.source.sleep,
            before_sleep=self._before_sleep(what),
            reraise=True,
        )
        try:
            return retrying(fn)
        except _Retryable as exc:
            raise ApiUnavailable(
                f"{self._who()}: {what} failed: {self.redact(exc.detail)}, still after {self.cfg.max_retries} "
                f"retries with backoff; Userpilot's Export API is rate limiting or unavailable. "
                f"Nothing was exported for this partition; re-run it later."
            ) from None

    # -- API requests ------------------------------------------------------------------------
    def _send(self, method: str, path: str, what: str, **kwargs) -> httpx.Response:
        try:
            response = self._api.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _Retryable("transport_error", f"{type(exc).__name__} reaching {self.cfg.base_url}") from None
        status = response.status_code
        if status == 429:
            raise _Retryable("rate_limited", "HTTP 429 Too Many Requests",
                             parse_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise _Retryable("server_error", f"HTTP {status} {response.reason_phrase}",
                             parse_retry_after(response.headers.get("Retry-After")))
        if status == 401:
            raise ApiKeyError(
                f"API key rejected for {self._who()}: the Export API answered 401 "
                f"({self.redact(api_error_message(response))}). Put a valid key from Userpilot's "
                f"Environment page into the environment variable {self.cfg.api_key_env}."
            )
        if status == 403:
            raise ApiKeyError(
                f"API key not allowed to export for {self._who()}: the Export API answered 403 "
                f"({self.redact(api_error_message(response))}). The Bulk Data Export API needs the "
                f"Enterprise plan or the add-on; check the key in {self.cfg.api_key_env}."
            )
        if 300 <= status < 400:
            raise ExportApiError(
                f"{self._who()}: {what} was redirected (HTTP {status}); the client does not follow "
                f"API redirects (the key must not travel). Set source.base_url to the final API host."
            )
        return response

    def request(self, method: str, path: str, what: str, **kwargs) -> httpx.Response:
        """One API request with retries; returns 2xx/404/409/4xx responses to the caller."""
        return self.with_retries(what, lambda: self._send(method, path, what, **kwargs))

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ExportApiError(
                f"{self._who()}: {what} answered HTTP {response.status_code} with a body that is not JSON"
            ) from None

    def _unexpected(self, response: httpx.Response, what: str) -> ExportApiError:
        return ExportApiError(
            f"{self._who()}: {what} failed with HTTP {response.status_code}: "
            f"{self.redact(api_error_message(response))}"
        )

    # -- export jobs -------------------------------------------------------------------------
    def create_job(self, body: dict) -> str:
        """POST an export job; wait out 409 up to ``conflict_wait_s``. Returns the job id."""
        start = self.source.clock()
        interval = self.cfg.poll_interval_s
        while True:
            response = self.request("POST", EXPORTS_PATH, "creating the export job", json=body)
            if response.status_code in (200, 201, 202):
                data = _unwrap(self._json(response, "creating the export job"))
                job_id = data.get("job_id") or data.get("id")
                if not job_id:
                    raise ExportApiError(f"{self._who()}: the Export API created a job but sent no job_id")
                return str(job_id)
            if response.status_code == 409:
                self.retries["conflict"] += 1
                waited = self.source.clock() - start
                if waited + interval > self.cfg.conflict_wait_s:
                    raise ExportJobConflict(
                        f"{self._who()}: another export job is running for app token {self.app_token} "
                        f"(409 Conflict: {self.redact(api_error_message(response))}); waited {waited:.0f} s "
                        f"(source.conflict_wait_s = {self.cfg.conflict_wait_s:g}). Only one export job may "
                        f"run per app token: wait for the other job (another sync job or tool using this "
                        f"environment) and re-run the partition."
                    )
                log.info("%s: an export job is already running for the app token (409); waiting %.2f s",
                         self._who(), interval)
                self.source.sleep(interval)
                interval = min(interval * self.cfg.poll_backoff, self.cfg.poll_max_interval_s)
                continue
            raise self._unexpected(response, "creating the export job")

    def job_status(self, job_id: str) -> dict | None:
        """The job's status document, or None when the API no longer knows it (404)."""
        what = f"reading the status of export job {job_id}"
        response = self.request("GET", JOB_PATH.format(job_id=job_id), what)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._unexpected(response, what)
        return _unwrap(self._json(response, what))

    def wait_for_job(self, job_id: str) -> dict:
        """Poll until completed (returns the status) or failed/timed out (raises)."""
        start = self.source.clock()
        interval = self.cfg.poll_interval_s
        while True:
            status = self.job_status(job_id)
            if status is None:
                raise ExportApiError(
                    f"{self._who()}: export job {job_id} is unknown to the Export API (404) while "
                    f"waiting for it; re-run the partition to create a new export job."
                )
            state = str(status.get("status", "")).strip().lower()
            if state in _DONE:
                return status
            if state in _FAILED:
                message = status.get("error") or status.get("message") or status.get("errors") or "no message"
                if isinstance(message, list) and message and isinstance(message[0], dict):
                    message = message[0].get("message") or message[0]
                raise ExportJobFailed(
                    f"{self._who()}: export job {job_id} {state}: {self.redact(str(message))}. "
                    f"Nothing was exported for this partition; re-run it (a new export job is created)."
                )
            waited = self.source.clock() - start
            if waited + interval > self.cfg.max_wait_s:
                raise ExportJobTimeout(
                    f"{self._who()}: export job {job_id} did not complete within {self.cfg.max_wait_s:g} s "
                    f"(source.max_wait_s; last status {state or 'unknown'!r}, progress "
                    f"{status.get('progress')!r}, chunks {status.get('completed_chunks')!r}/"
                    f"{status.get('all_chunks')!r}). Re-run the partition later or raise max_wait_s."
                )
            log.debug("%s: export job %s is %s (progress %s); next poll in %.2f s",
                      self._who(), job_id, state, status.get("progress"), interval)
            self.source.sleep(interval)
            interval = min(interval * self.cfg.poll_backoff, self.cfg.poll_max_interval_s)

    # -- downloads ---------------------------------------------------------------------------
    def _check_download_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ExportApiError(f"{self._who()}: presigned URL {redact_url(url)} is not an http(s) URL")
        if parts.scheme != "https" and not is_loopback(parts.hostname):
            raise ExportApiError(
                f"{self._who()}: refusing to download {redact_url(url)}: presigned URLs must use HTTPS "
                f"(plain http is only accepted on loopback)"
            )

    def download(self, url: str, dest: Path, filename: str) -> int:
        """Stream ``url`` to ``dest`` (no API key, redirects checked). Returns the byte count.

        Raises _UrlRejected (403/410), _ChunkBroken (truncated), _Retryable (429/5xx/connect).
        """
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_download_url(url)
            try:
                with self._dl.stream("GET", url) as response:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if status in (401, 403, 404, 410):
                        raise _UrlRejected(f"HTTP {status} from {redact_url(url)}")
                    if status == 429 or status >= 500:
                        raise _Retryable(
                            "rate_limited" if status == 429 else "server_error",
                            f"HTTP {status} downloading chunk {filename}",
                            parse_retry_after(response.headers.get("Retry-After")),
                        )
                    if status != 200:
                        raise ExportApiError(
                            f"{self._who()}: downloading chunk {filename} from {redact_url(url)} failed with HTTP {status}"
                        )
                    expected = response.headers.get("Content-Length")
                    written = 0
                    tmp = dest.with_name(dest.name + ".part")
                    with open(tmp, "wb") as fh:
                        for piece in response.iter_raw(_DOWNLOAD_PIECE):
                            fh.write(piece)
                            written += len(piece)
                    if expected is not None and expected.isdigit() and int(expected) != written:
                        tmp.unlink(missing_ok=True)
                        raise _ChunkBroken(f"received {written} of {expected} bytes")
                    if (response.headers.get("Content-Encoding") or "").lower() == "gzip" and dest.suffix != ".gz":
                        dest = dest.with_name(dest.name + ".gz")
                    tmp.replace(dest)
                    return written
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as exc:
                raise _ChunkBroken(f"connection broke mid-download ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise _Retryable("transport_error", f"{type(exc).__name__} downloading chunk {filename}") from None
        raise ExportApiError(f"{self._who()}: too many redirects downloading chunk {filename}")

    # -- lookups -----------------------------------------------------------------------------
    def iter_lookup_pages(self, kind: str, page_size: int | None = None) -> Iterator[list[dict]]:
        """Pages of one lookup endpoint's records, following ``metadata.cursor.after``.

        Raises ExportApiError for unexpected answers or a cursor that repeats.
        """
        limit = page_size or self.cfg.lookup_page_size
        after: str | None = None
        seen: set[str] = set()
        fetched = 0
        total = None
        what = f"reading lookup {kind!r}"
        while True:
            params: dict[str, Any] = {"limit": limit}
            if after:
                params["after"] = after
            response = self.request("GET", LOOKUP_PATH.format(kind=kind), what, params=params)
            if response.status_code != 200:
                raise self._unexpected(response, what)
            body = self._json(response, what)
            records = body.get("data") if isinstance(body, dict) else body
            if isinstance(records, dict):
                records = records.get(kind) or records.get("items") or []
            if not isinstance(records, list):
                raise ExportApiError(f"{self._who()}: {what}: the answer has no list of records")
            meta = body.get("metadata") if isinstance(body, dict) else None
            meta = meta if isinstance(meta, dict) else {}
            cursor = meta.get("cursor") if isinstance(meta.get("cursor"), dict) else {}
            total = meta.get("total_count", total)
            fetched += len(records)
            if records:
                yield records
            after = cursor.get("after")
            if not after or not records:
                break
            after = str(after)
            if after in seen:
                raise ExportApiError(f"{self._who()}: {what}: the cursor {after!r} repeats; stopping")
            seen.add(after)
        if isinstance(total, int) and total != fetched:
            log.warning("%s: lookup %s announced total_count %d but %d records were returned",
                        self._who(), kind, total, fetched)


# ---------------------------------------------------------------------------------- source
class ExportApiSource:
    """Raw events of one app from Userpilot's Bulk Data Export API (see module docstring).

    ``sleep``, ``clock`` (monotonic seconds) and ``jitter`` (0..1) are injectable for tests;
    ``env`` defaults to ``os.environ``; ``transport``/``download_transport`` are optional httpx
    transports. The API key is looked up in ``env[config.api_key_env]`` by :meth:`extract`.
    """

    kind = "export_api"

    def __init__(
        self,
        config: ExportApiSourceConfig,
        *,
        sync_job: str,
        app_token: str,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        env: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        download_transport: httpx.BaseTransport | None = None,
    ):
        self.config = config
        self.sync_job = sync_job
        self.app_token = app_token
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter
        self.env = env
        self.transport = transport
        self.download_transport = download_transport

    @classmethod
    def from_config(cls, job: SyncJob, **kwargs) -> "ExportApiSource":
        """The source of a sync job whose ``source.kind`` is ``export_api`` (kwargs: see class)."""
        if not isinstance(job.source, ExportApiSourceConfig):
            raise SourceError(f"sync job {job.name!r}: source kind is {job.source.kind!r}, not 'export_api'")
        return cls(job.source, sync_job=job.name, app_token=job.app_token, **kwargs)

    def __repr__(self) -> str:
        return (f"ExportApiSource(sync_job={self.sync_job!r}, app_token={self.app_token!r}, "
                f"base_url={self.config.base_url!r}, api_key_env={self.config.api_key_env!r})")

    # -- key and client ----------------------------------------------------------------------
    def _api_key(self, sync_job: str) -> _Secret:
        env = os.environ if self.env is None else self.env
        name = self.config.api_key_env
        value = (env.get(name) or "").strip()
        if not value:
            raise ApiKeyError(
                f"sync job {sync_job!r}: the environment variable {name} (source.api_key_env) is not set; "
                f"put the Export API key from Userpilot's Environment page into it."
            )
        return _Secret(value)

    def client(self, sync_job: str | None = None) -> ExportApiClient:
        """An authenticated :class:`ExportApiClient` (reads the key now; raises ApiKeyError)."""
        sync_job = sync_job or self.sync_job
        return ExportApiClient(self, self._api_key(sync_job), sync_job, self.app_token)

    # -- EventSource -------------------------------------------------------------------------
    def extract(self, request: ExtractRequest) -> Extraction:
        """Create, wait for and download one export job of the request's window.

        The key is read here (ApiKeyError if missing); network work happens while the batches
        are consumed. Batches are yielded only after every chunk was downloaded and parsed.
        """
        key = self._api_key(request.sync_job)
        fmt = self.config.chunk_format
        facts: dict[str, Any] = {
            "kind": self.kind,
            "base_url": self.config.base_url,
            "format": fmt,
            "export_job_id": None,
            "chunks": 0,
            "retries": {r: 0 for r in RETRY_REASONS},
            "retries_total": 0,
        }
        return Extraction(batches=self._batches(request, key, facts), facts=facts)

    def _job_body(self, request: ExtractRequest) -> dict:
        return {
            "from": iso_utc(request.start),
            "to": iso_utc(request.end),
            "event_type": list(request.event_types),
            "format": self.config.chunk_format,
        }

    def _batches(self, request: ExtractRequest, key: _Secret, facts: dict) -> Iterator[SourceBatch]:
        client = ExportApiClient(self, key, request.sync_job, request.app_token or self.app_token)
        try:
            with client:
                job_id, files = self._run(client, request, facts)
        except SourceError as exc:
            self._record_retries(client, facts)
            # Defence in depth: no message leaves with the key in it.
            message = client.redact(str(exc))
            if message != str(exc):
                raise type(exc)(message) from None
            raise
        finally:
            self._record_retries(client, facts)
        for chunk in files:
            where = f"export job {job_id}, chunk {chunk.filename}"
            if chunk.rows == 0:
                chunk.path.unlink(missing_ok=True)
                continue
            for batch in iter_chunk_batches(chunk.path, chunk.fmt):
                yield SourceBatch(where=where, data=batch)
            chunk.path.unlink(missing_ok=True)

    @staticmethod
    def _record_retries(client: ExportApiClient, facts: dict) -> None:
        facts["retries"] = {r: int(client.retries.get(r, 0)) for r in RETRY_REASONS}
        facts["retries_total"] = int(sum(facts["retries"].values()))

    def _new_job(self, client: ExportApiClient, request: ExtractRequest, facts: dict) -> tuple[str, dict]:
        job_id = client.create_job(self._job_body(request))
        facts["export_job_id"] = job_id
        facts.setdefault("export_job_ids", []).append(job_id)
        log.info("%s: created export job %s for [%s, %s) (%s chunks)", client._who(), job_id,
                 iso_utc(request.start), iso_utc(request.end), self.config.chunk_format)
        status = client.wait_for_job(job_id)
        return job_id, status

    def _chunks(self, client: ExportApiClient, job_id: str, status: dict) -> list[_Chunk]:
        urls = status.get("presigned_urls") or []
        if not isinstance(urls, list):
            raise ExportApiError(f"{client._who()}: export job {job_id}: presigned_urls is not a list")
        chunks = []
        for i, item in enumerate(urls):
            if isinstance(item, str):
                chunks.append(_Chunk(filename=Path(urlsplit(item).path).name or f"export-part{i + 1}", url=item))
            elif isinstance(item, dict) and item.get("url"):
                chunks.append(_Chunk(filename=str(item.get("filename") or f"export-part{i + 1}"), url=str(item["url"])))
            else:
                raise ExportApiError(f"{client._who()}: export job {job_id}: presigned_urls[{i}] has no url")
        announced = status.get("all_chunks")
        if isinstance(announced, int) and announced != len(chunks):
            raise ExportApiError(
                f"{client._who()}: export job {job_id} is completed but lists {len(chunks)} download URL(s) "
                f"for all_chunks = {announced}; refusing a partial day. Re-run the partition."
            )
        return chunks

    def _run(self, client: ExportApiClient, request: ExtractRequest, facts: dict) -> tuple[str, list[_Downloaded]]:
        work = Path(request.work_dir) / "chunks"
        job_id, status = self._new_job(client, request, facts)
        new_jobs = 0
        while True:
            try:
                files = self._download_all(client, job_id, status, work)
                break
            except _JobGone:
                if new_jobs >= 1:
                    raise ChunkDownloadError(
                        f"{client._who()}: the download URLs of export job {job_id} are rejected and its "
                        f"status is gone; a replacement export job did not help. Re-run the partition."
                    ) from None
                new_jobs += 1
                client.retries["new_export_job"] += 1
                log.warning("%s: export job %s is no longer available (status 404); creating a new export job",
                            client._who(), job_id)
                job_id, status = self._new_job(client, request, facts)
        facts.update(
            export_job_id=job_id,
            chunks=len(files),
            chunk_files=[f.filename for f in files],
            chunk_rows=sum(f.rows for f in files),
            chunk_bytes=sum(f.bytes for f in files),
        )
        log.info("%s: export job %s delivered %d chunk(s), %d rows", client._who(), job_id, len(files),
                 facts["chunk_rows"])
        return job_id, files

    def _download_all(self, client: ExportApiClient, job_id: str, status: dict, work: Path) -> list[_Downloaded]:
        if work.exists():
            for old in work.iterdir():
                old.unlink()
        work.mkdir(parents=True, exist_ok=True)
        chunks = self._chunks(client, job_id, status)
        fmt_default = self.config.chunk_format
        out: list[_Downloaded] = []
        refreshes = 0
        for index in range(len(chunks)):
            chunk = chunks[index]
            local = work / _safe_filename(chunk.filename, index, fmt_default)
            fmt = chunk_format(Path(chunk.filename)) or fmt_default
            broken = 0
            while True:
                try:
                    size = client.with_retries(
                        f"downloading chunk {chunk.filename} of export job {job_id}",
                        lambda: client.download(chunk.url, local, chunk.filename),
                    )
                    path = local if local.exists() else local.with_name(local.name + ".gz")
                    rows = self._verify(path, fmt)
                    out.append(_Downloaded(chunk.filename, path, fmt, rows, size))
                    break
                except _UrlRejected as exc:
                    refreshes += 1
                    if refreshes > self.config.max_url_refreshes:
                        raise ChunkDownloadError(
                            f"{client._who()}: the storage host keeps rejecting the download URLs of export job "
                            f"{job_id} ({exc}) after {self.config.max_url_refreshes} refreshes. Nothing was "
                            f"exported for this partition; re-run it."
                        ) from None
                    client.retries["url_refresh"] += 1
                    log.warning("%s: download URL of chunk %s rejected (%s); fetching fresh URLs",
                                client._who(), chunk.filename, exc)
                    fresh = client.job_status(job_id)
                    if fresh is None:
                        raise _JobGone() from None
                    chunks = self._chunks(client, job_id, fresh)
                    match = [c for c in chunks if c.filename == chunk.filename]
                    chunk = match[0] if match else chunks[index]
                except _ChunkBroken as exc:
                    broken += 1
                    local.unlink(missing_ok=True)
                    local.with_name(local.name + ".gz").unlink(missing_ok=True)
                    if broken > self.config.chunk_retries:
                        raise ChunkDownloadError(
                            f"{client._who()}: chunk {chunk.filename} of export job {job_id} is truncated or "
                            f"unreadable after {broken} download(s): {exc}. Nothing was staged for this "
                            f"partition; re-run it (a new export job is created)."
                        ) from None
                    client.retries["chunk_redownload"] += 1
                    log.warning("%s: chunk %s of export job %s is broken (%s); downloading it again",
                                client._who(), chunk.filename, job_id, exc)
        return out

    @staticmethod
    def _verify(path: Path, fmt: str) -> int:
        """Parse a chunk completely once; returns its row count. Raises _ChunkBroken."""
        rows = 0
        if path.stat().st_size == 0:  # an empty chunk (e.g. a CSV without even a header)
            return 0
        try:
            for batch in iter_chunk_batches(path, fmt):
                rows += batch.num_rows
        except SourceError as exc:
            raise _ChunkBroken(str(exc)) from None
        return rows
