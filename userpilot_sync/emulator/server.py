"""A local emulator of Userpilot's Bulk Data Export API, over real HTTP on loopback.

Two ``ThreadingHTTPServer``\\ s run in background threads:

* the **API host** (``emulator.base_url``) implements the documented contract:
  ``POST /api/v1/analytics/exports`` (201 ``{job_id, environment_app_token, ...}``; 409 while
  another job of the app token is pending), ``GET /api/v1/analytics/exports/jobs/`` (list),
  ``GET /api/v1/analytics/exports/jobs/{job_id}`` (``status`` pending -> completed,
  ``progress``, ``all_chunks``, ``completed_chunks``, ``presigned_urls`` [{filename, url}];
  404 after the 3-day retention), ``GET /api/v1/analytics/exports/lookups/{kind}`` (``limit``,
  ``after``; ``metadata.cursor.after``, ``metadata.limit``, ``metadata.total_count``).
  Auth: ``Authorization: Token <API key>``; errors are
  ``{"errors": [{"details", "error", "error_code", "message"}]}``.
* the **storage host** (``emulator.storage_url``) serves the chunk files behind presigned URLs
  ``/<job_id>/<filename>?expires=<unix seconds>&signature=<hmac>``, valid 2 days from the
  status request that issued them (403 with an S3-like XML body when expired or tampered).

A job stays ``pending`` for ``polls_to_complete`` status requests (progress grows), then its
chunks are written: the :class:`~userpilot_sync.source.demo.DemoSource` events of the requested
window (same app token / ``events_per_day`` / ``seed`` as the sync job's demo source), event
types filtered, split into ``chunks`` files in the requested format (parquet, ndjson, csv, avro).

Failure modes are switched on per test through :attr:`ExportApiEmulator.faults` (see
:class:`Faults`), e.g. ``emulator.fail_next("create", 409, times=2)``. Every request is recorded
(:attr:`ExportApiEmulator.requests`, with headers) so tests can prove the API key never reaches
the storage host. The clock (``now``) is injectable and :meth:`advance` moves it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import fastavro
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync.source.demo import DemoSource
from userpilot_sync.source.lookups import LOOKUP_KINDS, demo_lookup_records

API_PREFIX = "/api/v1/analytics/exports"
JOB_RETENTION = timedelta(days=3)
URL_EXPIRY = timedelta(days=2)
CHUNK_FORMATS = ("parquet", "ndjson", "csv", "avro")
_STRING_COLUMNS = (
    "app_token", "event_type", "event_name", "user_id", "company_id", "source", "internal_event_id",
    "hostname", "pathname", "device_type", "user_agent", "operating_system", "browser",
    "browser_language", "session", "country_code", "metadata",
)
_AVRO_SCHEMA = fastavro.parse_schema({
    "type": "record",
    "name": "userpilot_event",
    "fields": [
        *({"name": c, "type": ["null", "string"], "default": None} for c in (
            "app_token", "event_type", "event_name", "user_id", "company_id", "source")),
        {"name": "inserted_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        *({"name": c, "type": ["null", "string"], "default": None} for c in (
            "internal_event_id", "hostname", "pathname")),
        *({"name": c, "type": ["null", "int"], "default": None} for c in ("screen_width", "screen_height")),
        *({"name": c, "type": ["null", "string"], "default": None} for c in (
            "device_type", "user_agent", "operating_system", "browser", "browser_language", "session",
            "country_code", "metadata")),
    ],
})


@dataclass
class App:
    """One Userpilot environment served by the emulator: its API key and demo settings."""

    app_token: str
    api_key: str
    events_per_day: int = 2000
    seed: int = 42
    environment_name: str = "production"


@dataclass
class Faults:
    """Switchable failure modes (all off by default). Counters count down as they fire.

    ``fail_next`` entries: target (``create``, ``status``, ``list``, ``lookup``, ``api`` = any API
    request, ``download``) -> list of [status, remaining, retry_after]; served before the request
    is handled, as an error body (API) or an XML error (storage).
    """

    fail_next: dict[str, list[list[Any]]] = field(default_factory=dict)
    #: Jobs end ``failed`` with this message instead of completing.
    job_failure: str | None = None
    #: Jobs never leave ``pending``.
    never_complete: bool = False
    #: Completed jobs list no chunks at all (``all_chunks`` 0).
    zero_chunks: bool = False
    #: Completed jobs list ``chunks`` chunk files that hold no events.
    empty_chunks: bool = False
    #: The next N downloads send the headers (full Content-Length) and half the body, then close.
    truncate_downloads: int = 0
    #: Every chunk file is served cut in half, with a matching Content-Length (a corrupt file).
    corrupt_chunks: bool = False
    #: Downloads first answer 302 to another path on the storage host.
    redirect_downloads: bool = False
    #: Presigned URLs are issued on this base instead of the storage host (e.g. non-HTTPS tests).
    presigned_base_url: str | None = None
    #: Export slightly more than asked: events this many seconds before ``from`` and after ``to``.
    window_slack_s: float = 0.0
    #: Status answers list ``all_chunks`` larger than the URLs given (a partial job).
    short_url_list: bool = False


@dataclass
class Job:
    job_id: str
    app_token: str
    created_at: datetime
    window_from: datetime
    window_to: datetime
    event_types: tuple[str, ...]
    fmt: str
    status: str = "pending"
    polls: int = 0
    error: str | None = None
    files: list[str] = field(default_factory=list)


@dataclass
class RecordedRequest:
    """One request the emulator received (``host`` is ``api`` or ``storage``)."""

    host: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


def _parse_ts(text: Any) -> datetime:
    value = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_chunk(table: pa.Table, path: Path, fmt: str) -> None:
    """Write demo events (Event Schema columns) as one chunk file in ``fmt``.

    parquet: the Arrow types as generated (``inserted_at`` timestamp[us, UTC], metadata JSON
    text); ndjson: ``inserted_at`` ISO-8601 text with ``Z``, ``metadata`` a JSON object; csv:
    ISO-8601 text, nulls as empty fields, metadata JSON text; avro: ``timestamp-micros``,
    nullable strings/ints.
    """
    if fmt == "parquet":
        pq.write_table(table, path, compression="snappy")
        return
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    if fmt == "avro":
        records = frame.to_dicts()
        with open(path, "wb") as fh:
            fastavro.writer(fh, _AVRO_SCHEMA, records, codec="deflate")
        return
    frame = frame.with_columns(pl.col("inserted_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
    if fmt == "csv":
        pacsv.write_csv(frame.to_arrow(), path)
        return
    with open(path, "w", encoding="utf-8") as fh:
        for rec in frame.iter_rows(named=True):
            if rec.get("metadata"):
                rec["metadata"] = json.loads(rec["metadata"])
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def write_empty_chunk(path: Path, fmt: str, schema: pa.Schema) -> None:
    """A chunk file of ``fmt`` that holds no events (schema/header only; ndjson: 0 bytes)."""
    if fmt == "ndjson":
        path.write_bytes(b"")
    elif fmt == "avro":
        with open(path, "wb") as fh:
            fastavro.writer(fh, _AVRO_SCHEMA, [])
    else:
        write_chunk(schema.empty_table(), path, fmt)


class ExportApiEmulator:
    """The emulator: start with :meth:`start` (or as a context manager), stop with :meth:`stop`.

    ``apps`` maps API keys to :class:`App`\\ s (one is added from ``api_key``/``app_token`` when
    given). ``chunks``: chunk files per job; ``polls_to_complete``: status requests a job stays
    pending; ``now``: the clock (UTC datetimes); ``page_size``: default lookup page size.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        app_token: str | None = None,
        events_per_day: int = 2000,
        seed: int = 42,
        chunks: int = 3,
        polls_to_complete: int = 2,
        page_size: int = 5,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        now: Callable[[], datetime] | None = None,
        work_dir: Path | None = None,
    ):
        self.apps: dict[str, App] = {}
        if api_key and app_token:
            self.add_app(api_key, app_token, events_per_day=events_per_day, seed=seed)
        self.chunks = chunks
        self.polls_to_complete = polls_to_complete
        self.page_size = page_size
        self.host = host
        self._ports = (port, storage_port)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._offset = timedelta(0)
        self.faults = Faults()
        #: Called with each storage-host request before it is served (tests move the clock here).
        self.on_download: Callable[[RecordedRequest], None] | None = None
        self.jobs: dict[str, Job] = {}
        self.requests: list[RecordedRequest] = []
        self.counts: Counter = Counter()
        self._lock = threading.RLock()
        self._secret = uuid.uuid4().bytes
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="userpilot-emulator-"))
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- setup -------------------------------------------------------------------------------
    def add_app(self, api_key: str, app_token: str, *, events_per_day: int = 2000, seed: int = 42) -> App:
        """Register an environment (API key -> app token and its demo settings)."""
        app = App(app_token=app_token, api_key=api_key, events_per_day=events_per_day, seed=seed)
        self.apps[api_key] = app
        return app

    def now(self) -> datetime:
        """The emulator's clock (the injected clock plus :meth:`advance` offsets)."""
        return self._now() + self._offset

    def advance(self, **kwargs) -> None:
        """Move the clock forward (``timedelta`` kwargs, e.g. ``days=3``)."""
        self._offset += timedelta(**kwargs)

    def fail_next(self, target: str, status: int, times: int = 1, retry_after: float | str | None = None) -> None:
        """Answer the next ``times`` requests of ``target`` with HTTP ``status``.

        ``target``: ``create``, ``status``, ``list``, ``lookup``, ``api`` (any API request) or
        ``download``. ``retry_after`` adds a Retry-After header.
        """
        with self._lock:
            self.faults.fail_next.setdefault(target, []).append([status, times, retry_after])

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ExportApiEmulator":
        """Start both servers in daemon threads; returns self."""
        for role, port in zip(("api", "storage"), self._ports):
            server = ThreadingHTTPServer((self.host, port), _make_handler(self, role))
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"userpilot-emulator-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the servers and remove the chunk files."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "ExportApiEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Base URL of the API host (what a sync job's ``source.base_url`` points at)."""
        return f"http://{self.host}:{self._servers[0].server_address[1]}"

    @property
    def storage_url(self) -> str:
        """Base URL of the storage host that serves presigned chunk downloads."""
        return f"http://{self.host}:{self._servers[1].server_address[1]}"

    def requests_to(self, host: str) -> list[RecordedRequest]:
        """Recorded requests of one host (``api`` or ``storage``)."""
        with self._lock:
            return [r for r in self.requests if r.host == host]

    # -- behaviour ---------------------------------------------------------------------------
    def _take_fault(self, targets: tuple[str, ...]) -> tuple[int, Any] | None:
        with self._lock:
            for target in targets:
                queue = self.faults.fail_next.get(target) or []
                while queue and queue[0][1] <= 0:
                    queue.pop(0)
                if queue:
                    queue[0][1] -= 1
                    self.counts[f"fault_{target}_{queue[0][0]}"] += 1
                    return queue[0][0], queue[0][2]
        return None

    def sign(self, job_id: str, filename: str, expires: int) -> str:
        return hmac.new(self._secret, f"{job_id}/{filename}:{expires}".encode(), hashlib.sha256).hexdigest()

    def presigned_url(self, job_id: str, filename: str) -> str:
        expires = int((self.now() + URL_EXPIRY).timestamp())
        base = self.faults.presigned_base_url or self.storage_url
        return f"{base}/{job_id}/{filename}?expires={expires}&signature={self.sign(job_id, filename, expires)}"

    def _running(self, app_token: str) -> Job | None:
        for job in self.jobs.values():
            if job.app_token == app_token and job.status == "pending":
                return job
        return None

    def create_job(self, app: App, body: dict) -> tuple[int, dict]:
        try:
            window_from = _parse_ts(body["from"])
            window_to = _parse_ts(body["to"])
        except (KeyError, ValueError, TypeError):
            return 422, _error(422, "invalid_parameters", "'from' and 'to' must be ISO-8601 timestamps")
        if window_to <= window_from:
            return 422, _error(422, "invalid_parameters", "'to' must be after 'from'")
        types = body.get("event_type", body.get("event_type[]")) or list(EVENT_TYPES)
        if isinstance(types, str):
            types = [types]
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            return 422, _error(422, "invalid_parameters", f"unknown event_type {unknown}")
        fmt = body.get("format") or "parquet"
        if fmt not in CHUNK_FORMATS:
            return 422, _error(422, "invalid_parameters", f"format must be one of {', '.join(CHUNK_FORMATS)}")
        with self._lock:
            if self._running(app.app_token):
                return 409, _error(409, "conflict", "An export job is already in progress for this application token")
            job = Job(job_id=str(uuid.uuid4()), app_token=app.app_token, created_at=self.now(),
                      window_from=window_from, window_to=window_to, event_types=tuple(types), fmt=fmt)
            self.jobs[job.job_id] = job
        return 201, {
            "environment_app_token": app.app_token,
            "environment_name": app.environment_name,
            "job_id": job.job_id,
            "links": f"{API_PREFIX}/jobs/{job.job_id}",
            "start_time": _iso(job.created_at),
        }

    def _job_for(self, app: App, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.app_token != app.app_token or self.now() - job.created_at > JOB_RETENTION:
            return None
        return job

    def _complete(self, app: App, job: Job) -> None:
        folder = self.work_dir / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        demo = DemoSource(app.app_token, events_per_day=app.events_per_day, seed=app.seed)
        slack = timedelta(seconds=self.faults.window_slack_s)
        tables = list(demo.iter_blocks(job.window_from - slack, job.window_to + slack, job.event_types))
        schema = demo.block_events(job.window_from.date(), 0).schema
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        n_chunks = 0 if self.faults.zero_chunks else max(1, self.chunks)
        if not self.faults.zero_chunks and table.num_rows == 0 and not self.faults.empty_chunks:
            n_chunks = 0  # an empty window: no chunk at all
        per = -(-table.num_rows // n_chunks) if n_chunks else 0
        for i in range(n_chunks):
            name = f"export-part{i + 1}.{job.fmt}"
            path = folder / name
            if self.faults.empty_chunks:
                write_empty_chunk(path, job.fmt, schema)
            else:
                write_chunk(table.slice(i * per, per), path, job.fmt)
            if self.faults.corrupt_chunks:
                data = path.read_bytes()
                path.write_bytes(data[: max(1, len(data) // 2)])
            job.files.append(name)
        job.status = "completed"

    def job_document(self, app: App, job: Job) -> dict:
        with self._lock:
            if job.status == "pending":
                job.polls += 1
                if job.polls >= self.polls_to_complete and not self.faults.never_complete:
                    if self.faults.job_failure:
                        job.status, job.error = "failed", self.faults.job_failure
                    else:
                        self._complete(app, job)
            planned = 0 if self.faults.zero_chunks else self.chunks
            doc: dict[str, Any] = {
                "job_id": job.job_id,
                "environment_app_token": job.app_token,
                "status": job.status,
                "format": job.fmt,
                "from": _iso(job.window_from),
                "to": _iso(job.window_to),
                "created_at": _iso(job.created_at),
                "expires_at": _iso(job.created_at + JOB_RETENTION),
            }
            if job.status == "completed":
                urls = [{"filename": f, "url": self.presigned_url(job.job_id, f)} for f in job.files]
                doc.update(progress=100, all_chunks=len(job.files) + (1 if self.faults.short_url_list else 0),
                           completed_chunks=len(job.files), presigned_urls=urls)
            elif job.status == "failed":
                doc.update(progress=min(99, 100 * job.polls // max(1, self.polls_to_complete)),
                           all_chunks=planned, completed_chunks=0, presigned_urls=[], error=job.error)
            else:
                progress = min(99, 100 * job.polls // max(1, self.polls_to_complete + 1))
                doc.update(progress=progress, all_chunks=planned,
                           completed_chunks=planned * progress // 100, presigned_urls=[])
            return doc

    def lookup_page(self, kind: str, query: dict[str, list[str]]) -> tuple[int, dict]:
        if kind not in LOOKUP_KINDS:
            return 404, _error(404, "not_found", f"unknown lookup {kind!r}")
        records = demo_lookup_records(kind)
        try:
            limit = int(query.get("limit", [self.page_size])[0])
            start = int(query.get("after", ["0"])[0] or 0)
        except ValueError:
            return 422, _error(422, "invalid_parameters", "limit and after must be integers")
        limit = max(1, min(limit, 1000))
        page = records[start: start + limit]
        nxt = start + limit if start + limit < len(records) else None
        return 200, {
            "data": page,
            "metadata": {"cursor": {"after": None if nxt is None else str(nxt)}, "limit": limit,
                         "total_count": len(records)},
        }


def _error(status: int, code: str, message: str, details: str = "") -> dict:
    titles = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity",
              429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
    return {"errors": [{"details": details or message, "error": titles.get(status, "Error"),
                        "error_code": code, "message": message}]}


def _make_handler(emu: ExportApiEmulator, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "userpilot-export-emulator"

        def log_message(self, format, *args):  # noqa: A002 - keep test output clean
            pass

        # -- plumbing ------------------------------------------------------------------------
        def _record(self, body: bytes) -> RecordedRequest:
            parts = urlsplit(self.path)
            rec = RecordedRequest(host=role, method=self.command, path=parts.path, query=parse_qs(parts.query),
                                  headers={k: v for k, v in self.headers.items()}, body=body)
            with emu._lock:
                emu.requests.append(rec)
            return rec

        def _send(self, rec: RecordedRequest, status: int, body: bytes, content_type: str = "application/json",
                  headers: dict | None = None) -> None:
            rec.status = status
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, rec, status: int, doc: dict, headers: dict | None = None) -> None:
            self._send(rec, status, json.dumps(doc).encode(), headers=headers)

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def do_GET(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def _dispatch(self):
            rec = self._record(self._read_body())
            try:
                (self._api if role == "api" else self._storage)(rec)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        # -- API host ------------------------------------------------------------------------
        def _api(self, rec: RecordedRequest) -> None:
            path = rec.path.rstrip("/")
            if path == API_PREFIX and self.command == "POST":
                target = "create"
            elif path == f"{API_PREFIX}/jobs":
                target = "list"
            elif path.startswith(f"{API_PREFIX}/jobs/"):
                target = "status"
            elif path.startswith(f"{API_PREFIX}/lookups/"):
                target = "lookup"
            else:
                return self._json(rec, 404, _error(404, "not_found", f"no route {self.command} {rec.path}"))
            fault = emu._take_fault((target, "api"))
            if fault:
                status, retry_after = fault
                headers = {"Retry-After": retry_after} if retry_after is not None else None
                return self._json(rec, status, _error(status, f"http_{status}", "emulated failure"), headers)
            auth = self.headers.get("Authorization") or ""
            app = emu.apps.get(auth[len("Token "):].strip()) if auth.startswith("Token ") else None
            if app is None:
                return self._json(rec, 401, _error(401, "unauthorized", "Invalid API key",
                                                   "Send 'Authorization: Token <API key>'"))
            if target == "create":
                try:
                    body = json.loads(rec.body or b"{}")
                except ValueError:
                    return self._json(rec, 400, _error(400, "bad_request", "the body is not JSON"))
                status, doc = emu.create_job(app, body if isinstance(body, dict) else {})
                return self._json(rec, status, doc)
            if target == "list":
                with emu._lock:
                    jobs = [j for j in emu.jobs.values() if emu._job_for(app, j.job_id)]
                    docs = [{"job_id": j.job_id, "status": j.status, "created_at": _iso(j.created_at)} for j in jobs]
                return self._json(rec, 200, {"data": docs, "metadata": {"total_count": len(docs)}})
            if target == "status":
                job_id = path.rsplit("/", 1)[-1]
                job = emu._job_for(app, job_id)
                if job is None:
                    return self._json(rec, 404, _error(404, "not_found", f"export job {job_id} not found"))
                return self._json(rec, 200, emu.job_document(app, job))
            status, doc = emu.lookup_page(path.rsplit("/", 1)[-1], rec.query)
            return self._json(rec, status, doc)

        # -- storage host --------------------------------------------------------------------
        def _xml(self, rec, status: int, code: str, message: str) -> None:
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>").encode()
            self._send(rec, status, body, "application/xml")

        def _storage(self, rec: RecordedRequest) -> None:
            if emu.on_download is not None:
                emu.on_download(rec)
            parts = rec.path.strip("/").split("/")
            if parts and parts[0] == "redirected":
                parts = parts[1:]
            elif emu.faults.redirect_downloads and self.command == "GET":
                query = urlsplit(self.path).query
                rec.status = 302
                self.send_response(302)
                self.send_header("Location", f"/redirected{rec.path}?{query}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fault = emu._take_fault(("download",))
            if fault:
                status, retry_after = fault
                codes = {403: ("AccessDenied", "Request has expired"), 410: ("Gone", "The link has expired")}
                code, message = codes.get(status, ("InternalError", "emulated failure"))
                if retry_after is not None:
                    rec.status = status
                    body = b"slow down"
                    self.send_response(status)
                    self.send_header("Retry-After", str(retry_after))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                return self._xml(rec, status, code, message)
            if len(parts) != 2:
                return self._xml(rec, 404, "NoSuchKey", "The specified key does not exist.")
            job_id, filename = parts
            try:
                expires = int(rec.query.get("expires", ["0"])[0])
            except ValueError:
                expires = 0
            signature = rec.query.get("signature", [""])[0]
            if not hmac.compare_digest(signature, emu.sign(job_id, filename, expires)):
                return self._xml(rec, 403, "SignatureDoesNotMatch", "The request signature does not match.")
            if emu.now().timestamp() > expires:
                return self._xml(rec, 403, "AccessDenied", "Request has expired")
            path = emu.work_dir / job_id / filename
            if not path.is_file():
                return self._xml(rec, 404, "NoSuchKey", "The specified key does not exist.")
            size = path.stat().st_size
            truncate = False
            with emu._lock:
                if emu.faults.truncate_downloads > 0 and self.command == "GET":
                    emu.faults.truncate_downloads -= 1
                    emu.counts["truncated_downloads"] += 1
                    truncate = True
            rec.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command == "HEAD":
                return
            limit = size // 2 if truncate else size
            with open(path, "rb") as fh:
                sent = 0
                while sent < limit:
                    piece = fh.read(min(1 << 16, limit - sent))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    sent += len(piece)
            if truncate:
                self.wfile.flush()
                self.close_connection = True

    return Handler
