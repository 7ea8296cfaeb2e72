"""Upload journal: what a killed upload can leave in the destination, recorded before it can.

Two writes can leave something behind when the process dies in the middle (kill -9, the OOM
killer, a crashed machine): :class:`~userpilot_sync.destination.storage.LocalStorage` writes into a hidden
``.<name>.<uuid>.tmp`` next to the target and renames it, and
:class:`~userpilot_sync.destination.s3.S3Storage` uploads large files as a multipart upload whose
stored parts are kept (and billed) until the upload is completed or aborted. The exporter never
lists or reads the destination, so it cannot find such leftovers there; instead each pending write
is recorded locally *before* it can leave anything behind, and removed when the write completed or
was aborted normally:

* ``local_tmp``: the record (key, temp file name) is written before the temp file is created;
* ``s3_multipart``: the record (bucket, key) is written before ``CreateMultipartUpload`` and gets
  the ``UploadId`` as soon as the answer arrives, before the first ``UploadPart``; each stored part
  updates the bytes uploaded. A process that dies between the create and that update leaves a
  record without an upload id: it cannot be aborted without listing the bucket, so the bucket's
  lifecycle rule (``AbortIncompleteMultipartUpload``) is the net for that window.

Records are small JSON files, one per pending write, in a folder of the caller's choice (the
Dagster layer uses ``<staging root>/<sync job>/.uploads``, see :func:`journal_folder`), written
atomically (temp file + rename; no fsync: a record lost in a power cut leaves the lifecycle rule
as the net). Each names its writer: host, pid and process start time (``userpilot_sync.procs``).

:func:`clean_leftover_uploads` — called at the start of a run's writes — handles the records whose
writer is dead: it deletes the local temp file by its recorded path, or sends one
``AbortMultipartUpload`` for the recorded upload id, then drops the record. A live writer's records
(this process included) are never touched, nor are records written on another host. Nothing here
lists, heads or reads the destination (a local temp file is only looked up by its recorded path,
to report its size before it is deleted).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from userpilot_sync.errors import DestinationError
from userpilot_sync.procs import process_alive, start_time

#: Folder name of a sync job's journal under its staging folder.
JOURNAL_FOLDER = ".uploads"
LOCAL_TMP = "local_tmp"
S3_MULTIPART = "s3_multipart"
KINDS = (LOCAL_TMP, S3_MULTIPART)
#: The storage kind (``Storage.kind``) that can clean a record of each kind.
_STORAGE_KIND = {LOCAL_TMP: "local", S3_MULTIPART: "s3"}


class JournalError(DestinationError):
    """A pending write could not be recorded locally, so it was not started."""


def journal_folder(staging_root: str | Path, sync_job: str) -> Path:
    """The journal folder of ``sync_job``: ``<staging root>/<sync job>/.uploads``."""
    return Path(staging_root) / sync_job / JOURNAL_FOLDER


_IDENTITY: dict[int, tuple[str, int, str | None]] = {}


def _writer() -> tuple[str, int, str | None]:
    """This process's identity: (host, pid, start time); computed once per pid (forks differ)."""
    pid = os.getpid()
    ident = _IDENTITY.get(pid)
    if ident is None:
        ident = _IDENTITY[pid] = (socket.gethostname(), pid, start_time(pid))
    return ident


@dataclass(frozen=True)
class UploadRecord:
    """One pending write (see the module docstring); ``bytes``: uploaded so far, ``size``: total."""

    id: str
    kind: str
    key: str
    created: str  # UTC, ISO 8601
    host: str
    pid: int
    start_time: str | None
    bytes: int = 0
    size: int | None = None
    bucket: str | None = None  # s3_multipart
    upload_id: str | None = None  # s3_multipart, once CreateMultipartUpload answered
    tmp_name: str | None = None  # local_tmp: the temp file's name (next to the key's target)
    path: str | None = None  # local_tmp: the temp file's full path (for messages)

    def age_s(self, now: datetime | None = None) -> float:
        now = now or datetime.now(timezone.utc)
        try:
            return max(0.0, (now - datetime.fromisoformat(self.created)).total_seconds())
        except ValueError:
            return 0.0

    def where(self) -> str:
        """The leftover's location for messages: the temp file, or ``s3://bucket/key``."""
        if self.kind == S3_MULTIPART:
            return f"s3://{self.bucket}/{self.key}"
        return self.path or self.key


class UploadJournal:
    """Records of pending writes in ``folder`` (created on first use), one JSON file each."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def for_sync_job(cls, staging_root: str | Path, sync_job: str) -> "UploadJournal":
        """The journal of ``sync_job`` under the staging root (:func:`journal_folder`)."""
        return cls(journal_folder(staging_root, sync_job))

    def _file(self, record_id: str) -> Path:
        return self.folder / f"{record_id}.json"

    def _write(self, record: UploadRecord) -> UploadRecord:
        tmp = self.folder / f".{record.id}.{os.getpid()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(record), sort_keys=True))
            os.replace(tmp, self._file(record.id))
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise JournalError(
                f"cannot record a pending upload of {record.key} in {self.folder} ({exc.strerror or exc}); the "
                "upload was not started. Check the staging folder's permissions and free space") from None
        return record

    def begin(self, kind: str, key: str, *, size: int | None = None, bucket: str | None = None,
              upload_id: str | None = None, tmp_name: str | None = None, path: str | Path | None = None
              ) -> UploadRecord:
        """Record a write that is about to start (before it can leave anything behind).

        Raises :class:`JournalError` (a DestinationError) when the record cannot be written."""
        if kind not in KINDS:
            raise ValueError(f"unknown upload kind {kind!r}")
        host, pid, started = _writer()
        record = UploadRecord(
            id=uuid.uuid4().hex, kind=kind, key=key,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=host, pid=pid, start_time=started, size=size, bucket=bucket, upload_id=upload_id,
            tmp_name=tmp_name, path=str(path) if path is not None else None)
        return self._write(record)

    def update(self, record: UploadRecord, **changes: Any) -> UploadRecord:
        """Rewrite ``record`` with ``changes`` (e.g. ``upload_id=``, ``bytes=``); returns the new record."""
        return self._write(replace(record, **changes))

    def end(self, record: UploadRecord) -> None:
        """Drop ``record``: its write completed or was aborted. A record that cannot be removed stays
        harmless (the next cleanup finds nothing left, or aborts an upload S3 no longer has)."""
        try:
            self._file(record.id).unlink()
        except OSError:
            pass

    def records(self) -> list[UploadRecord]:
        """Every readable record, oldest first (unreadable files are skipped and left alone)."""
        found = []
        if not self.folder.is_dir():
            return found
        names = set(UploadRecord.__dataclass_fields__)
        for file in self.folder.glob("*.json"):
            try:
                data = json.loads(file.read_text())
                found.append(UploadRecord(**{k: v for k, v in data.items() if k in names}))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(found, key=lambda r: (r.created, r.id))

    def is_reported(self, record: UploadRecord) -> bool:
        """True when a cleanup already logged that it keeps ``record`` (see :meth:`mark_reported`)."""
        return (self.folder / f"{record.id}.reported").exists()

    def mark_reported(self, record: UploadRecord) -> None:
        """Note that ``record`` was logged as kept, in a marker file beside it: the record itself is
        never rewritten by anyone but its writer (a live writer on another host may still update it)."""
        try:
            (self.folder / f"{record.id}.reported").touch()
        except OSError:
            pass

    def sweep(self) -> None:
        """Remove the journal's own debris: temp files (``.<id>.<pid>.tmp``) whose writing process is
        gone, and ``.reported`` markers whose record is gone."""
        if not self.folder.is_dir():
            return
        for marker in self.folder.glob("*.reported"):
            if not self._file(marker.stem).exists():
                try:
                    marker.unlink()
                except OSError:
                    pass
        for tmp in self.folder.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[1])
            except (IndexError, ValueError):
                continue
            if not process_alive(pid):
                try:
                    tmp.unlink()
                except OSError:
                    pass


@dataclass(frozen=True)
class UploadLeftover:
    """A pending write of a dead writer and what :func:`clean_leftover_uploads` did with it.

    ``outcome``: ``removed`` (temp file deleted), ``aborted`` (multipart upload aborted), ``gone``
    (nothing was left: the write had finished, or the upload no longer exists), ``untracked`` (the
    writer died before it learnt the upload id: only the lifecycle rule can remove it), ``kept``
    (another destination or host: the record stays), ``failed`` (the delete/abort failed: the record
    stays and the next run tries again; ``detail`` says why). ``bytes``: the temp file's size, or
    the bytes the upload had stored.
    """

    kind: str
    key: str
    where: str
    age_s: float
    bytes: int
    outcome: str
    upload_id: str | None = None
    detail: str = ""

    @property
    def cleaned(self) -> bool:
        """True when nothing of this write is left in the destination (as far as can be known)."""
        return self.outcome in ("removed", "aborted", "gone")


@dataclass
class _Cleanup:
    journal: UploadJournal
    storage_for: Any
    log: Callable[[str], None] | None
    now: datetime
    storage: Any = None
    leftovers: list[UploadLeftover] = field(default_factory=list)
    errors: list[DestinationError] = field(default_factory=list)

    def get_storage(self) -> Any:
        if self.storage is None:
            target = self.storage_for
            self.storage = target() if callable(target) and not hasattr(target, "kind") else target
        return self.storage

    def done(self, record: UploadRecord, outcome: str, size: int, what: str, detail: str = "") -> None:
        """Note the leftover and log one line: kind, location, size (bytes), age (hours), what happened."""
        leftover = UploadLeftover(kind=record.kind, key=record.key, where=record.where(), age_s=record.age_s(self.now),
                                  bytes=size, outcome=outcome, upload_id=record.upload_id, detail=detail)
        self.leftovers.append(leftover)
        if self.log is not None and what:
            self.log(f"upload leftover of a killed writer: {record.kind} {leftover.where} ({size:,} bytes, "
                     f"{leftover.age_s / 3600:.1f} h old): {what}")

    def keep(self, record: UploadRecord, why: str) -> None:
        logged = self.journal.is_reported(record)
        self.done(record, "kept", record.bytes, "" if logged else f"kept: {why} (logged once)", why)
        if not logged:
            self.journal.mark_reported(record)

    def fail(self, record: UploadRecord, exc: DestinationError) -> None:
        self.errors.append(exc)
        self.done(record, "failed", record.bytes, f"not cleaned, the record is kept for the next run: {exc}", str(exc))

    def clean(self, record: UploadRecord) -> None:
        if record.host != socket.gethostname():
            self.keep(record, f"written on host {record.host}; only a run there can tell whether its writer is gone")
            return
        storage = self.get_storage()
        kind = getattr(storage, "kind", None)
        if _STORAGE_KIND.get(record.kind) != kind:
            self.keep(record, f"this sync job's destination is now {kind!r}, which cannot clean a {record.kind} leftover")
            return
        if record.kind == LOCAL_TMP:
            self.clean_local(storage, record)
        else:
            self.clean_s3(storage, record)

    def clean_local(self, storage: Any, record: UploadRecord) -> None:
        try:
            removed = storage.discard_temp(record.key, record.tmp_name or "")
        except DestinationError as exc:
            self.fail(record, exc)
            return
        self.journal.end(record)
        if removed is None:
            self.done(record, "gone", 0, f"temp file of {record.key} already gone; record dropped",
                      "the temp file no longer exists")
        else:
            self.done(record, "removed", removed, f"temp file of {record.key} removed")

    def clean_s3(self, storage: Any, record: UploadRecord) -> None:
        if record.bucket != storage.bucket:
            self.keep(record, f"the upload is in bucket {record.bucket}, this sync job now writes to {storage.bucket}")
            return
        if not record.upload_id:
            self.journal.end(record)
            self.done(record, "untracked", 0,
                      "the writer died before CreateMultipartUpload answered, so the upload id (if an upload was "
                      "created) is unknown and it cannot be aborted without listing the bucket; the bucket's "
                      "AbortIncompleteMultipartUpload lifecycle rule removes it (docs/destinations.md); record dropped",
                      "upload id unknown")
            return
        try:
            aborted = storage.abort_upload(record.key, record.upload_id)
        except DestinationError as exc:
            self.fail(record, exc)
            return
        self.journal.end(record)
        if aborted:
            self.done(record, "aborted", record.bytes, f"multipart upload {record.upload_id} aborted (its stored "
                                                       "parts are freed)")
        else:
            self.done(record, "gone", record.bytes, f"multipart upload {record.upload_id} no longer exists (completed, "
                                                    "or aborted by a lifecycle rule); record dropped", "NoSuchUpload")


def clean_leftover_uploads(
    journal: UploadJournal,
    storage_for: Any,
    log: Callable[[str], None] | None = None,
    *,
    strict: bool = False,
    now: datetime | None = None,
) -> list[UploadLeftover]:
    """Clean what writers that died left in the destination, from ``journal``'s records only.

    ``storage_for``: the sync job's current storage, or a no-argument callable returning it — called
    at most once, and only when a dead writer's record exists (so a clean journal costs no client
    and no request). For each record whose writer (host, pid, start time) is gone: a ``local_tmp``
    temp file is deleted by its recorded path; an ``s3_multipart`` upload is aborted with one
    ``AbortMultipartUpload`` (NoSuchUpload counts as already gone; transient errors are retried
    like every S3 call); then the record is dropped. Records of live writers (this process
    included) are not touched; records this storage cannot clean (another destination kind or
    bucket, another host) are kept and logged once. ``log(message)`` gets one line per leftover
    with its kind, location/key, size (bytes) and age (hours).

    A failed delete or abort (e.g. AccessDenied: the credential lacks ``s3:AbortMultipartUpload``)
    keeps the record and is logged; with ``strict`` the first such DestinationError is raised after
    every record was tried. Never lists, heads or reads the destination. Returns every leftover of a
    dead writer (or kept record) with its outcome, oldest first.
    """
    cleanup = _Cleanup(journal, storage_for, log, now or datetime.now(timezone.utc))
    journal.sweep()
    for record in journal.records():
        if record.host == socket.gethostname() and process_alive(record.pid, record.start_time):
            continue  # a live writer (maybe this very process): its write is still going on
        cleanup.clean(record)
    if strict and cleanup.errors:
        raise cleanup.errors[0]
    return cleanup.leftovers
