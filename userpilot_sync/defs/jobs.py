"""Jobs of a sync job: the day export (``<job>_sync``), the lookups refresh and the destination check.

``<job>_sync`` selects the whole day (raw events, every export, the manifest, their checks): run
for one partition, or for a range of days with the ``dagster/asset_partition_range_start`` /
``_end`` tags (backfills, the CLI). Every run the project launches carries the sync-job tag.
"""


import dagster as dg

from userpilot_sync.defs.failures import failure
from userpilot_sync.defs.keys import SYNC_JOB_TAG, SyncJobKeys
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
