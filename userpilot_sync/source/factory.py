"""Build the :class:`~userpilot_sync.source.base.EventSource` a sync job's ``source`` describes."""

from __future__ import annotations

from userpilot_sync.config.model import SyncJob
from userpilot_sync.source.base import EventSource


def build_source(job: SyncJob, *, api_key: str | None = None) -> EventSource:
    """The event source of ``job`` (demo generator, local files or the Bulk Data Export API).

    ``api_key`` (Export API only): the key to use; when None it is read from the environment
    variable ``source.api_key_env`` at extraction time (ApiKeyError if unset). The key is never
    logged or put into errors.
    """
    cfg = job.source
    if cfg.kind == "demo":
        from userpilot_sync.source.demo import DemoSource

        return DemoSource(job.app_token, events_per_day=cfg.events_per_day, seed=cfg.seed)
    if cfg.kind == "files":
        from userpilot_sync.source.files import FilesSource

        return FilesSource(cfg.path)
    if cfg.kind == "export_api":
        from userpilot_sync.source.export_api import ExportApiSource

        env = None if api_key is None else {cfg.api_key_env: api_key}
        return ExportApiSource.from_config(job, env=env)
    raise ValueError(f"sync job {job.name!r}: unknown source kind {cfg.kind!r}")
