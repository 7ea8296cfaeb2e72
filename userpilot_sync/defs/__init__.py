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
