"""Object keys of exports and manifests; they depend only on sync job, partition, event type,
format and part number, so a re-export replaces the same objects.

``userpilot`` (default, Userpilot Data Sync's documented layout)::

    <prefix>/userpilot_datasync_<sync_id>_<app_token>/<YYYY-MM-DD>/<event_type>[_<part>].<ext>
    <prefix>/userpilot_datasync_<sync_id>_<app_token>/<YYYY-MM-DD>/_manifest.json

``hive`` (partition discovery in Athena, BigQuery, DuckDB)::

    <prefix>/<sync folder>/<event_type>/date=<YYYY-MM-DD>/part-<part>.<ext>
    <prefix>/<sync folder>/_manifests/date=<YYYY-MM-DD>/_manifest.json

Documented files (``all_users``, ``feature_tags_breakdown``, ...) take an event type's place;
per-tag/per-label files are ``<date>/track_feature_<escaped id>.<ext>`` (userpilot) and
``track_feature/tag=<escaped id>/date=<date>/part-<part>.<ext>`` (hive; labels:
``track_labeled_<id>`` and ``track_labeled/label=<id>/...``); see :meth:`Layout.documented_path`.

Part numbers are five digits from ``00000``; the userpilot layout adds ``_<part>`` only when a
day's export is split into several files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from userpilot_sync.config.model import SyncJob

MANIFEST_NAME = "_manifest.json"


@dataclass(frozen=True)
class Layout:
    """Key builder for one sync job's destination."""

    kind: str  # "userpilot" | "hive"
    prefix: str
    sync_folder: str

    @property
    def root(self) -> str:
        """Key prefix of the sync folder (no trailing slash)."""
        prefix = self.prefix.strip("/")
        return f"{prefix}/{self.sync_folder}" if prefix else self.sync_folder

    def key(self, relative_path: str) -> str:
        """Full object key of a path relative to the sync folder."""
        return f"{self.root}/{relative_path}"

    def data_path(self, partition: str, event_type: str, extension: str, part: int, parts: int) -> str:
        """Path (relative to the sync folder) of one data file."""
        if self.kind == "hive":
            return f"{event_type}/date={partition}/part-{part:05d}.{extension}"
        suffix = f"_{part:05d}" if parts > 1 else ""
        return f"{partition}/{event_type}{suffix}.{extension}"

    def documented_path(self, partition: str, name: str, extension: str, part: int, parts: int,
                        split: tuple[str, str] | None = None, escaped_id: str | None = None) -> str:
        """Path of a documented file (``all_users``, ...) or, with ``split`` = (base, key) and
        ``escaped_id``, of one per-tag/per-label file::

            userpilot: <date>/all_users.<ext>          <date>/track_feature_<escaped id>.<ext>
            hive:      all_users/date=<date>/part-00000.<ext>
                       track_feature/tag=<escaped id>/date=<date>/part-00000.<ext>
        """
        if split is None:
            return self.data_path(partition, name, extension, part, parts)
        base, key = split
        if self.kind == "hive":
            return f"{base}/{key}={escaped_id}/date={partition}/part-{part:05d}.{extension}"
        suffix = f"_{part:05d}" if parts > 1 else ""
        return f"{partition}/{base}_{escaped_id}{suffix}.{extension}"

    def manifest_path(self, partition: str) -> str:
        """Path (relative to the sync folder) of a partition's manifest."""
        if self.kind == "hive":
            return f"_manifests/date={partition}/{MANIFEST_NAME}"
        return f"{partition}/{MANIFEST_NAME}"

    def lookups_path(self, kind: str) -> str:
        """Path (relative to the sync folder) of one lookup table (flows, checklists, ...)."""
        return f"lookups/{kind}.parquet"


def layout_for(job: "SyncJob") -> Layout:
    """The object-key layout of a sync job's destination (its ``layout``, prefix and sync folder)."""
    return Layout(kind=job.layout, prefix=job.destination.prefix, sync_folder=job.sync_folder)
