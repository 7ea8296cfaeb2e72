"""What a user does in the UI: dagster dev (webserver + daemon) on loopback, driven over GraphQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from userpilot_sync.partitions import last_complete_days

REPO = Path(__file__).resolve().parents[1]
PK = last_complete_days(1)[0].isoformat()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    response = httpx.post(url, json={"query": query, "variables": variables or {}}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    jobs = root / "sync_jobs"
    jobs.mkdir()
    demo = (REPO / "sync_jobs" / "demo.yaml").read_text().replace("path: exports", f"path: {root / 'exports'}")
    (jobs / "demo.yaml").write_text(demo)
    port = _free_port()
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        USERPILOT_SYNC_JOBS_DIR=str(jobs),
        USERPILOT_SYNC_STAGING_DIR=str(root / "staging"),
    )
    log = open(root / "dagster_dev.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/graphql"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited: {(root / 'dagster_dev.log').read_text()[-3000:]}")
            try:
                data = _gql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                                 "locationOrLoadError { __typename } } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", entries
                    break
            except (httpx.HTTPError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the code location did not load within 180 s")
            time.sleep(1)
        yield {"url": url, "location": entries[0]["name"], "root": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.integration
def test_ui_lists_assets_and_materializes_a_partition(dagster_dev):
    url = dagster_dev["url"]
    nodes = _gql(url, "{ assetNodes { assetKey { path } groupName isPartitioned } }")["assetNodes"]
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert {"demo/raw_events", "demo/track", "demo/interaction", "demo/manifest", "demo/definitions"} <= keys
    assert all(n["groupName"] == "demo" for n in nodes)
    assert all(n["isPartitioned"] for n in nodes if n["assetKey"]["path"][-1] != "definitions")

    schedules = _gql(
        url,
        """query($sel: RepositorySelector!) { schedulesOrError(repositorySelector: $sel) {
             ... on Schedules { results { name cronSchedule scheduleState { status } } } } }""",
        {"sel": {"repositoryLocationName": dagster_dev["location"], "repositoryName": "__repository__"}},
    )["schedulesOrError"]["results"]
    assert {(s["name"], s["cronSchedule"], s["scheduleState"]["status"]) for s in schedules} == {
        ("demo_daily_sync", "0 3 * * *", "STOPPED"),
        ("demo_definitions_refresh", "0 3 * * *", "STOPPED"),
    }

    sensors = _gql(
        url,
        """query($sel: RepositorySelector!) { sensorsOrError(repositorySelector: $sel) {
             ... on Sensors { results { name sensorState { status } } } } }""",
        {"sel": {"repositoryLocationName": dagster_dev["location"], "repositoryName": "__repository__"}},
    )["sensorsOrError"]["results"]
    assert {(s["name"], s["sensorState"]["status"]) for s in sensors} == {("userpilot_manifest_automation", "RUNNING")}

    launched = _gql(
        url,
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
        {
            "p": {
                "selector": {
                    "repositoryLocationName": dagster_dev["location"],
                    "repositoryName": "__repository__",
                    "jobName": "demo_sync",
                },
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": PK}]},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = _gql(url, 'query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }', {"id": run_id})[
            "runOrError"
        ]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", (dagster_dev["root"] / "dagster_dev.log").read_text()[-4000:]

    manifest = dagster_dev["root"] / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001" / PK / "_manifest.json"
    doc = json.loads(manifest.read_text())
    assert doc["run_id"] == run_id and len(doc["files"]) == 7
    assert sum(doc["event_types"].values()) == 5000

    mats = _gql(
        url,
        """query($key: AssetKeyInput!, $pk: [String!]) { assetOrError(assetKey: $key) { ... on Asset {
             assetMaterializations(partitions: $pk, limit: 1) { runId partition metadataEntries { label } } } } }""",
        {"key": {"path": ["demo", "track"]}, "pk": [PK]},
    )["assetOrError"]["assetMaterializations"]
    assert mats[0]["runId"] == run_id and mats[0]["partition"] == PK
    labels = {m["label"] for m in mats[0]["metadataEntries"]}
    assert {"dagster/row_count", "dagster/uri", "dagster/column_schema", "bytes"} <= labels


def _launch_and_wait(dagster_dev, selector_extra: dict, tags: list[dict]) -> str:
    url = dagster_dev["url"]
    launched = _gql(
        url,
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
        {"p": {"selector": {"repositoryLocationName": dagster_dev["location"], "repositoryName": "__repository__",
                            "jobName": "demo_sync", **selector_extra},
               "executionMetadata": {"tags": tags}}},
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = _gql(url, 'query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }', {"id": run_id})[
            "runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            assert status == "SUCCESS"
            return run_id
        time.sleep(2)
    raise TimeoutError(run_id)


@pytest.mark.integration
def test_subset_materialization_is_followed_by_the_manifest(dagster_dev):
    """A user re-materializes one export of a day; the daemon's automation sensor re-writes its manifest."""
    pk = last_complete_days(2)[0].isoformat()
    _launch_and_wait(dagster_dev, {}, [{"key": "dagster/partition", "value": pk}])
    # the automation sensor compares each tick with the previous one: let it tick once after the
    # full run, as it does all day long in a real deployment
    done = time.time()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ticks = _gql(
            dagster_dev["url"],
            """query($sel: SensorSelector!) { sensorOrError(sensorSelector: $sel) {
                 ... on Sensor { sensorState { ticks(limit: 1) { timestamp status } } } } }""",
            {"sel": {"repositoryLocationName": dagster_dev["location"], "repositoryName": "__repository__",
                     "sensorName": "userpilot_manifest_automation"}},
        )["sensorOrError"]["sensorState"]["ticks"]
        if ticks and ticks[0]["timestamp"] > done and ticks[0]["status"] != "STARTED":
            break
        time.sleep(2)
    subset_run = _launch_and_wait(
        dagster_dev,
        {"assetSelection": [{"path": ["demo", "raw_events"]}, {"path": ["demo", "track"]}]},
        [{"key": "dagster/partition", "value": pk}],
    )
    manifest = dagster_dev["root"] / "exports" / "userpilot_events" / "userpilot_datasync_10001_NX-demo0001" / pk / "_manifest.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        doc = json.loads(manifest.read_text())
        if doc["source"]["export_runs"]["track"] == subset_run and doc["run_id"] != subset_run:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"the manifest of {pk} was not re-written after the subset run: {doc['run_id']}")
    assert doc["source"]["export_runs"]["page_view"] != subset_run  # other exports come from the first run
    assert len(doc["files"]) == 7
