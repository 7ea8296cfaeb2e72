"""``make bench-cluster``: a backfill on the cluster deployment with one worker, then with two.

    python -m benchmarks.cluster [--jobs 2] [--days 90] [--events 20000] [--workers 1,2]

For each worker count: a fresh one-machine cluster (``userpilot_sync.cluster.trial``: PostgreSQL,
Redis, N Celery workers with --concurrency 1, daemon, webserver), ``--jobs`` demo sync jobs (each
its own app token, ``--events`` events a day, Parquet/zstd to a local folder, event exports only:
``userpilot_files: []``), and one asset backfill per sync job over the ``--days`` days ending
yesterday, all launched at once over GraphQL. Timed from the first launch until every backfill is
complete. Per run (from Dagster's run and step records): the run's time (RUN_START..end), its
step's time, the run's bookkeeping around the step (run − step), and the worker time outside runs
per run = (wall × workers − Σ run time) / runs: queue dequeue, Celery dispatch, the worker child's
process start and code load, the asset-backfill daemon's ticks that create the runs and close the
backfill, and any idle worker.

Prints a table and writes ``benchmarks/results/cluster.json``. Everything it starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx

from userpilot_sync.cluster.trial import Cluster, free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cluster.json"


def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    response = httpx.post(url, json={"query": query, "variables": variables or {}}, timeout=120)
    response.raise_for_status()
    body = response.json()
    if "errors" in body:
        raise RuntimeError(body["errors"])
    return body["data"]


def _wait(what: str, probe, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def _write_jobs(folder: Path, exports: Path, jobs: int, events: int, days_per_run: int | None) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i in range(1, jobs + 1):
        name = f"scale{i}"
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nsync_id: \"9{i:04d}\"\napp_token: NX-scale{i:04d}\n"
            f"source: {{kind: demo, events_per_day: {events}, seed: {100 + i}}}\n"
            f"destination: {{kind: local, path: {json.dumps(str(exports / name))}, prefix: userpilot_events}}\n"
            "formats: [{format: parquet, compression: zstd}]\nuserpilot_files: []\n"
            + (f"backfill_days_per_run: {days_per_run}\n" if days_per_run else "")
            + "schedules_running: false\nbackfill_days: 0\nchecks: {empty_days: warn}\n")
        names.append(name)
    return names


def run_once(workers: int, jobs: int, days: int, events: int, days_per_run: int | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    pg_folder = Path(tempfile.mkdtemp(prefix="bench-cluster-pg-"))
    names = _write_jobs(root / "sync_jobs", root / "exports", jobs, events, days_per_run)
    cluster = Cluster(root / "c", workers=workers, web_port=free_port(), pg_folder=pg_folder,
                      extra_env={"USERPILOT_SYNC_JOBS_DIR": str(root / "sync_jobs")})
    yesterday = datetime.now(timezone.utc).date() - timedelta(days=1)
    keys = [(yesterday - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    print(f"  {workers} worker(s): {jobs} sync jobs x {days} days x {events:,} events ...", end="", flush=True)
    try:
        cluster.start()
        url = f"http://127.0.0.1:{cluster.web_port}/graphql"

        def loaded():
            try:
                entries = _gql(url, "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }")[
                    "workspaceOrError"]["locationEntries"]
            except (httpx.HTTPError, RuntimeError, KeyError):
                return False
            return bool(entries) and entries[0]["loadStatus"] == "LOADED"

        _wait("the code location", loaded, 240)
        nodes = _gql(url, "{ assetNodes { assetKey { path } isPartitioned } }")["assetNodes"]

        def partitions_ready():
            for name in names:
                listed = _gql(url, """query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
                    partitionKeysByDimension { partitionKeys } } } }""", {"k": {"path": [name, "raw_events"]}})
                if not set(keys) <= set(listed["assetNodeOrError"]["partitionKeysByDimension"][0]["partitionKeys"]):
                    return False
            return True

        _wait("the day partitions", partitions_ready, 300)
        started = time.monotonic()
        backfills = []
        for name in names:
            selection = [{"path": n["assetKey"]["path"]} for n in nodes
                         if n["isPartitioned"] and n["assetKey"]["path"][0] == name]
            launched = _gql(url, """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
                            {"p": {"partitionNames": keys, "assetSelection": selection}})["launchPartitionBackfill"]
            if launched["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"launchPartitionBackfill failed: {launched}")
            backfills.append(launched["backfillId"])

        def done():
            states = [_gql(url, """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                ... on PartitionBackfill { status runs { runId } } } }""", {"id": b})["partitionBackfillOrError"]
                      for b in backfills]
            return states if all(s["status"] not in ("REQUESTED", "CANCELING", "FAILING") for s in states) else None

        states = _wait("the backfills", done, 3600, interval=0.5)
        wall = time.monotonic() - started
        runs = []
        for state in states:
            for r in state["runs"]:
                runs.append(_gql(url, """query($id: ID!) { runOrError(runId: $id) { ... on Run { status creationTime
                    startTime endTime tags { key value } stepStats { startTime endTime } } } }""",
                                 {"id": r["runId"]})["runOrError"])
        failed = [r for r in runs if r["status"] != "SUCCESS"] + [s for s in states if s["status"] != "COMPLETED_SUCCESS"
                                                                  and s["status"] != "COMPLETED"]
        if failed:
            raise RuntimeError(f"{len(failed)} run(s)/backfill(s) did not succeed; logs in {cluster.root / 'logs'}")
        run_s = [r["endTime"] - r["startTime"] for r in runs]
        step_s = [r["stepStats"][0]["endTime"] - r["stepStats"][0]["startTime"] for r in runs]
        overhead = [a - b for a, b in zip(run_s, step_s)]
        by_worker: dict[str, int] = {}
        for r in runs:
            tag = next((t["value"] for t in r["tags"] if t["key"] == "userpilot_sync/worker_name"), "?")
            by_worker[tag.split("@")[0]] = by_worker.get(tag.split("@")[0], 0) + 1
        manifests = sum(1 for _ in (root / "exports").rglob("_manifest.json"))
        result = {
            "name": f"cluster_backfill_{workers}w", "workers": workers, "sync_jobs": jobs, "days": days,
            "events_per_day": events, "events": jobs * days * events, "runs": len(runs), "wall_s": round(wall, 1),
            "events_per_s": round(jobs * days * events / wall), "run_s_mean": round(sum(run_s) / len(runs), 2),
            "step_s_mean": round(sum(step_s) / len(runs), 2),
            "run_bookkeeping_s_mean": round(sum(overhead) / len(runs), 2),
            "outside_runs_s_per_run": round((wall * workers - sum(run_s)) / len(runs), 2),
            "runs_by_worker": by_worker,
            "manifests": manifests,
        }
        print(f" {wall:.1f} s")
        return result
    finally:
        cluster.stop()
        shutil.rmtree(pg_folder, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--days-per-run", type=int, default=None,
                        help="backfill_days_per_run of the sync jobs (default: the sync-job default, 31)")
    args = parser.parse_args(argv)
    results = [run_once(int(w), args.jobs, args.days, args.events, args.days_per_run)
               for w in args.workers.split(",")]
    print(f"\n{'name':<22}{'wall_s':>8}{'events/s':>10}{'runs':>6}{'run_s':>8}{'step_s':>8}{'outside_s':>10}"
          f"  by worker")
    for r in results:
        print(f"{r['name']:<22}{r['wall_s']:>8.1f}{r['events_per_s']:>10,d}{r['runs']:>6}{r['run_s_mean']:>8.2f}"
              f"{r['step_s_mean']:>8.2f}{r['outside_runs_s_per_run']:>10.2f}  {r['runs_by_worker']}")
    if len(results) > 1:
        print(f"speed-up {results[0]['wall_s'] / results[-1]['wall_s']:.2f}x with {results[-1]['workers']} workers "
              f"on {os.cpu_count()} cores")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "date": date.today().isoformat()},
                                   "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
