"""Runs whose process died: detected, marked failed, and their pool slots freed.

A run killed while it exports (kill -9, a crashed machine) stays "started" in the instance and
keeps its ``userpilot_export_<app token>`` pool slot: every later run of that app token would wait
for the slot for ever. Dagster's run monitoring cannot tell with the default run launcher (it has no
worker health check), and ``free_slots_after_run_end_seconds`` frees only slots of runs already
marked finished. So the export step records where it runs (run tag ``userpilot_sync/worker``:
``<run id>|<host>|<pid>|<process start time>`` — the run id, because a re-executed run inherits
its parent's tags, and the start time, because pids are reused), and :func:`recover_dead_runs` —
called by the CLI before it
launches runs and by the ``userpilot_run_recovery`` sensor every minute — marks a run failed when
its worker process on this host is gone, and frees the pool slots still held by runs that have
finished (failed, canceled, succeeded). Runs of other hosts are left alone (their own recovery
judges them).

Runs spread over machines (the ``cluster`` deployment: the instance in PostgreSQL, runs on Celery
workers) cannot be judged by pid from the daemon's machine. There the run's process opens a
session in the instance's database (first in the Celery worker's ``task_prerun`` hook, before
Dagster starts the run; again in the day step, for runs launched otherwise) before it tags itself (``locks.PostgresLockBackend.serve_run``:
``application_name`` = ``userpilot_sync run <run id>``, tag ``userpilot_sync/session: postgres``),
holds its day locks in that session, and keeps it until the process exits. The watchdog fails a
run in progress whose session is gone, wherever it ran: PostgreSQL ends the session of a killed
process at once (its kernel closes the socket) and of a vanished machine after TCP keepalives
give up (~25 s). The run's day locks are gone with the session; its pool slots are freed here.
The interval is ``USERPILOT_SYNC_RECOVERY_INTERVAL_S`` (seconds, default 60).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

import dagster as dg

from userpilot_sync.defs.instance import instance_postgres_url
from userpilot_sync.locks import PostgresLockBackend
from userpilot_sync.procs import process_alive
from userpilot_sync.procs import start_time as _start_time

WORKER_TAG = "userpilot_sync/worker"
#: Which worker ran the run: the Celery worker node (``worker1@host``) or the host name.
WORKER_NAME_TAG = "userpilot_sync/worker_name"
#: ``postgres`` when the run's process holds a session in the instance's database (cluster).
SESSION_TAG = "userpilot_sync/session"
SESSION_POSTGRES = "postgres"
RECOVERY_INTERVAL_ENV = "USERPILOT_SYNC_RECOVERY_INTERVAL_S"
_IN_PROGRESS = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
_FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def worker_name() -> str:
    """The Celery worker node whose task runs this process (``worker1@host``), else the host name."""
    if "celery" in sys.modules:  # only inside a Celery worker (CeleryRunLauncher)
        try:
            from celery import current_task

            hostname = current_task.request.hostname if current_task else None
            if hostname:
                return str(hostname)
        except Exception:  # not inside a task
            pass
    return socket.gethostname()


def worker_tags(run_id: str) -> dict[str, str]:
    """The tags naming this process as run ``run_id``'s worker (run id, host, pid, start time;
    the worker's name)."""
    pid = os.getpid()
    return {WORKER_TAG: f"{run_id}|{socket.gethostname()}|{pid}|{_start_time(pid) or ''}",
            WORKER_NAME_TAG: worker_name()}


@dataclass
class Recovery:
    """What :func:`recover_dead_runs` did: runs marked failed, runs whose slots were freed."""

    failed_runs: list[str] = field(default_factory=list)
    freed_slots_of: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.failed_runs:
            parts.append(f"marked failed (process gone): {', '.join(self.failed_runs)}")
        if self.freed_slots_of:
            parts.append(f"freed pool slots of finished runs: {', '.join(self.freed_slots_of)}")
        return "; ".join(parts) or "no dead runs, no stale pool slots"


def recover_dead_runs(instance: dg.DagsterInstance, pools: list[str] | None = None) -> Recovery:
    """Fail runs whose worker process is gone; free slots of finished runs.

    A run is judged by its session in the instance's database when it has one (cluster: any
    machine), else by its pid when it ran on this host. ``pools``: the pools whose slots are
    checked (default: every pool the instance knows).
    """
    recovery = Recovery()
    host = socket.gethostname()
    in_progress = instance.get_runs(filters=dg.RunsFilter(statuses=list(_IN_PROGRESS)))
    url = instance_postgres_url(instance)
    # read after the runs: a run tagged with a session opened it before it was tagged
    live_sessions = PostgresLockBackend(url).live_runs() if url and in_progress else None
    for run in in_progress:
        try:
            run_id, worker_host, pid_text, start_time = run.tags.get(WORKER_TAG, "").split("|")
            pid = int(pid_text)
        except ValueError:
            continue
        if run_id != run.run_id:  # inherited from a parent run: this run has not started its step yet
            continue
        where = f"pid {pid} on {worker_host}, worker {run.tags.get(WORKER_NAME_TAG, worker_host)}"
        if run.tags.get(SESSION_TAG) == SESSION_POSTGRES and live_sessions is not None:
            dead = run.run_id not in live_sessions
            how = "its session in the instance's database ended"
        elif worker_host == host:
            dead = not process_alive(pid, start_time or None)
            how = "the process is gone"
        else:
            continue  # another host's run without a session: its own host's recovery judges it
        if not dead:
            continue
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in _IN_PROGRESS:  # it finished meanwhile
            continue
        instance.report_run_failed(
            current, message=f"the run's process ({where}) died: {how} (killed, crashed or its machine is gone); "
                             f"userpilot_sync marked the run failed and freed its pool slots and day locks. Nothing "
                             f"it wrote is trusted: the day's manifest was not completed by this run; re-run the day.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovery.failed_runs.append(run.run_id)
    storage = instance.event_log_storage
    for pool in pools if pools is not None else sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        holders = info.active_run_ids | info.pending_run_ids | info.assigned_run_ids
        for run_id in sorted(holders):
            run = instance.get_run_by_id(run_id)
            if run is None or run.status in _FINISHED:
                storage.free_concurrency_slots_for_run(run_id)
                if run_id not in recovery.freed_slots_of and run_id not in recovery.failed_runs:
                    recovery.freed_slots_of.append(run_id)
    return recovery


def build_run_recovery_sensor() -> dg.SensorDefinition:
    """The project's sensor that applies :func:`recover_dead_runs` every minute."""

    interval = int(os.environ.get(RECOVERY_INTERVAL_ENV) or 60)

    @dg.sensor(
        name="userpilot_run_recovery", minimum_interval_seconds=interval, default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks runs failed whose process died (kill -9, crash) and frees pool slots still held by "
                    "finished runs, so an app token is never blocked by a dead run.",
    )
    def run_recovery(context: dg.SensorEvaluationContext):
        return dg.SkipReason(recover_dead_runs(context.instance).summary())

    return run_recovery
