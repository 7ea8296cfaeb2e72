"""Storage backends: where exports and manifests are written. Write-only by design.

Every backend implements :class:`Storage`: ``put_file`` (stream a local file to a key,
replacing an existing object), ``put_bytes`` (small objects: manifests, markers) and
``delete`` (only used when the sync job sets ``allow_deletes``). No backend reads, lists or
heads objects in the destination: any state the exporter needs lives in the Dagster instance
or in staging.

:class:`LocalStorage` writes into a folder with atomic renames, so a reader never sees a
half-written file. S3 and GCS backends live in ``s3.py`` and ``gcs.py``. With an
:class:`~userpilot_sync.destination.journal.UploadJournal` (``journal=``), each temp file is recorded
before it is created, so the next run removes the ones a killed process left behind
(:func:`~userpilot_sync.destination.journal.clean_leftover_uploads`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from userpilot_sync.errors import DestinationError

if TYPE_CHECKING:
    from userpilot_sync.destination.journal import UploadJournal

#: Name of LocalStorage's temp files: ``.<target name>.<uuid hex>.tmp`` next to the target.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{32}\.tmp")


class Storage(Protocol):
    """A write-only object store rooted at a destination (keys use ``/``)."""

    kind: str

    def uri(self, key: str) -> str:
        """URI of an object, e.g. ``s3://bucket/key`` or ``file:///.../key``."""
        ...

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None) -> None:
        """Upload a local file to ``key`` (streaming), replacing any existing object."""
        ...

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Upload a small object (manifest, marker) to ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Delete an object (only called when the sync job allows deletes)."""
        ...


def _safe_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".") for p in parts):
        raise DestinationError(f"object key {key!r} is not a relative path inside the destination")
    return key


class LocalStorage:
    """A local folder as the destination (``root``); writes are atomic renames.

    ``journal``: records each temp file before it is created and drops the record once the
    write is renamed into place or cleaned up (None: no records, as before).
    """

    kind = "local"

    def __init__(self, root: str | Path, journal: "UploadJournal | None" = None):
        self.root = Path(root).absolute()
        self.journal = journal

    def path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def _replace(self, key: str, write, size: int | None = None) -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            record = None
            if self.journal is not None:  # before the temp file exists (JournalError: nothing written)
                record = self.journal.begin("local_tmp", key, tmp_name=tmp.name, path=tmp, size=size)
            try:
                write(tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
                if record is not None:  # not reached when the temp file could not be removed
                    self.journal.end(record)
        except OSError as exc:
            raise DestinationError(f"cannot write {target} ({exc.strerror or exc}); check the destination folder's permissions and free space") from None

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None) -> None:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None  # the copy reports the error
        self._replace(key, lambda tmp: shutil.copyfile(path, tmp), size=size)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        self._replace(key, lambda tmp: tmp.write_bytes(data), size=len(data))

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.exists():
            target.unlink()

    def discard_temp(self, key: str, tmp_name: str) -> int | None:
        """Delete the temp file ``tmp_name`` a killed write of ``key`` left next to its target (by
        that exact path: nothing is listed). Returns its size in bytes, or None if it is not there.
        Raises DestinationError for a name that is not one of this storage's temp files of ``key``,
        or when the file cannot be removed."""
        target = self.path(key)
        match = _TEMP_NAME.fullmatch(tmp_name)
        if match is None or match["target"] != target.name:
            raise DestinationError(f"refusing to delete {tmp_name!r} next to {target}: not a temporary file of that "
                                   "object")
        tmp = target.with_name(tmp_name)
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DestinationError(f"cannot delete the temporary file {tmp} ({exc.strerror or exc}); check the "
                                   "destination folder's permissions") from None
        return size
