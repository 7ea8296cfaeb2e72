"""Dagster definitions only: assets, checks, IO managers, schedules and sensors per sync job.

How the work is done lives in the plain-Python core (config, schema, source, staging, export,
destination); this package wires it to Dagster.
"""

import warnings

import dagster as _dg

# backfill_policy and automation conditions are marked beta in Dagster 1.13; the project pins
# Dagster and tests them, so the warning is noise for users of the UI and the CLI.
warnings.filterwarnings("ignore", category=_dg.BetaWarning)
warnings.filterwarnings("ignore", category=_dg.PreviewWarning)

# A run waiting for its app token's pool slot sleeps between polls instead of spinning a core
# (Dagster 1.13 busy-waits there; see userpilot_sync/defs/pool_wait.py).
from userpilot_sync.defs import pool_wait as _pool_wait  # noqa: E402

_pool_wait.apply()

# With SQLite instance storage, a run keeps one SQLAlchemy engine per event-log file instead of
# creating one per stored event (see userpilot_sync/defs/sqlite_engines.py).
from userpilot_sync.defs import sqlite_engines as _sqlite_engines  # noqa: E402

_sqlite_engines.apply()
