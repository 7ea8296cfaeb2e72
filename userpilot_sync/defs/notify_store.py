"""The notifier's dedupe store in the Dagster instance: its key-value storage.

``instance.run_storage.get_cursor_values(keys)`` / ``set_cursor_values(pairs)`` (the ``kvs`` table
of the run storage, the one daemons keep their cursors in; any storage backend: SQLite, Postgres,
MySQL) hold one row per key. Keys are hashed to a fixed 57 characters: MySQL's unique index on
``kvs.key`` covers only the first 64. The table has no delete, so a cleared key keeps an empty
value (read back as absent). ``set_cursor_values`` is called with one pair at a time: with
several pairs where only some exist, Dagster 1.13's SQL storage updates the existing ones and
inserts none of the others.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

#: Prefix of the hashed keys in the instance's key-value storage.
KV_PREFIX = "userpilot_notify:"


class DagsterKVDedupe:
    """A :class:`userpilot_sync.notify.DedupeStore` in the Dagster instance's key-value storage."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._storage = instance.run_storage

    @staticmethod
    def storage_key(key: str) -> str:
        return KV_PREFIX + hashlib.sha1(key.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        k = self.storage_key(key)
        raw = self._storage.get_cursor_values({k}).get(k)
        if not raw:
            return None
        try:
            return json.loads(raw)["value"]
        except (ValueError, KeyError, TypeError):
            return None

    def set(self, key: str, value: str | None) -> None:
        # the original key is kept next to the value, so the row can be read by a person
        stored = "" if value is None else json.dumps({"key": key, "value": value})
        self._storage.set_cursor_values({self.storage_key(key): stored})
