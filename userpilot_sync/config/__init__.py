"""The sync-job model: YAML files -> validated :class:`SyncJob` objects (no Dagster here)."""

from userpilot_sync.config.model import (
    DemoSourceConfig,
    ExportApiSourceConfig,
    FilesSourceConfig,
    Filters,
    FormatSpec,
    GcsDestination,
    LocalDestination,
    S3Destination,
    SyncBack,
    SyncJob,
)
from userpilot_sync.config.loader import default_sync_jobs_dir, load_sync_job_file, load_sync_jobs

__all__ = [
    "DemoSourceConfig",
    "ExportApiSourceConfig",
    "FilesSourceConfig",
    "Filters",
    "FormatSpec",
    "GcsDestination",
    "LocalDestination",
    "S3Destination",
    "SyncBack",
    "SyncJob",
    "default_sync_jobs_dir",
    "load_sync_job_file",
    "load_sync_jobs",
]
