"""Core fixtures: a sync job built from the demo YAML, temporary folders, a fixed clock; ``dagster dev``
for the suites that drive the UI's server (:func:`dagster_dev`, :class:`DagsterDev`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync_tests.fixtures_storage import free_port, listens_on

REPO = Path(__file__).resolve().parents[1]

#: A fixed "now" used by tests: the partition DAY is inside the 365-day window.
NOW = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc)
DAY = date(2026, 3, 9)
PARTITION = DAY.isoformat()


def make_job(tmp_path: Path, **overrides) -> SyncJob:
    """A demo sync job writing to ``tmp_path/exports`` (small volume, fast)."""
    data = {
        "name": "demo",
        "sync_id": "10001",
        "title": "Demo",
        "app_token": "NX-demo0001",
        "source": {"kind": "demo", "events_per_day": 3000, "seed": 7},
        "destination": {"kind": "local", "path": str(tmp_path / "exports"), "prefix": "userpilot_events"},
    }
    data.update(overrides)
    return SyncJob.model_validate(data)


@pytest.fixture
def demo_job(tmp_path: Path) -> SyncJob:
    return make_job(tmp_path)


@pytest.fixture
def staging_root(tmp_path: Path) -> Path:
    return tmp_path / "staging"


def run_sync(defs, instance, first: str, last: str | None = None, *, job_name: str = "demo_sync", **kwargs):
    """Run a sync job's asset job for one day (``first``) or a range of days (``first``..``last``).

    Makes sure the days exist as partitions first (the partition-window sensor does this in a
    deployment). Returns the execution result (``raise_on_error=False``).
    """
    import dagster as dg

    from userpilot_sync.defs.keys import SyncJobKeys
    from userpilot_sync.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, sync_window_partitions

    job_def = defs.resolve_job_def(job_name)
    sync_job = _sync_job_of(defs, job_name)
    sync_window_partitions(instance, SyncJobKeys(sync_job))
    tags = dict(kwargs.pop("tags", {}) or {})
    if last is None or last == first:
        return job_def.execute_in_process(partition_key=first, instance=instance, raise_on_error=False, tags=tags,
                                          **kwargs)
    tags.update({RANGE_START_TAG: first, RANGE_END_TAG: last})
    return job_def.execute_in_process(instance=instance, raise_on_error=False, tags=tags, **kwargs)


def _sync_job_of(defs, job_name: str):
    """The SyncJob behind ``<name>_sync`` (read from its source resource)."""
    name = job_name.removesuffix("_sync")
    resource = defs.resources[f"userpilot_source_{name}"]
    return resource.job


def demo_yaml(exports: Path) -> str:
    """The shipped demo sync job (``sync_jobs/demo.yaml``) writing to the local folder ``exports``."""
    return (REPO / "sync_jobs" / "demo.yaml").read_text().replace("path: exports", f"path: {exports}")


def project_environment(root: Path, jobs: dict[str, str]) -> dict[str, str]:
    """Environment for the project's processes (the CLI, ``dagster dev``) under ``root``: a fresh
    ``DAGSTER_HOME`` ``root/home`` (``deploy/dagster.yaml``), the sync-job files ``jobs`` (``{file
    name: YAML}``) in ``root/sync_jobs``, staging under ``root/staging``."""
    home = root / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
    folder = root / "sync_jobs"
    folder.mkdir()
    for name, text in jobs.items():
        (folder / name).write_text(text)
    return dict(os.environ, DAGSTER_HOME=str(home), USERPILOT_SYNC_JOBS_DIR=str(folder),
                USERPILOT_SYNC_STAGING_DIR=str(root / "staging"))


def cli_env(tmp_path: Path, events_per_day: int = 500) -> dict[str, str]:
    """Environment for running the project's commands in a subprocess (:func:`project_environment`):
    the shipped demo sync job writing to ``tmp_path/exports`` with ``events_per_day`` events."""
    # a few hundred events a day leave some event types empty on some days: normal here, so a WARN
    # (the shipped 5,000 events a day never do)
    demo = demo_yaml(tmp_path / "exports").replace("events_per_day: 5000", f"events_per_day: {events_per_day}")
    return project_environment(tmp_path, {"demo.yaml": demo + "checks: {empty_days: warn}\n"})


def check_evaluations(instance, key, name: str) -> dict:
    """The newest evaluation of check ``name`` of asset ``key`` per day (planned-but-not-evaluated
    records are skipped): ``{partition: AssetCheckEvaluation}``."""
    import dagster as dg

    records = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, name), limit=100)
    newest = {}
    for record in records:  # newest first
        data = record.event.dagster_event.event_specific_data if record.event else None
        if isinstance(data, dg.AssetCheckEvaluation):
            newest.setdefault(data.partition, data)
    return newest


def lock_holder(path: Path, seconds: int = 120):
    """Another process holding an exclusive ``flock`` on ``path`` (a day lock) until killed.

    Returns the ``subprocess.Popen`` once the lock is held; kill it to release the lock (the kernel
    releases the lock of a dead process).
    """
    import subprocess
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(int(sys.argv[2]))",
         str(path), str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# ---------------------------------------------------------------------------------------------- dagster dev
def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    """The ``data`` of one GraphQL request to the webserver at ``url``; fails on any GraphQL error."""
    import httpx

    response = httpx.post(url, json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


@dataclass
class DagsterDev:
    """``dagster dev`` (webserver, daemon, code server) on ``home``, driven over GraphQL."""

    root: Path
    env: dict
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    location: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    @property
    def log_path(self) -> Path:
        return self.root / "dagster_dev.log"

    def start(self) -> "DagsterDev":
        """Start ``dagster dev`` (its own process group; output in :attr:`log_path`). Use
        :func:`dagster_dev` where the server lives inside one block: it also waits for the code
        location and always stops it."""
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(self.port),
             "-w", "workspace.yaml"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def stop(self) -> None:
        """SIGTERM to the process group (webserver, daemon, code server, runs), SIGKILL after 30 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # also when dagster dev itself exited: its children
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return "--- tail of the dagster dev log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:  # pragma: no cover - diagnostics only
            return f"(no dagster dev log: {exc})"

    def gql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.url, query, variables)

    def wait(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s (last seen: {last!r})\n{self.log_tail()}")
            time.sleep(interval)

    def check_alive(self) -> None:
        """Raise AssertionError when the webserver's process has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"dagster dev exited ({self.proc.returncode})\n{self.log_tail()}")

    def check_port(self) -> None:
        """The webserver that answered is this dagster dev's, not one that took the port first."""
        assert listens_on(self.proc.pid, self.port), f"port {self.port} is another process's\n{self.log_tail()}"

    def wait_loaded(self, timeout: float = 180) -> None:
        import httpx

        def loaded():
            self.check_alive()
            try:
                data = self.gql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                                "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
            except (httpx.HTTPError, AssertionError, KeyError, ValueError):
                return None
            entries = data["workspaceOrError"]["locationEntries"]
            return entries[0] if entries and entries[0]["loadStatus"] == "LOADED" else None

        if self.location is None:
            entry = self.wait("the code location loading", loaded, timeout)
            self.check_port()
            assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
            self.location = entry["name"]

    def partition_keys(self, job_name: str) -> list[str]:
        dims = self.gql("""query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
            ... on AssetNode { partitionKeysByDimension { partitionKeys } } } }""",
                        {"key": {"path": [job_name, "raw_events"]}})["assetNodeOrError"]["partitionKeysByDimension"]
        return dims[0]["partitionKeys"] if dims else []

    def launch(self, job_name: str, pk: str) -> str:
        """Launch ``<job>_sync`` for day ``pk`` (queued; the daemon starts it). Returns the run id."""
        selector = {"repositoryLocationName": self.location, "repositoryName": "__repository__",
                    "jobName": f"{job_name}_sync"}
        launched = self.gql(
            """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }""",
            {"p": {"selector": selector,
                   "executionMetadata": {"tags": [{"key": "dagster/partition", "value": pk}]}}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def status(self, run_id: str) -> str:
        return self.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                        {"id": run_id})["runOrError"]["status"]

    def messages(self, run_id: str) -> list[str]:
        data = self.gql("""query($id: ID!) { logsForRun(runId: $id) { __typename
            ... on EventConnection { events { __typename ... on MessageEvent { message level } } } } }""",
                        {"id": run_id})["logsForRun"]
        return [e["message"] for e in data.get("events") or [] if e.get("message")]

    def sensor_ticks(self, sensor: str, limit: int = 10) -> list[dict]:
        """The newest ticks of ``sensor``: ``{"timestamp": epoch s, "skipReason": ...}``."""
        selector = {"repositoryLocationName": self.location, "repositoryName": "__repository__", "sensorName": sensor}
        data = self.gql("""query($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
            ... on Sensor { sensorState { ticks(limit: $n) { timestamp status skipReason } } } } }""",
                        {"s": selector, "n": limit})["sensorOrError"]
        return data["sensorState"]["ticks"] if data.get("sensorState") else []

    def wait_finished(self, run_id: str, timeout: float) -> str:
        return self.wait(f"run {run_id} finishing",
                         lambda: (s if (s := self.status(run_id)) in ("SUCCESS", "FAILURE", "CANCELED") else None),
                         timeout)


@contextlib.contextmanager
def dagster_dev(root: Path, env: dict, port: int | None = None, *, load_timeout: float = 180) -> Iterator[DagsterDev]:
    """``dagster dev -w workspace.yaml`` (webserver, daemon, code server) from the repository, in the
    environment ``env`` (its ``DAGSTER_HOME``, sync jobs and staging), on ``port`` (a free loopback
    port by default), its output in ``root/dagster_dev.log``. Yields it once the code location has
    loaded (:meth:`DagsterDev.wait_loaded`); the whole process group is stopped when the block ends,
    also when the start or the wait failed."""
    dev = DagsterDev(Path(root), env) if port is None else DagsterDev(Path(root), env, port=port)
    try:
        dev.start()
        dev.wait_loaded(load_timeout)
        yield dev
    finally:
        dev.stop()
