"""Helpers of the cluster suite (``test_cluster.py``): a real one-machine cluster and its GraphQL.

:func:`start_cluster` brings up what ``make cluster`` does (``userpilot_sync.cluster.trial``):
PostgreSQL in a folder of its own, Redis, two Celery workers with separate staging folders, the
daemon and the webserver, all on free loopback ports — with short intervals for tests (run queue
every second, run monitoring every 2 s, the run watchdog every 2 s). :class:`ClusterUI` drives the
webserver over GraphQL (the methods of ``fixtures_faults.DagsterDev``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from userpilot_sync.cluster.trial import CLUSTER_CONFIG, Cluster, Postgres, free_port
from userpilot_sync_tests.fixtures_faults import DagsterDev


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL server in a fresh /tmp folder on a free port, stopped and removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="userpilot_sync_pg_"))
    server = Postgres(folder, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def instance_config_for_tests(path: Path) -> Path:
    """``deploy/cluster/dagster.yaml`` with the intervals of a test: dequeue every second, run
    monitoring every 2 s (the rest is the deployment's)."""
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    config["run_monitoring"]["poll_interval_seconds"] = 2
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_cluster(root: Path, env: dict[str, str], workers: int = 2) -> Cluster:
    """A started cluster under ``root`` (PostgreSQL in a /tmp folder the ``postgres`` user can
    reach). Stop it with :func:`stop_cluster`."""
    pg_folder = Path(tempfile.mkdtemp(prefix="userpilot_sync_pg_"))
    cluster = Cluster(root, workers=workers, web_port=free_port(), pg_folder=pg_folder,
                      extra_env={"USERPILOT_SYNC_RECOVERY_INTERVAL_S": "2", **env})
    try:
        cluster.start(instance_config=instance_config_for_tests(root.parent / f"{root.name}-dagster.yaml"))
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    try:
        cluster.stop()
    finally:
        if cluster.pg_folder is not None:
            shutil.rmtree(cluster.pg_folder, ignore_errors=True)


def logs_tail(cluster: Cluster, chars: int = 2500) -> str:
    """The end of every process log of the cluster (for assertion messages)."""
    parts = []
    for log in sorted((cluster.root / "logs").glob("*.log")):
        parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


@dataclass
class ClusterUI(DagsterDev):
    """GraphQL on the cluster's webserver (started by the cluster, not by this object)."""

    cluster: Cluster | None = None

    def log_tail(self, chars: int = 2500) -> str:
        return logs_tail(self.cluster, chars) if self.cluster else ""

    def check_alive(self) -> None:
        if not self.cluster.services["webserver"].alive():
            raise AssertionError(f"the webserver exited\n{self.log_tail()}")

    def check_port(self) -> None:
        pass  # the cluster's webserver was started on a free port it bound itself

    def run(self, run_id: str) -> dict:
        """A run's status, tags, start/end (epoch s) and its step's start/end."""
        return self.gql("""query($id: ID!) { runOrError(runId: $id) { ... on Run { runId status startTime endTime
            tags { key value } stepStats { stepKey startTime endTime status } } } }""", {"id": run_id})["runOrError"]

    def runs(self, tags: dict[str, str] | None = None) -> list[dict]:
        flt = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        return self.gql("""query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status
            startTime endTime parentRunId tags { key value } stepStats { stepKey startTime endTime } } } } }""",
                        {"f": flt})["runsOrError"]["results"]

    def events(self, run_id: str) -> list[dict]:
        data = self.gql("""query($id: ID!) { logsForRun(runId: $id) { __typename
            ... on EventConnection { events { __typename ... on MessageEvent { message timestamp level } } } } }""",
                        {"id": run_id})["logsForRun"]
        return [e for e in data.get("events") or [] if e.get("message")]

    def day_assets(self, job_name: str) -> list[list[str]]:
        """Every partitioned asset of a sync job's day (the multi-asset cannot be subset)."""
        nodes = self.gql("{ assetNodes { assetKey { path } isPartitioned } }")["assetNodes"]
        return [n["assetKey"]["path"] for n in nodes if n["assetKey"]["path"][0] == job_name and n["isPartitioned"]]

    def launch_backfill(self, jobs: list[str], days: list[str], title: str) -> str:
        """An asset backfill of ``days`` over the day assets of ``jobs`` (sync jobs whose days are one
        partitions definition: in practice one sync job)."""
        self.wait(f"days {days} of {jobs} in the partitions", lambda: all(
            set(days) <= set(self.partition_keys(job)) for job in jobs), timeout=120)
        selection = [{"path": path} for job in jobs for path in self.day_assets(job)]
        launched = self.gql(
            """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
            {"p": {"partitionNames": days, "assetSelection": selection, "title": title}})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        return self.gql("""query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
            ... on PartitionBackfill { status error { message } runs { runId status } } } }""",
                        {"id": backfill_id})["partitionBackfillOrError"]

    def set_pool_limit(self, pool: str, limit: int) -> None:
        done = self.gql("""mutation($k: String!, $l: Int!) { setConcurrencyLimit(concurrencyKey: $k, limit: $l) }""",
                        {"k": pool, "l": limit})
        assert done["setConcurrencyLimit"] is True, done


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}
