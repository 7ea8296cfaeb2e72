"""The ``cluster`` deployment: runs spread over Celery workers, the instance in PostgreSQL.

* :mod:`userpilot_sync.cluster.worker` — the Celery app a worker runs
  (``celery -A userpilot_sync.cluster.worker worker``): Dagster's own run tasks
  (``dagster_celery``), configured from the instance's ``CeleryRunLauncher`` settings so the
  worker and the launcher always agree on broker, result backend and task settings.
* :mod:`userpilot_sync.cluster.trial` — ``make cluster`` / ``make cluster-stop``: the whole shape
  on one machine for a trial (PostgreSQL in a local folder, Redis, two workers with separate
  staging folders, webserver, daemon). Production runs the same processes on several machines
  (``docs/deploy.md``).
"""
