"""Jobs of a sync job: the day export (``<job>_sync``), the lookups refresh, the destination check and
the dry-run preview of a day (``<job>_preview``).

``<job>_sync`` selects the whole day (raw events, every export, the manifest, their checks): run
for one partition, or for a range of days with the ``dagster/asset_partition_range_start`` /
``_end`` tags (backfills, the CLI). Every run the project launches carries the sync-job tag.
"""


import dagster as dg
from pydantic import Field

from userpilot_sync.defs.failures import failure
from userpilot_sync.defs.keys import STAGING_RESOURCE_KEY, SYNC_JOB_TAG, SyncJobKeys
from userpilot_sync.defs.ledger import Ledger
from userpilot_sync.defs.resources import DestinationResource
from userpilot_sync.errors import DestinationError


def build_sync_job(keys: SyncJobKeys):
    """The asset job exporting whole days of the sync job."""
    return dg.define_asset_job(
        name=keys.sync_job_name,
        selection=dg.AssetSelection.assets(*keys.day_assets),
        description=f"Export UTC days of sync job {keys.name!r}: raw events, every event type, manifest.",
        tags={SYNC_JOB_TAG: keys.name},
    )


def build_lookups_job(keys: SyncJobKeys):
    return dg.define_asset_job(
        name=keys.lookups_job_name,
        selection=dg.AssetSelection.assets(keys.lookups),
        description=f"Refresh the lookups of sync job {keys.name!r}.",
        tags={SYNC_JOB_TAG: keys.name},
    )


def build_check_destination_job(keys: SyncJobKeys) -> dg.JobDefinition:
    """Writes one marker object with the sync's own permissions and reports what failed."""
    job = keys.job

    @dg.op(
        name=f"{job.name}_check_destination_op",
        description=f"Uploads one small marker object to {job.name!r}'s destination with the sync's own permissions.",
        required_resource_keys={keys.destination_resource},
    )
    def check_destination_op(context: dg.OpExecutionContext) -> dg.Nothing:
        from userpilot_sync.destination.check import check_destination

        if not job.enabled:
            raise failure(job.name, None, "the sync job is disabled: the destination check writes nothing "
                                          "(set enabled: true to check it)")
        try:
            Ledger(context.instance, keys).check_destination_unchanged()
            destination: DestinationResource = getattr(context.resources, keys.destination_resource)
            result = check_destination(job, destination.storage())
        except DestinationError as exc:
            raise failure(job.name, None, str(exc)) from None
        context.add_output_metadata({"uri": result.uri, "steps": dg.MetadataValue.json(result.steps)})
        if not result.ok:
            raise failure(job.name, None, result.message, steps=dg.MetadataValue.json(result.steps))
        context.log.info(result.message)

    @dg.job(
        name=keys.check_destination_job_name,
        description=f"Verify {job.name!r}'s destination before the first sync: write one marker object, report what failed.",
        tags={SYNC_JOB_TAG: job.name},
    )
    def check_destination_job():
        check_destination_op()

    return check_destination_job


class PreviewConfig(dg.Config):
    """Which day ``<job>_preview`` previews, and how many rows per file it shows."""

    partition: str = Field(default="", description="UTC day YYYY-MM-DD (empty: yesterday, the newest day of the window)")
    sample_rows: int = Field(default=3, ge=0, le=100, description="rows shown per file")


def build_preview_job(keys: SyncJobKeys) -> dg.JobDefinition:
    """``<job>_preview``: the dry run of one day (``userpilot_sync/preview.py``). Its op holds the app
    token's pool slot like the export step, reads the source and the ledger (records no fact in it), and
    has no destination resource at all; the preview document is its output metadata ``preview``."""
    job = keys.job

    @dg.op(
        name=f"{keys.preview_job_name}_op",
        description=f"Extracts one day of {job.name!r} and shows what its export would write; writes nothing.",
        required_resource_keys={STAGING_RESOURCE_KEY, keys.source_resource},
        pool=job.pool,
    )
    def preview_op(context: dg.OpExecutionContext, config: PreviewConfig) -> dg.Nothing:
        from userpilot_sync.defs.ledger import destination_fingerprint
        from userpilot_sync.errors import UserpilotSyncError
        from userpilot_sync.partitions import last_complete_days, parse_partition
        from userpilot_sync.preview import EarlierExports, preview_day, render
        from userpilot_sync.staging import temp_name

        from userpilot_sync.defs.recovery import worker_tags

        context.instance.add_run_tags(context.run_id, worker_tags(context.run_id))  # recovery tells a dead preview
        pk = config.partition or last_complete_days(1)[0].isoformat()
        try:
            pk = parse_partition(pk).isoformat()
            ledger = Ledger(context.instance, keys)  # read only: what earlier exports of the day wrote
            earlier = EarlierExports(paths=ledger.earlier_paths_by_day([pk])[pk],
                                     started=pk in ledger.days_started_before([pk], run_id=context.run_id),
                                     previous_manifest=ledger.previous_manifests([pk]).get(pk),
                                     recorded_fingerprint=ledger.recorded_fingerprint(),
                                     fingerprint=destination_fingerprint(job))
            staging = getattr(context.resources, STAGING_RESOURCE_KEY)
            source = getattr(context.resources, keys.source_resource)
            doc = preview_day(job, pk, staging.path / job.name / temp_name(".work"), state_root=staging.path,
                              source=source.event_source(), run_id=context.run_id, earlier=earlier,
                              sample_rows=config.sample_rows)
        except (UserpilotSyncError, ValueError) as exc:
            raise failure(job.name, pk, str(exc)) from None
        context.add_output_metadata({
            "preview": dg.MetadataValue.json(doc), "keys": dg.MetadataValue.json(doc["keys"]),
            "rows": dg.MetadataValue.json({et: e["rows"] for et, e in doc["event_types"].items()}),
            "manifest": dg.MetadataValue.json(doc["manifest"]["document"]),
        })
        context.log.info(render(doc))

    @dg.job(
        name=keys.preview_job_name,
        description=f"Dry run of one day of {job.name!r}: every object key, rows per event type, sample rows and "
                    f"the manifest its export would write. Writes nothing to the destination; works on a disabled "
                    f"sync job.",
        tags={SYNC_JOB_TAG: job.name},
    )
    def preview_job():
        preview_op()

    return preview_job
