"""Build the :class:`~userpilot_sync.source.base.EventSource` a sync job's ``source`` describes."""

from __future__ import annotations

from userpilot_sync.config.model import SyncJob
from userpilot_sync.source.base import EventSource


def build_source(job: SyncJob) -> EventSource:
    """The event source of ``job`` (demo generator, local files or the Bulk Data Export API)."""
    cfg = job.source
    if cfg.kind == "demo":
        from userpilot_sync.source.demo import DemoSource

        return DemoSource(job.app_token, events_per_day=cfg.events_per_day, seed=cfg.seed)
    if cfg.kind == "files":
        from userpilot_sync.source.files import FilesSource

        return FilesSource(cfg.path)
    if cfg.kind == "export_api":
        from userpilot_sync.source.export_api import ExportApiSource

        return ExportApiSource.from_config(job)
    raise ValueError(f"sync job {job.name!r}: unknown source kind {cfg.kind!r}")
