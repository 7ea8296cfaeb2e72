"""The cluster deployment, for real on one machine: PostgreSQL, Redis, two Celery workers with
separate staging folders, the daemon and the webserver (``userpilot_sync.cluster.trial``, what
``make cluster`` starts), driven over GraphQL like the UI.

Sync jobs: ``alpha`` and ``beta`` (two app tokens, no documented files, one run per day in a
backfill of two days) and ``gamma`` (its own app token, the default documented files: its snapshot state must
be shared by the workers), ``delta`` (its own app token). Every worker is armed with two pause
points: ``run_start`` for ``delta`` (the worker took the run, Dagster has not started it) and
``extracting`` for ``gamma`` (mid-extraction); each first run stops there and the test kills its
whole worker.

Asserted by values: which worker ran each run (its Celery node name, recorded in the run's tags and
in each day's metadata), step time spans (extractions of one app token never overlap), the lock
wait of a second run of the same day, the watchdog's verdict and the freed pool slot and lock of a
killed worker's run, the automatic re-run, and exports byte-identical to the local shape
(``pipeline.sync_partition`` without Dagster).
"""

from __future__ import annotations

import hashlib
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync.faults import PAUSE_AT_ENV, PAUSE_DIR_ENV
from userpilot_sync.locks import PostgresLockBackend, lock_key
from userpilot_sync.pipeline import sync_partition
from userpilot_sync_tests.fixtures_cluster import ClusterUI, logs_tail, start_cluster, stop_cluster, tags_of
from userpilot_sync_tests.fixtures_faults import local_destination, sync_job_data, write_sync_jobs

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

YESTERDAY = date.today() - timedelta(days=1)
DAYS = [(YESTERDAY - timedelta(days=i)).isoformat() for i in (4, 3)]
GAMMA_DAYS = [(YESTERDAY - timedelta(days=i)).isoformat() for i in (9, 8)]
DONE = ("SUCCESS", "FAILURE", "CANCELED")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    exports = root / "exports"
    jobs = write_sync_jobs(root / "sync_jobs", [
        sync_job_data("alpha", "cl-alpha", local_destination(exports / "alpha"), app_token="NX-clusterA",
                      events_per_day=2000, seed=3, userpilot_files=[], backfill_days_per_run=1),
        sync_job_data("beta", "cl-beta", local_destination(exports / "beta"), app_token="NX-clusterB",
                      events_per_day=2000, seed=4, userpilot_files=[], backfill_days_per_run=1),
        sync_job_data("gamma", "cl-gamma", local_destination(exports / "gamma"), app_token="NX-clusterC",
                      events_per_day=3000, seed=5),
        sync_job_data("delta", "cl-delta", local_destination(exports / "delta"), app_token="NX-clusterD",
                      events_per_day=1000, seed=6, userpilot_files=[]),
    ])
    cluster = start_cluster(root / "c", {
        "USERPILOT_SYNC_JOBS_DIR": str(root / "sync_jobs"),
        PAUSE_AT_ENV: "run_start@delta,extracting@gamma", PAUSE_DIR_ENV: str(root / "pause"),
    })
    (root / "pause").mkdir()
    ui = ClusterUI(root=root, env={}, port=cluster.web_port, cluster=cluster)
    try:
        ui.wait_loaded()
        yield {"root": root, "cluster": cluster, "ui": ui, "jobs": {j.name: j for j in jobs},
               "locks": PostgresLockBackend(cluster.postgres.url)}
    finally:
        stop_cluster(cluster)


def _finished(ui: ClusterUI, run_ids: list[str], timeout: float) -> list[dict]:
    def probe():
        runs = [ui.run(r) for r in run_ids]
        return runs if all(r["status"] in DONE for r in runs) else None
    return ui.wait(f"runs {run_ids} finishing", probe, timeout)


def _step_span(run: dict) -> tuple[float, float]:
    (step,) = run["stepStats"]
    return step["startTime"], step["endTime"]


def _day_files(job: SyncJob, pk: str) -> dict[str, str]:
    """sha256 of every file of the day (manifest included) under the sync job's local destination."""
    root = Path(job.destination.path)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and pk in path.relative_to(root).as_posix() and not path.name.startswith("."):
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _reference(job: SyncJob, days: list[str], folder: Path) -> dict[str, dict[str, str]]:
    """The same days exported by the local shape without Dagster (in day order, one state store)."""
    data = job.model_dump(mode="json", exclude={"source_file"})
    data["destination"] = local_destination(folder / "exports")
    data["state"] = {"kind": "local", "path": str(folder / "state")}
    ref = SyncJob.model_validate(data)
    for pk in days:
        assert sync_partition(ref, pk, folder / "staging").manifest["status"] == "complete"
    return {pk: _day_files(ref, pk) for pk in days}


def _comparable(files: dict[str, str], job: SyncJob, pk: str) -> dict[str, str]:
    """Data files by sha256; the manifest is compared separately (it names its run and time)."""
    return {k: v for k, v in files.items() if not k.endswith("_manifest.json")}


def test_a_two_sync_job_backfill_spreads_over_both_workers_one_extraction_per_app_token(env):
    ui: ClusterUI = env["ui"]
    # one asset backfill per sync job, launched together (Dagster refuses one backfill over assets
    # of different partitions definitions: each sync job's days are its own dynamic partitions)
    backfills = [ui.launch_backfill([name], DAYS, f"cluster test: {name}") for name in ("alpha", "beta")]

    def finished():
        states = [ui.backfill(b) for b in backfills]
        return states if all(s["status"] not in ("REQUESTED", "CANCELING", "FAILING") for s in states) else None

    done = ui.wait(f"backfills {backfills}", finished, timeout=300, interval=1)
    assert all(d["status"] in ("COMPLETED", "COMPLETED_SUCCESS") for d in done), f"{done}\n{logs_tail(env['cluster'])}"
    runs = [ui.run(r["runId"]) for d in done for r in d["runs"]]
    assert len(runs) == 4 and all(r["status"] == "SUCCESS" for r in runs), runs  # 2 sync jobs x 2 days

    by_token: dict[str, list[tuple[float, float, str]]] = {}
    workers = set()
    for run in runs:
        tags = tags_of(run)
        worker = tags["userpilot_sync/worker_name"]
        assert worker.split("@")[0] in ("worker1", "worker2"), tags  # the Celery node, not the host
        assert tags["userpilot_sync/session"] == "postgres"
        workers.add(worker.split("@")[0])
        job = run["stepStats"][0]["stepKey"].removesuffix("_day")  # the day step: <sync job>_day
        start, end = _step_span(run)
        by_token.setdefault(env["jobs"][job].app_token, []).append((start, end, run["runId"]))
    assert workers == {"worker1", "worker2"}, "every run went to one worker"
    assert set(by_token) == {"NX-clusterA", "NX-clusterB"} and all(len(v) == 2 for v in by_token.values())
    for token, spans in by_token.items():
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            assert start >= end, f"app token {token}: runs {first} and {second} extracted at the same time"
    # the two app tokens did run at the same time (two workers): the backfill was not serialised
    a, b = by_token["NX-clusterA"], by_token["NX-clusterB"]
    assert any(sa < eb and sb < ea for sa, ea, _ in a for sb, eb, _ in b), (a, b)

    # each day's record names its worker too
    md = ui.gql("""query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
        assetMaterializations(limit: 10) { partition metadataEntries { label ... on TextMetadataEntry { text } } } } } }""",
                {"k": {"path": ["alpha", "raw_events"]}})["assetNodeOrError"]["assetMaterializations"]
    recorded = {m["partition"]: {e["label"]: e.get("text") for e in m["metadataEntries"]} for m in md}
    assert set(recorded) == set(DAYS)
    assert all(r["userpilot/worker"].split("@")[0] in ("worker1", "worker2") for r in recorded.values()), recorded


def test_exports_of_the_cluster_are_byte_identical_to_the_local_shape(env, tmp_path):
    for name in ("alpha", "beta"):
        job = env["jobs"][name]
        expected = _reference(job, DAYS, tmp_path / name)
        for pk in DAYS:
            got = _day_files(job, pk)
            assert got and _comparable(got, job, pk) == _comparable(expected[pk], job, pk), (name, pk)


def test_two_runs_of_one_day_on_different_workers_never_interleave(env):
    ui: ClusterUI = env["ui"]
    pool = env["jobs"]["alpha"].pool
    ui.set_pool_limit(pool, 2)  # let both runs start: only the day lock keeps them apart now
    try:
        pk = DAYS[1]
        first, second = ui.launch("alpha", pk), ui.launch("alpha", pk)
        runs = _finished(ui, [first, second], timeout=240)
    finally:
        ui.set_pool_limit(pool, 1)
    assert all(r["status"] == "SUCCESS" for r in runs), f"{runs}\n{logs_tail(env['cluster'])}"
    workers = {tags_of(r)["userpilot_sync/worker_name"] for r in runs}
    assert len(workers) == 2, f"both runs on {workers}: the test needs one per worker"
    waits = {r["runId"]: [e for e in ui.events(r["runId"]) if "waiting for another run of this partition" in e["message"]]
             for r in runs}
    waiter = [r for r in runs if waits[r["runId"]]]
    spans = {r["runId"]: (_step_span(r), tags_of(r)["userpilot_sync/worker_name"]) for r in runs}
    assert len(waiter) == 1, (waits, spans)  # exactly one of them found the day locked
    holder = next(r for r in runs if r is not waiter[0])
    # the waiter's export began only after the holder's step (and its lock) ended
    locked = [e for e in ui.events(waiter[0]["runId"]) if "running on worker" in e["message"]]
    _, holder_end = _step_span(holder)
    waited_at = float(waits[waiter[0]["runId"]][0]["timestamp"]) / 1000
    assert waited_at < holder_end <= _step_span(waiter[0])[1]
    assert locked, "the waiter logged no worker line"
    assert not env["locks"].is_locked("alpha", pk)


def _revive(cluster) -> None:
    """Start again every worker a test killed (same name and staging folder)."""
    dead = [name for name in cluster.worker_names if not cluster.services[name].alive()]
    for name in dead:
        cluster.start_worker(name)
    cluster.wait_workers(dead)


def _watchdog_failed(ui: ClusterUI, run_id: str) -> tuple[dict, float]:
    killed_at = time.monotonic()
    failed = ui.wait("the watchdog failing the dead run", lambda: (r if (r := ui.run(run_id))["status"] in DONE else None),
                     timeout=60, interval=0.5)
    return failed, time.monotonic() - killed_at


def test_a_worker_killed_before_dagster_started_the_run_is_caught_too(env):
    ui: ClusterUI = env["ui"]
    cluster = env["cluster"]
    pause = env["root"] / "pause" / "run_start"
    run_id = ui.launch("delta", GAMMA_DAYS[0])
    ui.wait("delta's run paused before it started", pause.exists, timeout=180, interval=0.5)
    run = ui.run(run_id)
    tags = tags_of(run)
    assert run["status"] in ("STARTING", "STARTED") and run["stepStats"] == [], run
    assert tags["userpilot_sync/session"] == "postgres" and run_id in env["locks"].live_runs()  # the worker's hook
    victim = tags["userpilot_sync/worker_name"].split("@")[0]
    cluster.services[victim].kill()
    failed, detected_s = _watchdog_failed(ui, run_id)
    assert failed["status"] == "FAILURE"
    assert "session in the instance's database ended" in " ".join(e["message"] for e in ui.events(run_id))
    retry = ui.wait("the automatic re-run", lambda: next((r for r in ui.runs() if r["parentRunId"] == run_id), None),
                    timeout=60, interval=0.5)
    (retried,) = _finished(ui, [retry["runId"]], timeout=240)
    assert retried["status"] == "SUCCESS", logs_tail(cluster)
    assert tags_of(retried)["userpilot_sync/worker_name"].split("@")[0] != victim
    print(f"\ncluster: run killed before it started failed {detected_s:.1f} s after its worker was killed")
    _revive(cluster)


def test_a_killed_worker_frees_its_lock_and_slot_and_the_run_is_run_again_cleanly(env, tmp_path):
    ui: ClusterUI = env["ui"]
    cluster = env["cluster"]
    locks: PostgresLockBackend = env["locks"]
    pause = env["root"] / "pause" / "extracting"
    pk = GAMMA_DAYS[0]
    run_id = ui.launch("gamma", pk)
    ui.wait("gamma's run paused mid-extraction", pause.exists, timeout=180, interval=0.5)
    child = int(pause.read_text())
    run = ui.run(run_id)
    assert run["status"] == "STARTED"
    victim = tags_of(run)["userpilot_sync/worker_name"].split("@")[0]
    assert locks.is_locked("gamma", pk), "the paused run holds its day lock in PostgreSQL"
    assert run_id in locks.live_runs()
    pool = env["jobs"]["gamma"].pool
    slots = ui.gql("""query($p: String!) { instance { concurrencyLimit(concurrencyKey: $p) {
        activeRunIds } } }""", {"p": pool})["instance"]["concurrencyLimit"]["activeRunIds"]
    assert slots == [run_id]

    cluster.services[victim].kill()  # SIGKILL to the whole worker: main process and its child
    failed, detected_s = _watchdog_failed(ui, run_id)
    assert failed["status"] == "FAILURE"
    messages = " ".join(e["message"] for e in ui.events(run_id))
    assert "died" in messages and "session in the instance's database ended" in messages, messages[-2000:]
    assert not locks.is_locked("gamma", pk), "the dead run's day lock is free"
    assert run_id not in locks.live_runs()

    # the daemon's run retry re-runs it, on the worker that is left (the other one is dead)
    retry = ui.wait("the automatic re-run", lambda: next((r for r in ui.runs() if r["parentRunId"] == run_id), None),
                    timeout=60, interval=0.5)
    (retried,) = _finished(ui, [retry["runId"]], timeout=240)
    assert retried["status"] == "SUCCESS", logs_tail(cluster)
    survivor = tags_of(retried)["userpilot_sync/worker_name"].split("@")[0]
    assert survivor != victim
    slots = ui.gql("""query($p: String!) { instance { concurrencyLimit(concurrencyKey: $p) {
        activeRunIds } } }""", {"p": pool})["instance"]["concurrencyLimit"]["activeRunIds"]
    assert slots == []

    # the next day (on the surviving worker) chains on the state the re-run recorded
    (second,) = _finished(ui, [ui.launch("gamma", GAMMA_DAYS[1])], timeout=240)
    assert second["status"] == "SUCCESS", logs_tail(cluster)
    job = env["jobs"]["gamma"]
    expected = _reference(job, GAMMA_DAYS, tmp_path / "gamma")
    for day in GAMMA_DAYS:
        assert _comparable(_day_files(job, day), job, day) == _comparable(expected[day], job, day), day
    print(f"\ncluster: dead run failed {detected_s:.1f} s after its worker was killed (watchdog every 2 s)")
