"""What a user meets in the UI: ``dagster dev`` (webserver + daemon) on loopback, driven over GraphQL.

One ``dagster dev`` serves the whole module (demo sync job, local destination in a temporary
folder). The tests follow a user: the asset graph and its automation, the day partitions the
daemon's ``userpilot_partition_window`` sensor keeps equal to the 365-day window, one day
materialized with "Materialize all", a subset of a day refused, and a 3-day asset backfill run by
the daemon as one ranged run (``backfill_days_per_run``) with per-day records and checks.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest

from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days, utc_today
from userpilot_sync_tests.fixtures_core import dagster_dev as start_dagster_dev, demo_yaml, project_environment
from userpilot_sync_tests.fixtures_core import graphql as _gql

REPOSITORY = "__repository__"
EVENT_TYPES = ("identify_user", "identify_company", "interaction", "track", "track_feature", "page_view",
               "session_start")
DOCUMENTED = ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions")
DAY_ASSETS = ("raw_events", *EVENT_TYPES, *DOCUMENTED, "manifest")
DAY_FILES = len(EVENT_TYPES) + len(DOCUMENTED)  # files of a day in the demo's one format
SYNC_FOLDER = Path("userpilot_events") / "userpilot_datasync_10001_NX-demo0001"
EVENTS_PER_DAY = 5000  # sync_jobs/demo.yaml

#: The day "Materialize all" exports (yesterday, UTC), the day a subset is refused for, the backfill's days.
#: All distinct, so each test reads its own days' records.
DAY = last_complete_days(1)[0].isoformat()
SUBSET_DAY = last_complete_days(2)[0].isoformat()
BACKFILL_DAYS = [d.isoformat() for d in last_complete_days(6)[:3]]

META_FIELDS = """metadataEntries { label __typename
    ... on IntMetadataEntry { intValue intRepr } ... on FloatMetadataEntry { floatValue }
    ... on TextMetadataEntry { text } ... on PathMetadataEntry { path } ... on UrlMetadataEntry { url }
    ... on JsonMetadataEntry { jsonString } }"""

# ---------------------------------------------------------------------------------------------- helpers
def _log_tail(dev: dict) -> str:
    return dev["dev"].log_tail(5000)


def _wait(dev: dict, what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll ``probe`` until it returns a truthy value; on timeout fail with the dagster dev log's tail."""
    return dev["dev"].wait(what, probe, timeout, interval)


def _metadata(entries: list[dict]) -> dict[str, Any]:
    """Metadata entries (GraphQL) as plain ``{label: value}``."""
    values: dict[str, Any] = {}
    for e in entries:
        kind = e["__typename"]
        if kind == "IntMetadataEntry":
            values[e["label"]] = e["intValue"] if e["intValue"] is not None else int(e["intRepr"])
        elif kind == "JsonMetadataEntry":
            values[e["label"]] = json.loads(e["jsonString"])
        else:
            values[e["label"]] = next((e[k] for k in ("text", "path", "url", "floatValue") if k in e), kind)
    return values


def _repo_selector(dev: dict) -> dict:
    return {"repositoryLocationName": dev["location"], "repositoryName": REPOSITORY}


def _run_count(dev: dict) -> int:
    return _gql(dev["url"], "{ runsOrError { __typename ... on Runs { count } } }")["runsOrError"]["count"]


def _run_errors(dev: dict, run_id: str) -> str:
    """The run's ERROR events (step failures and their causes), for assertion messages."""
    data = _gql(dev["url"], """query($id: ID!) { logsForRun(runId: $id) { __typename
        ... on EventConnection { events { __typename ... on MessageEvent { message level } } } } }""",
                {"id": run_id})["logsForRun"]
    events = data.get("events") or []
    return "\n".join(e["message"] for e in events if e.get("level") == "ERROR") or "(no ERROR events)"


def _wait_run(dev: dict, run_id: str, timeout: float = 150) -> str:
    def finished():
        status = _gql(dev["url"], "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                      {"id": run_id})["runOrError"]["status"]
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    status = _wait(dev, f"run {run_id} finishing", finished, timeout)
    assert status == "SUCCESS", f"run {run_id} ended {status}:\n{_run_errors(dev, run_id)}\n--- log ---\n{_log_tail(dev)}"
    return status


def _launch_run(dev: dict, partition: str, asset_selection: list[list[str]] | None = None) -> dict:
    selector = {**_repo_selector(dev), "jobName": "demo_sync"}
    if asset_selection is not None:
        selector["assetSelection"] = [{"path": p} for p in asset_selection]
    return _gql(
        dev["url"],
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }""",
        {"p": {"selector": selector, "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}},
    )["launchRun"]


def _materialization(dev: dict, asset: str, partition: str) -> dict:
    """The newest materialization of ``demo/<asset>`` for ``partition``: runId, partition, metadata."""
    mats = _gql(
        dev["url"],
        """query($key: AssetKeyInput!, $pk: [String!]) { assetOrError(assetKey: $key) { ... on Asset {
             assetMaterializations(partitions: $pk, limit: 1) { runId partition %s } } } }""" % META_FIELDS,
        {"key": {"path": ["demo", asset]}, "pk": [partition]},
    )["assetOrError"]["assetMaterializations"]
    assert mats, f"no materialization of demo/{asset} for {partition}"
    return {"runId": mats[0]["runId"], "partition": mats[0]["partition"], "metadata": _metadata(mats[0]["metadataEntries"])}


def _day_exported(dev: dict, partition: str) -> list[dict]:
    """Executions of ``demo/manifest``'s ``day_exported`` check for ``partition`` (newest first)."""
    executions = _gql(
        dev["url"],
        """query($key: AssetKeyInput!, $pk: String) {
             assetCheckExecutions(assetKey: $key, checkName: "day_exported", partition: $pk, limit: 20) {
               runId status partition evaluation { success partition %s } } }""" % META_FIELDS,
        {"key": {"path": ["demo", "manifest"]}, "pk": partition},
    )["assetCheckExecutions"]
    for e in executions:
        if e["evaluation"]:
            e["evaluation"]["metadata"] = _metadata(e["evaluation"].pop("metadataEntries"))
    return executions


def _manifest(dev: dict, partition: str) -> dict:
    return json.loads((dev["root"] / "exports" / SYNC_FOLDER / partition / "_manifest.json").read_text())


def _partition_keys(dev: dict) -> list[str]:
    dims = _gql(
        dev["url"],
        """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename ... on AssetNode {
             partitionKeysByDimension { partitionKeys } } } }""",
        {"key": {"path": ["demo", "track"]}},
    )["assetNodeOrError"]["partitionKeysByDimension"]
    return dims[0]["partitionKeys"] if dims else []


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    env = project_environment(root, {"demo.yaml": demo_yaml(root / "exports")})
    with start_dagster_dev(root, env, load_timeout=150) as dev:
        yield {"url": dev.url, "root": root, "home": Path(env["DAGSTER_HOME"]), "location": dev.location, "dev": dev}


@pytest.fixture(scope="module")
def window(dagster_dev) -> list[str]:
    """The day partitions once the daemon's partition-window sensor has ticked (it ticks at start)."""
    return _wait(dagster_dev, "the partition-window sensor adding the 365 days of the window",
                 lambda: (keys if len(keys := _partition_keys(dagster_dev)) == 365 else None), timeout=120)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.integration
def test_assets_lineage_and_automation(dagster_dev):
    url = dagster_dev["url"]
    nodes = _gql(url, "{ assetNodes { assetKey { path } groupName isPartitioned dependencyKeys { path } } }")["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    day_keys = {f"demo/{a}" for a in DAY_ASSETS}
    assert set(by_key) == day_keys | {"demo/lookups"}
    assert {k for k, n in by_key.items() if n["groupName"] == "demo"} == day_keys
    assert by_key["demo/lookups"]["groupName"] == "demo_lookups"
    assert all(by_key[k]["isPartitioned"] for k in day_keys)
    assert by_key["demo/lookups"]["isPartitioned"] is False

    deps = {k: {"/".join(d["path"]) for d in n["dependencyKeys"]} for k, n in by_key.items()}
    assert deps["demo/raw_events"] == set()
    for et in EVENT_TYPES:
        assert deps[f"demo/{et}"] == {"demo/raw_events"}, et
    assert deps["demo/manifest"] == {f"demo/{a}" for a in (*EVENT_TYPES, *DOCUMENTED)}
    assert deps["demo/all_users"] == {"demo/raw_events", "demo/identify_user"}
    assert deps["demo/feature_tags_breakdown"] == {"demo/track_feature"}
    assert deps["demo/lookups"] == set()

    checks = _gql(url, """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
        assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } } }""",
                  {"key": {"path": ["demo", "manifest"]}})["assetNodeOrError"]["assetChecksOrError"]
    assert {c["name"] for c in checks["checks"]} == {"day_exported"}

    schedules = _gql(
        url,
        """query($sel: RepositorySelector!) { schedulesOrError(repositorySelector: $sel) {
             ... on Schedules { results { name cronSchedule scheduleState { status } } } } }""",
        {"sel": _repo_selector(dagster_dev)},
    )["schedulesOrError"]["results"]
    assert {(s["name"], s["cronSchedule"], s["scheduleState"]["status"]) for s in schedules} == {
        ("demo_daily_sync", "0 3 * * *", "STOPPED"),
        ("demo_lookups_refresh", "0 3 * * *", "STOPPED"),
    }

    sensors = _gql(
        url,
        """query($sel: RepositorySelector!) { sensorsOrError(repositorySelector: $sel) {
             ... on Sensors { results { name sensorState { status } } } } }""",
        {"sel": _repo_selector(dagster_dev)},
    )["sensorsOrError"]["results"]
    assert {(s["name"], s["sensorState"]["status"]) for s in sensors} == {
        ("userpilot_partition_window", "RUNNING"), ("userpilot_run_recovery", "RUNNING"),
        # recomputes stale snapshots even while the demo's schedules are stopped (it only acts on re-exports)
        ("userpilot_snapshots_demo", "RUNNING")}


@pytest.mark.integration
def test_partitions_match_the_window(dagster_dev, window):
    today = utc_today()
    assert len(window) == 365
    assert window == sorted(window), "partitions are not oldest first"
    assert window[-1] == (today - timedelta(days=1)).isoformat()  # yesterday, UTC
    assert window[0] == (today - timedelta(days=365)).isoformat()
    stats = _gql(dagster_dev["url"], """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
        ... on AssetNode { partitionStats { numPartitions numMaterialized numFailed } } } }""",
                 {"key": {"path": ["demo", "track"]}})["assetNodeOrError"]["partitionStats"]
    assert stats["numPartitions"] == 365
    assert stats["numFailed"] == 0


@pytest.mark.integration
def test_materialize_one_day(dagster_dev, window):
    assert DAY in window
    launched = _launch_run(dagster_dev, DAY)
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    _wait_run(dagster_dev, run_id)

    doc = _manifest(dagster_dev, DAY)
    assert doc["run_id"] == run_id and doc["partition"] == DAY
    assert len(doc["files"]) == DAY_FILES
    assert set(doc["event_types"]) == set(EVENT_TYPES)
    assert doc["userpilot_files"]["all_users"]["status"] == "complete"
    assert sum(rows_by_event_type(doc).values()) == EVENTS_PER_DAY

    mat = _materialization(dagster_dev, "track", DAY)
    assert mat["runId"] == run_id and mat["partition"] == DAY
    meta = mat["metadata"]
    assert meta["dagster/row_count"] == rows_by_event_type(doc)["track"]
    assert str(meta["dagster/uri"]).endswith(f"/{DAY}/track.parquet"), meta["dagster/uri"]
    assert meta["bytes"] > 0
    files = meta["userpilot/files"]
    assert [f["uri"] for f in files] == [meta["dagster/uri"]]
    assert sum(f["rows"] for f in files) == meta["dagster/row_count"]
    assert meta["userpilot/status"] == "exported"

    executions = [e for e in _day_exported(dagster_dev, DAY) if e["runId"] == run_id]
    assert len(executions) == 1, executions
    e = executions[0]
    assert e["status"] == "SUCCEEDED" and e["partition"] == DAY
    assert e["evaluation"]["success"] is True and e["evaluation"]["partition"] == DAY
    assert e["evaluation"]["metadata"]["rows"] == EVENTS_PER_DAY
    assert e["evaluation"]["metadata"]["files"] == DAY_FILES


@pytest.mark.integration
def test_a_subset_of_a_day_is_refused_before_a_run_is_created(dagster_dev, window):
    assert SUBSET_DAY in window
    runs_before = _run_count(dagster_dev)
    refused = _launch_run(dagster_dev, SUBSET_DAY, asset_selection=[["demo", "track"]])
    assert refused["__typename"] != "LaunchRunSuccess", refused
    assert refused["__typename"] in ("InvalidSubsetError", "PythonError"), refused
    assert "does not support subsetting" in (refused.get("message") or ""), refused
    time.sleep(1)
    assert _run_count(dagster_dev) == runs_before
    assert not (dagster_dev["root"] / "exports" / SYNC_FOLDER / SUBSET_DAY).exists()


@pytest.mark.integration
def test_three_day_asset_backfill_is_one_ranged_run(dagster_dev, window):
    assert set(BACKFILL_DAYS) <= set(window)
    url = dagster_dev["url"]
    runs_before = _run_count(dagster_dev)
    launched = _gql(
        url,
        """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
             __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
        {"p": {"partitionNames": BACKFILL_DAYS, "assetSelection": [{"path": ["demo", a]} for a in DAY_ASSETS],
               "title": "ui test backfill"}},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def backfill():
        data = _gql(url, """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
            ... on PartitionBackfill { status isAssetBackfill error { message }
                  runs { runId status tags { key value } } } ... on Error { message } } }""",
                    {"id": backfill_id})["partitionBackfillOrError"]
        assert data["__typename"] == "PartitionBackfill", data
        return data if data["status"] not in ("REQUESTED", "CANCELING", "FAILING") else None

    done = _wait(dagster_dev, f"backfill {backfill_id} finishing", backfill, timeout=300, interval=2)
    run_errors = "\n".join(_run_errors(dagster_dev, r["runId"]) for r in done["runs"] if r["status"] != "SUCCESS")
    assert done["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), f"{done}\n{run_errors}\n{_log_tail(dagster_dev)}"
    assert done["isAssetBackfill"] is True

    # one ranged run for the 3 days (multi_run backfill policy, backfill_days_per_run: 31)
    assert len(done["runs"]) == 1, done["runs"]
    run = done["runs"][0]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["status"] == "SUCCESS"
    assert tags.get("dagster/asset_partition_range_start") == BACKFILL_DAYS[0], tags
    assert tags.get("dagster/asset_partition_range_end") == BACKFILL_DAYS[-1], tags
    assert _run_count(dagster_dev) == runs_before + 1
    run_id = run["runId"]

    # every export shows the 3 days materialized, none failed
    for asset in DAY_ASSETS:
        statuses = _gql(url, """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
            assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
              materializedPartitions failedPartitions materializingPartitions } } } } }""",
                        {"key": {"path": ["demo", asset]}})["assetNodeOrError"]["assetPartitionStatuses"]
        assert set(BACKFILL_DAYS) <= set(statuses["materializedPartitions"]), (asset, statuses)
        assert statuses["failedPartitions"] == [] and statuses["materializingPartitions"] == [], (asset, statuses)

    # each day has its own records: manifest, track row count, day_exported check
    manifests = {pk: _manifest(dagster_dev, pk) for pk in BACKFILL_DAYS}
    range_track_rows = sum(rows_by_event_type(m)["track"] for m in manifests.values())
    for pk, doc in manifests.items():
        assert doc["run_id"] == run_id and doc["partition"] == pk
        assert len(doc["files"]) == DAY_FILES and set(doc["event_types"]) == set(EVENT_TYPES)
        mat = _materialization(dagster_dev, "track", pk)
        assert mat["runId"] == run_id and mat["partition"] == pk
        meta = mat["metadata"]
        assert meta["dagster/row_count"] == rows_by_event_type(doc)["track"], (pk, meta["dagster/row_count"], rows_by_event_type(doc))
        assert meta["dagster/row_count"] < range_track_rows
        assert str(meta["dagster/uri"]).endswith(f"/{pk}/track.parquet"), meta["dagster/uri"]
        assert [f["uri"] for f in meta["userpilot/files"]] == [meta["dagster/uri"]]
        assert meta["userpilot/status"] == "exported"

        executions = [e for e in _day_exported(dagster_dev, pk) if e["runId"] == run_id]
        assert len(executions) == 1, (pk, executions)
        e = executions[0]
        assert e["status"] == "SUCCEEDED" and e["partition"] == pk, e
        assert e["evaluation"]["success"] is True and e["evaluation"]["partition"] == pk
        assert e["evaluation"]["metadata"]["rows"] == sum(rows_by_event_type(doc).values())
