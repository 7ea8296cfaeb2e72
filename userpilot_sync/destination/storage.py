"""Storage backends: where exports and manifests are written. Write-only by design.

Every backend implements :class:`Storage`: ``put_file`` (stream a local file to a key,
replacing an existing object), ``put_bytes`` (small objects: manifests, markers) and
``delete`` (only used when the sync job sets ``allow_deletes``). No backend reads, lists or
heads objects in the destination: any state the exporter needs lives in the Dagster instance
or in staging.

:class:`LocalStorage` writes into a folder with atomic renames, so a reader never sees a
half-written file. S3 and GCS backends live in ``s3.py`` and ``gcs.py``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Protocol

from userpilot_sync.errors import DestinationError


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
    """A local folder as the destination (``root``); writes are atomic renames."""

    kind = "local"

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def _replace(self, key: str, write) -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                write(tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
        except OSError as exc:
            raise DestinationError(f"cannot write {target} ({exc.strerror or exc}); check the destination folder's permissions and free space") from None

    def put_file(self, key: str, path: Path, *, content_type: str, content_encoding: str | None = None) -> None:
        self._replace(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        self._replace(key, lambda tmp: tmp.write_bytes(data))

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.exists():
            target.unlink()
