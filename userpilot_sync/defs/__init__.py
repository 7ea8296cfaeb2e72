"""Dagster definitions only: assets, checks, IO managers, schedules and sensors per sync job.

How the work is done lives in the plain-Python core (config, schema, source, staging, export,
destination); this package wires it to Dagster.
"""
