"""Entry point of the Dagster code location: every sync job in sync_jobs/ (or $USERPILOT_SYNC_JOBS_DIR)."""

import dagster as dg

from userpilot_sync.config.loader import load_sync_jobs
from userpilot_sync.defs.project import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_sync_jobs())
