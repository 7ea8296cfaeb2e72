"""Object keys of exports and manifests; they depend only on sync job, partition, event type,
format and part number, so a re-export replaces the same objects.

``userpilot`` (default, Userpilot Data Sync's documented layout)::

    <prefix>/userpilot_datasync_<sync_id>_<app_token>/<YYYY-MM-DD>/<event_type>[_<part>].<ext>
    <prefix>/userpilot_datasync_<sync_id>_<app_token>/<YYYY-MM-DD>/_manifest.json

``hive`` (one table folder per format and event type: partition discovery in Spark, pyarrow,
polars, DuckDB, Athena, BigQuery, Snowflake)::

    <prefix>/<sync folder>/<ext>/<event_type>/date=<YYYY-MM-DD>/part-<part>.<ext>
    <prefix>/<sync folder>/_manifests/date=<YYYY-MM-DD>/_manifest.json

``<ext>`` is the file extension of the format (``parquet``, ``ndjson``, ``ndjson.gz``, ``csv``,
``csv.gz``, ``avro``), so a table folder (``<ext>/<event_type>/``) holds files of one format and
compression only, and a reader pointed at it needs no glob or file filter. Until version 2 of the
hive layout (:data:`HIVE_LAYOUT_VERSION`) every format shared ``<event_type>/date=<D>/``
(:func:`legacy_hive_data_path`); those keys never equal a current key, so a re-export of such a day
lists every old file as superseded (``destination/superseded.py``).

Documented files (``all_users``, ``feature_tags_breakdown``, ...) take an event type's place;
per-tag/per-label files are ``<date>/track_feature_<escaped id>.<ext>`` (userpilot) and
``<ext>/track_feature_per_tag/tag=<escaped id>/date=<date>/part-<part>.<ext>`` (hive; labels:
``track_labeled_<id>`` and ``<ext>/track_labeled_per_label/label=<id>/...``): their own table,
never a subfolder of the ``track_feature`` table; see :meth:`Layout.documented_path`.

Part numbers are five digits from ``00000``; the userpilot layout adds ``_<part>`` only when a
day's export is split into several files. An export with no rows has no file at all
(``formats.PartsWriter``): the manifest accounts for it (``status: empty``, ``rows: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from userpilot_sync.config.model import SyncJob

MANIFEST_NAME = "_manifest.json"
#: Version of the hive key scheme: 2 = a table folder per format (``<ext>/<event_type>/date=...``).
HIVE_LAYOUT_VERSION = 2


def legacy_hive_data_path(partition: str, name: str, extension: str, part: int) -> str:
    """Path of a data file in the hive layout before version 2 (every format in one folder):
    ``<name>/date=<partition>/part-<part>.<ext>``. Kept to describe (and test) what older exports
    wrote; nothing writes it."""
    return f"{name}/date={partition}/part-{part:05d}.{extension}"


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
        """Path (relative to the sync folder) of one data file: ``<partition>/<event_type>[_<part>].<ext>``
        (userpilot) or ``<ext>/<event_type>/date=<partition>/part-<part>.<ext>`` (hive).
        ``extension`` is the format's (``FormatSpec.extension``: ``parquet``, ``ndjson.gz``, ...);
        ``part`` counts from 0 of ``parts``."""
        if self.kind == "hive":
            return f"{extension}/{event_type}/date={partition}/part-{part:05d}.{extension}"
        suffix = f"_{part:05d}" if parts > 1 else ""
        return f"{partition}/{event_type}{suffix}.{extension}"

    def documented_path(self, partition: str, name: str, extension: str, part: int, parts: int,
                        split: tuple[str, str] | None = None, escaped_id: str | None = None) -> str:
        """Path of a documented file (``all_users``, ...) or, with ``split`` = (base, key) and
        ``escaped_id``, of one per-tag/per-label file::

            userpilot: <date>/all_users.<ext>          <date>/track_feature_<escaped id>.<ext>
            hive:      <ext>/all_users/date=<date>/part-00000.<ext>
                       <ext>/track_feature_per_tag/tag=<escaped id>/date=<date>/part-00000.<ext>

        (hive: ``name`` is the table folder, so per-tag files are a table of their own, partitioned
        by ``tag`` and ``date``, beside — not inside — the ``track_feature`` table.)
        """
        if split is None:
            return self.data_path(partition, name, extension, part, parts)
        base, key = split
        if self.kind == "hive":
            return f"{extension}/{name}/{key}={escaped_id}/date={partition}/part-{part:05d}.{extension}"
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
