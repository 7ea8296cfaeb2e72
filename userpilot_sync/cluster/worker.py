"""The Celery app of a cluster worker: ``celery -A userpilot_sync.cluster.worker worker``.

It registers Dagster's run tasks (``dagster_celery.tasks``: ``execute_job``, ``resume_job``) on an
app built from the ``CeleryRunLauncher`` settings of the instance in ``$DAGSTER_HOME`` (broker,
result backend, ``config_source``), so a worker can never listen to another broker, or track task
states differently, than the launcher that sends it runs. Each task runs one whole Dagster run in
the worker's child process (``worker_max_tasks_per_child: 1`` in ``deploy/cluster/dagster.yaml``:
a fresh process per run, so nothing of one run — memory, a database session, day locks — outlives
it). The run's staging is local to the worker (``USERPILOT_SYNC_STAGING_DIR``).

Before Dagster starts a run, the worker's ``task_prerun`` hook (:func:`open_run_session`) opens the
child's session in the instance's PostgreSQL, named after the run, and tags the run with it
(``defs/recovery.py``): from the first moment the run is this worker's, a dead worker is told by
its missing session — also when it dies before the day step starts.

Raises ``RuntimeError`` at import when the instance's run launcher is not a ``CeleryRunLauncher``.
"""

from __future__ import annotations

import logging
from typing import Any

import dagster as dg
from celery.signals import task_prerun
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task

from userpilot_sync.defs.instance import instance_postgres_url
from userpilot_sync.defs.recovery import SESSION_POSTGRES, SESSION_TAG, worker_tags
from userpilot_sync.faults import pause_point
from userpilot_sync.locks import PostgresLockBackend

log = logging.getLogger(__name__)


def launcher_app_args() -> dict:
    """The Celery app arguments of the instance's run launcher (``CeleryRunLauncher.app_args()``)."""
    with dg.DagsterInstance.get() as instance:
        launcher = instance.run_launcher
        if not isinstance(launcher, CeleryRunLauncher):
            raise RuntimeError(
                f"the Dagster instance in $DAGSTER_HOME launches runs with {type(launcher).__name__}, not "
                f"dagster_celery's CeleryRunLauncher: a Celery worker would never receive a run. Point DAGSTER_HOME "
                f"at a home with deploy/cluster/dagster.yaml.")
        return launcher.app_args()


def run_id_of(task_kwargs: dict[str, Any] | None) -> str | None:
    """The run id in a dagster_celery run task's arguments (packed ``ExecuteRunArgs`` /
    ``ResumeRunArgs``: a JSON object whose run id is stored as ``pipeline_run_id``, Dagster's
    serialized name of ``run_id``), else None."""
    for name in ("execute_job_args_packed", "resume_job_args_packed"):
        packed = (task_kwargs or {}).get(name)
        if isinstance(packed, dict):
            for key in ("pipeline_run_id", "run_id"):
                if isinstance(packed.get(key), str):
                    return packed[key]
    return None


@task_prerun.connect
def open_run_session(task_id: str | None = None, task: Any = None, args: Any = None,
                     kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """Celery ``task_prerun``: open this child's session for the run and tag the run with it (worker,
    pid, session), before Dagster starts it. Never fails the task: a problem is logged, and the day
    step opens the session again."""
    run_id = run_id_of(kwargs)
    if run_id is None:
        return
    try:
        with dg.DagsterInstance.get() as instance:
            url = instance_postgres_url(instance)
            if url is None:
                return
            PostgresLockBackend(url).serve_run(run_id)  # before the tag says so
            tags = worker_tags(run_id)
            tags[SESSION_TAG] = SESSION_POSTGRES
            instance.add_run_tags(run_id, tags)
            run = instance.get_run_by_id(run_id)
    except Exception as exc:  # the run goes on; its day step opens the session itself
        log.warning("run %s: could not open its session before the run started: %s", run_id, exc)
        return
    pause_point("run_start", scope=run.job_name.removesuffix("_sync") if run else None)


app = make_app(app_args=launcher_app_args())
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
