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
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import dagster as dg

from userpilot_sync.procs import process_alive
from userpilot_sync.procs import start_time as _start_time

WORKER_TAG = "userpilot_sync/worker"
_IN_PROGRESS = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
_FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def worker_tags(run_id: str) -> dict[str, str]:
    """The tag naming this process as run ``run_id``'s worker (run id, host, pid, start time)."""
    pid = os.getpid()
    return {WORKER_TAG: f"{run_id}|{socket.gethostname()}|{pid}|{_start_time(pid) or ''}"}


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
    """Fail this host's runs whose worker process is gone; free slots of finished runs.

    ``pools``: the pools whose slots are checked (default: every pool the instance knows).
    """
    recovery = Recovery()
    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=list(_IN_PROGRESS))):
        try:
            run_id, worker_host, pid_text, start_time = run.tags.get(WORKER_TAG, "").split("|")
            pid = int(pid_text)
        except ValueError:
            continue
        if run_id != run.run_id or worker_host != host:  # inherited from a parent run / another host
            continue
        if not process_alive(pid, start_time or None):
            instance.report_run_failed(
                run, message=f"the run's process (pid {pid} on {host}) is gone (killed or crashed); userpilot_sync "
                             f"marked the run failed and freed its pool slots. Nothing it wrote is trusted: the "
                             f"day's manifest was not completed by this run; re-run the day.")
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

    @dg.sensor(
        name="userpilot_run_recovery", minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks runs failed whose process died (kill -9, crash) and frees pool slots still held by "
                    "finished runs, so an app token is never blocked by a dead run.",
    )
    def run_recovery(context: dg.SensorEvaluationContext):
        return dg.SkipReason(recover_dead_runs(context.instance).summary())

    return run_recovery
