"""Names of one sync job's Dagster objects, in one place (asset and check keys, jobs, resources).

Every builder in ``defs/`` takes a :class:`SyncJobKeys`, so the names the UI shows, the ledger
reads and the tests assert are spelled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from userpilot_sync.config.model import SyncJob

#: Run tag naming the sync job (set on every run the project launches).
SYNC_JOB_TAG = "userpilot_sync/sync_job"
#: Run tag naming what launched a run (daily, weekly, sync_back, initial_backfill, cli).
TRIGGER_TAG = "userpilot_sync/trigger"
#: Run tag set when an export step fails: the failure's first line (sync job, partition, cause).
FAILURE_TAG = "userpilot_sync/failure"
#: Resource keys shared by every sync job.
STAGING_RESOURCE_KEY = "userpilot_staging"

# Check names (per day; see defs/checks.py).
CHECK_NOT_UNEXPECTEDLY_EMPTY = "not_unexpectedly_empty"
CHECK_KNOWN_VALUES = "known_values"
CHECK_DAY_EXPORTED = "day_exported"
CHECK_EXPECTED_VOLUME = "expected_volume"
CHECK_SNAPSHOT_CURRENT = "snapshot_current"
#: Run tag of the range runs that recompute stale snapshots (value: the first stale day).
SNAPSHOT_REFRESH_TAG = "userpilot_sync/snapshot_refresh"


@dataclass(frozen=True)
class SyncJobKeys:
    """Keys and names of one sync job's assets, checks, jobs, schedules and resources."""

    job: SyncJob

    @property
    def name(self) -> str:
        return self.job.name

    # ------------------------------------------------------------------ assets
    @property
    def raw_events(self) -> dg.AssetKey:
        return dg.AssetKey([self.name, "raw_events"])

    def export(self, event_type: str) -> dg.AssetKey:
        return dg.AssetKey([self.name, event_type])

    @property
    def exports(self) -> dict[str, dg.AssetKey]:
        """Export asset keys by event type, in the sync job's event-type order."""
        return {et: self.export(et) for et in self.job.event_types}

    def documented(self, name: str) -> dg.AssetKey:
        """A documented file's asset (``<job>/all_users``, ``<job>/feature_tags_breakdown``, ...)."""
        return dg.AssetKey([self.name, name])

    @property
    def documented_files(self) -> dict[str, dg.AssetKey]:
        """Documented-file asset keys by name, in the sync job's ``userpilot_files`` order."""
        return {name: self.documented(name) for name in self.job.userpilot_files}

    @property
    def manifest(self) -> dg.AssetKey:
        return dg.AssetKey([self.name, "manifest"])

    @property
    def lookups(self) -> dg.AssetKey:
        return dg.AssetKey([self.name, "lookups"])

    @property
    def legacy_lookups(self) -> dg.AssetKey:
        """The lookups asset's key before it was renamed (instances written by older versions)."""
        return dg.AssetKey([self.name, "definitions"])

    @property
    def day_assets(self) -> list[dg.AssetKey]:
        """Every asset of one exported day: raw events, each export, each documented file, the manifest."""
        return [self.raw_events, *self.exports.values(), *self.documented_files.values(), self.manifest]

    @property
    def destination_assets(self) -> list[dg.AssetKey]:
        """Assets whose materializations record the destination fingerprint (newest first wins)."""
        return [self.manifest, *self.exports.values(), self.lookups, self.legacy_lookups]

    # ------------------------------------------------------------------ groups, jobs, schedules
    @property
    def group(self) -> str:
        return self.name

    @property
    def lookups_group(self) -> str:
        """The lookups live in their own group, so a day's "Materialize all" does not include them."""
        return f"{self.name}_lookups"

    @property
    def partitions_name(self) -> str:
        """Name of the sync job's dynamic partitions (UTC days of the 365-day window)."""
        return f"userpilot_days_{self.name}"

    @property
    def sync_job_name(self) -> str:
        return f"{self.name}_sync"

    @property
    def lookups_job_name(self) -> str:
        return f"{self.name}_lookups_refresh"

    @property
    def check_destination_job_name(self) -> str:
        return f"{self.name}_check_destination"

    @property
    def preview_job_name(self) -> str:
        """The dry-run preview of one day (``preview.py``): writes nothing to the destination."""
        return f"{self.name}_preview"

    # ------------------------------------------------------------------ resources
    @property
    def destination_resource(self) -> str:
        return f"userpilot_destination_{self.name}"

    @property
    def source_resource(self) -> str:
        return f"userpilot_source_{self.name}"

    @property
    def export_io_manager(self) -> str:
        return f"userpilot_export_io_manager_{self.name}"

    @property
    def manifest_io_manager(self) -> str:
        return f"userpilot_manifest_io_manager_{self.name}"

    @property
    def documented_io_manager(self) -> str:
        return f"userpilot_documented_io_manager_{self.name}"

    @property
    def snapshot_sensor_name(self) -> str:
        return f"userpilot_snapshots_{self.name}"

    @property
    def lookups_io_manager(self) -> str:
        return f"userpilot_lookups_io_manager_{self.name}"

    def run_tags(self, trigger: str) -> dict[str, str]:
        """Tags of a run the project launches for this sync job."""
        return {SYNC_JOB_TAG: self.name, TRIGGER_TAG: trigger}
