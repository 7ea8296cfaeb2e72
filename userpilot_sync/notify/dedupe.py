"""Where the notifier remembers which notices it has sent: a key -> value store.

:class:`DedupeStore` is the interface (``get``/``set`` of text values; ``set(key, None)`` clears
a key). Implementations here need no Dagster: :class:`MemoryDedupe` (tests, one process) and
:class:`FileDedupe` (a JSON file, safe for several processes on one machine). In Dagster the store
is the instance's key-value storage: ``userpilot_sync.defs.notify_store.DagsterKVDedupe``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable


@runtime_checkable
class DedupeStore(Protocol):
    """A key -> text store. ``get`` returns None for an absent (or cleared) key."""

    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str | None) -> None:
        """Store ``value`` under ``key``; ``None`` clears the key."""
        ...


class MemoryDedupe:
    """A :class:`DedupeStore` in a dict (one process; forgotten when it ends)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._values.get(key)

    def set(self, key: str, value: str | None) -> None:
        with self._lock:
            if value is None:
                self._values.pop(key, None)
            else:
                self._values[key] = value

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._values)


class FileDedupe:
    """A :class:`DedupeStore` in one JSON file (``path``), guarded by an OS file lock (``<path>.lock``).

    Every ``set`` rewrites the file atomically (temp file + rename), so a crash never leaves it
    half written; a file that cannot be read as JSON is treated as empty (notices may repeat: at
    least once).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        with self._locked():
            return self._read().get(key)

    def set(self, key: str, value: str | None) -> None:
        with self._locked():
            data = self._read()
            if value is None:
                if key not in data:
                    return
                data.pop(key)
            else:
                data[key] = value
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
