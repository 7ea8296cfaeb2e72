"""Dagster resources: staging, each sync job's source (with its API key) and destination.

Secrets never live in sync-job files: the Export API key is the ``api_key`` field of the sync
job's :class:`SourceResource`, bound to ``dg.EnvVar(<source.api_key_env>)``, so Dagster reads it
from the environment when a run starts and never shows its value. Cloud credentials come from
dagster-aws' :class:`~dagster_aws.s3.S3Resource` (``aws``: profile, keys via ``dg.EnvVar`` or the
standard AWS chain, region) and dagster-gcp's :class:`~dagster_gcp.GCSResource` (``gcp``:
project, Application Default Credentials), nested in :class:`DestinationResource`; the storages
built from them stay write-only (``destination/s3.py``, ``destination/gcs.py``). All settings show
in the launchpad.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.factory import build_storage
from userpilot_sync.destination.journal import UploadJournal
from userpilot_sync.destination.storage import Storage
from pydantic import PrivateAttr

from userpilot_sync.locks import PARTITION_LOCK_WAIT_S, FileLockBackend, LockBackend, PostgresLockBackend, partition_locks
from userpilot_sync.partitions import parse_partition
from userpilot_sync.source.base import EventSource
from userpilot_sync.source.factory import build_source
from userpilot_sync.staging import remove_leftovers, remove_staged


class StagingResource(dg.ConfigurableResource):
    """Local staging of raw events (``root``, a folder) and the per-day locks kept under it.

    ``lock_wait_s``: how long a run waits (seconds) for another run of the same sync job and
    partition before it fails (nothing written). ``locks``: where the per-day locks live —
    ``auto`` (default): PostgreSQL advisory locks when the Dagster instance stores its runs in
    PostgreSQL (the ``cluster`` deployment: runs on several machines), else file locks under
    ``root`` (one machine); ``file`` or ``postgres`` to force one. :meth:`hold_days` takes a run's day locks and
    arranges for its staging to be removed; both are released by :meth:`release_days` or, at the
    latest, when Dagster tears the resource down at the end of the run — also when the step failed
    in an IO manager, where Dagster drops the step's generator without running its ``finally``.
    """

    root: str
    lock_wait_s: float = PARTITION_LOCK_WAIT_S
    locks: str = "auto"
    _held: contextlib.ExitStack | None = PrivateAttr(default=None)
    _backend: LockBackend | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path:
        return Path(self.root)

    def lock_backend(self, instance: dg.DagsterInstance | None = None) -> LockBackend:
        """The lock backend for runs of ``instance`` (see ``locks``); raises ValueError for an
        unknown ``locks`` value or ``postgres`` on an instance that does not store runs in PostgreSQL."""
        from userpilot_sync.defs.instance import instance_postgres_url

        if self.locks not in ("auto", "file", "postgres"):
            raise ValueError(f"userpilot_staging.locks is {self.locks!r}: use auto, file or postgres")
        url = instance_postgres_url(instance) if instance is not None and self.locks != "file" else None
        if self.locks == "postgres" and url is None:
            raise ValueError("userpilot_staging.locks is 'postgres' but the Dagster instance does not store its runs in "
                             "PostgreSQL (deploy/cluster/dagster.yaml does): use locks: auto or file, or the cluster "
                             "instance")
        return PostgresLockBackend(url) if url else FileLockBackend(self.path)

    def hold_days(self, job: SyncJob, days: list[str], *, owner: str, on_wait=None, log=None,
                  backend: LockBackend | None = None) -> None:
        """Lock ``days`` of ``job`` for run ``owner`` (ascending, bounded wait; LockTimeout), remove
        what crashed runs left in the job's staging (``log(message)`` is told each folder, its age
        and size), and arrange for the run's own staging to be removed (``keep_staging_days``)
        before the locks are released."""
        from userpilot_sync.defs.recovery import process_alive

        self.release_days()
        stack = contextlib.ExitStack()
        backend = backend or self.lock_backend()
        stack.enter_context(partition_locks(backend, job.name, days, owner=owner,
                                            wait_s=self.lock_wait_s, on_wait=on_wait))
        stack.callback(clean_staging, self.path, job, days, backend=backend, owner=owner)
        self._held = stack
        probes: list = []

        def day_free(day: str) -> bool:
            if day in days or job.keep_staging_days:  # ours (re-staged now), or kept on purpose
                return False
            handle = backend.try_acquire(job.name, day, f"{owner}:cleanup")
            if handle is not None:
                probes.append(handle)  # held until the folder is gone, so no run starts staging it
            return handle is not None

        try:
            for leftover in remove_leftovers(self.path, job.name, pid_alive=process_alive, day_free=day_free):
                if log is not None:
                    log(f"sync job {job.name!r}: removed staging a crashed run left behind: {leftover.path} "
                        f"({leftover.bytes:,} bytes, {leftover.age_s / 3600:.1f} h old)")
        finally:
            for handle in probes:
                backend.release(handle)

    def release_days(self) -> None:
        """Remove the held run's staging and release its day locks (no-op when nothing is held)."""
        stack, self._held = self._held, None
        if stack is not None:
            stack.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release_days()


def clean_staging(root: Path, job: SyncJob, days: list[str], *, backend: LockBackend, owner: str = "") -> None:
    """Remove a run's staged days (raw events are personal data), or — with ``keep_staging_days`` —
    the staged days older than that many days before the newest day of the run. A staged day of
    another run is removed only while its day lock is free (taken by ``owner`` for the removal, with
    ``backend``): a run that freed the app token's pool slot may still be preparing or uploading an
    older day."""
    keep = job.keep_staging_days
    if keep == 0:
        for pk in days:
            remove_staged(root, job.name, pk)
        return
    if not days:
        return
    cutoff = parse_partition(max(days)) - timedelta(days=keep)
    job_dir = Path(root) / job.name
    for folder in sorted(job_dir.glob("????-??-??")) if job_dir.is_dir() else []:
        try:
            stale = parse_partition(folder.name) < cutoff
        except ValueError:
            continue
        if not stale:
            continue
        if folder.name in days:  # held by this run
            remove_staged(root, job.name, folder.name)
            continue
        handle = backend.try_acquire(job.name, folder.name, f"{owner}:cleanup")
        if handle is None:  # another run is exporting that day: it removes its own staging
            continue
        try:
            remove_staged(root, job.name, folder.name)
        finally:
            backend.release(handle)


@lru_cache(maxsize=64)
def _parse_job(text: str) -> SyncJob:
    return SyncJob.model_validate_json(text)


class _SyncJobBound(dg.ConfigurableResource):
    """A resource bound to one sync job; ``sync_job`` is the job's settings as JSON (no secrets)."""

    sync_job: str

    @property
    def job(self) -> SyncJob:
        return _parse_job(self.sync_job)


def sync_job_json(job: SyncJob) -> str:
    """A sync job's settings as resource config (the launchpad shows them; no secret is in them)."""
    return json.dumps(job.model_dump(mode="json", exclude={"source_file"}), sort_keys=True)


class SourceResource(_SyncJobBound):
    """Where one sync job's raw events come from; ``api_key`` holds the Export API key.

    Bound to ``dg.EnvVar(source.api_key_env)`` for Export API sources (None for demo and files
    sources). The key is handed to the source's HTTP client only; it never reaches logs,
    metadata, manifests or presigned download hosts.
    """

    api_key: str | None = None

    def event_source(self) -> EventSource:
        """The :class:`~userpilot_sync.source.base.EventSource` of the sync job."""
        return build_source(self.job, api_key=self.api_key)


class DestinationResource(_SyncJobBound):
    """Where one sync job writes (write-only), with the cloud credentials of its kind.

    ``aws`` (dagster-aws ``S3Resource``): credentials and region for ``s3`` destinations, the
    standard AWS chain when its fields are unset. ``gcp`` (dagster-gcp ``GCSResource``): the
    project and Application Default Credentials for ``gcs`` destinations (a service-account file
    named by ``destination.credentials_file_env``, or ``STORAGE_EMULATOR_HOST`` in tests, take
    precedence). Raises DestinationError when a storage cannot be built (non-HTTPS endpoint,
    missing credentials).
    """

    aws: S3Resource
    gcp: GCSResource

    def storage(self, generations: dict[str, int] | None = None,
                journal: UploadJournal | None = None) -> Storage:
        """A storage for the sync job's destination; ``generations``: GCS preconditions;
        ``journal``: records pending local/S3 writes for ``clean_leftover_uploads`` (GCS: unused)."""
        job = self.job
        dest = job.destination
        if dest.kind == "s3":
            from userpilot_sync.destination.s3 import S3Storage

            return S3Storage.from_config(job, credentials_from=self.aws, journal=journal)
        if dest.kind == "gcs":
            from userpilot_sync.destination.gcs import GcsStorage

            if not dest.credentials_file_env and not os.environ.get("STORAGE_EMULATOR_HOST"):
                return GcsStorage.from_config(job, client=self.gcp.get_client(), generations=dict(generations or {}))
            return GcsStorage.from_config(job, generations=dict(generations or {}))
        return build_storage(job, generations=generations, journal=journal)


def source_resource(job: SyncJob) -> SourceResource:
    """The source resource of ``job``; the API key is ``dg.EnvVar(source.api_key_env)``."""
    if job.source.kind == "export_api":
        return SourceResource(sync_job=sync_job_json(job), api_key=dg.EnvVar(job.source.api_key_env))
    return SourceResource(sync_job=sync_job_json(job))


def destination_resource(job: SyncJob) -> DestinationResource:
    """The destination resource of ``job`` (credentials from the standard chains by default)."""
    dest = job.destination
    return DestinationResource(
        sync_job=sync_job_json(job),
        aws=S3Resource(region_name=getattr(dest, "region", None)),
        gcp=GCSResource(project=getattr(dest, "project", None)),
    )
