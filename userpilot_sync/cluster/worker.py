"""The Celery app of a cluster worker: ``celery -A userpilot_sync.cluster.worker worker``.

It registers Dagster's run tasks (``dagster_celery.tasks``: ``execute_job``, ``resume_job``) on an
app built from the ``CeleryRunLauncher`` settings of the instance in ``$DAGSTER_HOME`` (broker,
result backend, ``config_source``), so a worker can never listen to another broker, or track task
states differently, than the launcher that sends it runs. Each task runs one whole Dagster run in
the worker's child process (``worker_max_tasks_per_child: 1`` in ``deploy/cluster/dagster.yaml``:
a fresh process per run, so nothing of one run — memory, a database session, day locks — outlives
it). The run's staging is local to the worker (``USERPILOT_SYNC_STAGING_DIR``).

Raises ``RuntimeError`` at import when the instance's run launcher is not a ``CeleryRunLauncher``.
"""

from __future__ import annotations

import dagster as dg
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task


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


app = make_app(app_args=launcher_app_args())
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
