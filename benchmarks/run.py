"""Benchmark the exporter against a naive baseline, the floor and dlt, plus a 365-day backfill.

    python -m benchmarks.run [--sizes 1000000,5000000,10000000] [--backfill-days 365]
                             [--backfill-events 20000] [--snapshot-users 1000000]
                             [--only exporter,naive,floor,dlt,backfill_365,snapshot_1m[,snapshot_1m_replay,backfill_365_documented]]
                             [--quick] [--baseline] [--profile]

One process tree, on the same generated source data:

* the day's events are generated once with the demo source into Parquet/zstd chunk files
  (cached under ``benchmarks/.data/``, git-ignored);
* a moto S3 server runs in its own child process on a free loopback port;
* ``exporter`` (``sync_partition`` with a FilesSource -> S3Storage), ``naive`` (pandas +
  pandera-on-pandas), ``floor`` (pyarrow read -> write -> put) and ``dlt`` (dlt 1.x, the chunks as
  Arrow tables -> one table per event type -> its ``filesystem`` destination on the same S3 server,
  Parquet; benchmarks/dlt_child.py in its own environment ``.venv-dlt/``, skipped when that is
  missing: ``make bench-dlt-env``) each run in a child process; peak RSS is that child's
  ``ru_maxrss`` from ``os.wait4`` (the S3 server is not counted). The exporter's and dlt's seconds
  per stage are in their records (``stages``) when the child reports them;
* by default, days of 10M events or more run ``exporter`` and ``floor`` only (``naive`` would need
  ~7 GB there); an explicit ``--only`` runs its contenders at every size;
* ``backfill_365``: ``dagster dev`` (webserver + daemon) on a free loopback port with a
  temporary DAGSTER_HOME (deploy/dagster.yaml); an asset backfill of the demo sync job's
  365 days ending yesterday is launched over GraphQL (``launchPartitionBackfill``), timed until
  the backfill completes; peak RSS of the run processes is sampled (VmHWM) with psutil. The
  sync job writes the seven event-type exports and the manifest (``userpilot_files: []``);
  ``backfill_365_documented`` (only with ``--only``) adds the documented files it writes by default.
* ``snapshot_1m``: the ``all_users``/``all_companies`` snapshot work of one day for an app with
  ``--snapshot-users`` identified users (default 1,000,000), in a child process (peak RSS from
  ``os.wait4``): load the newest state, the day's deltas, merge, record the day in the state
  store, build + validate the files, write them (Parquet/zstd); seconds per stage. The state
  store it starts from (31 recorded days) is built once and cached under ``benchmarks/.data/``.
  ``snapshot_1m_replay`` (not in the default list: slow): the prior state of a re-export of the
  newest day, i.e. a checkpoint 29 days back plus 29 replayed deltas. See benchmarks/snapshots.py.

Prints a table and writes ``benchmarks/results/latest.json`` (``--baseline``: also
``baseline.json``). Everything it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / ".data"
RESULTS = HERE / "results"
#: The benchmarked day (fixed, so cached chunk files stay valid); runs pass `now` = the next day.
BENCH_DAY = "2025-06-02"
SEED = 42
MB = 1024 * 1024
#: the export contenders, in the order they run at each size
EXPORT_CONTENDERS = ("exporter", "naive", "floor", "dlt")
#: days of at least LARGE_DAY events run only LARGE_DAY_CONTENDERS unless --only is given: naive holds
#: the day in pandas (3.5 GB at 5M, ~7 GB at 10M)
LARGE_DAY = 10_000_000
LARGE_DAY_CONTENDERS = ("exporter", "floor")
#: the dlt contender's own environment (``make bench-dlt-env``): dlt[s3] pins botocore, never in uv.lock
DLT_VENV = REPO / ".venv-dlt"
DLT_PYTHON = DLT_VENV / "bin" / "python"


# ------------------------------------------------------------------------------- helpers
def _child(args: list[str], *, profile: Path | None = None, env: dict | None = None,
           cmd: list[str] | None = None) -> tuple[dict, float, int]:
    """Run ``python -m benchmarks.children <args>`` (or ``cmd + args``); returns (its JSON line,
    process wall s, peak RSS kB)."""
    cmd = [*(cmd or [sys.executable, "-m", "benchmarks.children"]), *args]
    if profile is not None:
        spy = Path(sys.executable).parent / "py-spy"
        cmd = [str(spy), "record", "--format", "speedscope", "--rate", "50", "--subprocesses", "-o", str(profile),
               "--", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, env=env or _env())
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed with exit code {proc.returncode}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), wall, usage.ru_maxrss


def _env() -> dict:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cached(name: str, inner: str, what: str, command: str, args: dict) -> tuple[Path, dict]:
    """``benchmarks/.data/<name>/<inner>``, built by the child ``command`` on first use; with its info."""
    folder = DATA / name
    info_file = folder / "dataset.json"
    if info_file.exists():
        return folder / inner, json.loads(info_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  building {what} into {folder.relative_to(REPO)} ...", flush=True)
    t0 = time.perf_counter()
    info, _, rss_kb = _child([command, json.dumps({"out": str(folder / inner), **args})])
    info["generate_s"] = round(time.perf_counter() - t0, 1)
    info["generate_peak_rss_mb"] = round(rss_kb / 1024, 1)
    info_file.write_text(json.dumps(info, indent=2))
    return folder / inner, info


def dataset(events: int) -> tuple[Path, dict]:
    """The cached chunk files of one day of ``events`` demo events (generated on first use)."""
    return _cached(f"demo-{events}-{BENCH_DAY}-seed{SEED}", "chunks", f"{events:,} demo events", "generate",
                   {"events": events, "seed": SEED, "day": BENCH_DAY})


class S3Server:
    """moto's S3 server in a child process on a free loopback port (stops when we close its stdin)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.children", "s3server"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
        port = int(self.proc.stdout.readline())
        self.endpoint = f"http://127.0.0.1:{port}"

    def fresh_bucket(self, name: str) -> str:
        """Reset the server (drops stored objects) and create ``name``."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=60).read()
        from benchmarks.children import _s3_client

        _s3_client(self.endpoint).create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _record(name: str, events: int, wall: float, rss_kb: int, source_bytes: int, **extra) -> dict:
    rec = {
        "name": name,
        "events": events,
        "wall_s": round(wall, 3),
        "events_per_s": round(events / wall) if wall else None,
        "mb_per_s": round(source_bytes / MB / wall, 1) if wall and source_bytes else None,
        "peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
    }
    rec.update(extra)
    return rec


def snapshot_dataset(users: int) -> tuple[Path, dict]:
    """The cached snapshot state store for ``users`` identified users (built on first use)."""
    return _cached(f"snapshot-v1-{users}-{BENCH_DAY}-seed{SEED}", "store",
                   f"the snapshot state store for {users:,} users", "snapshot_setup",
                   {"users": users, "seed": SEED, "bench_day": BENCH_DAY})


def bench_snapshot(users: int) -> dict:
    """``snapshot_1m``: one day's snapshot work on a copy of the cached state store."""
    store, info = snapshot_dataset(users)
    print(f"  snapshot  users={users:>9,} ...", end="", flush=True)
    out, process_wall, rss_kb = _child(["snapshot", json.dumps({"store": str(store), "users": users, "seed": SEED,
                                                                "bench_day": BENCH_DAY})])
    rec = _record("snapshot_1m", out["users"], out["wall_s"], rss_kb, 0, events_per_s=None,
                  events_note="events = users in all_users", process_wall_s=round(process_wall, 2),
                  snapshot_users=users, users=out["users"], companies=out["companies"], day=out["day"],
                  previous_day=out["previous_day"], stages_s=out["stages_s"], delta_rows=out["delta_rows"],
                  identify_user_events=out["identify_user_events"], activity_rows=out["activity_rows"],
                  output_bytes=out["output_bytes"], output_bytes_companies=out["output_bytes_companies"],
                  files=2, output_parts=out["output_parts"],
                  state_store_bytes_written=out["state_store_bytes_written"],
                  state_store_bytes=info["store_bytes"], rss_mb_after_stage=out["rss_mb_after"],
                  peak_rss_reached_in=_peak_stage(out["rss_mb_after"]),
                  pyarrow_pool_max_mb=out["pyarrow_pool_max_mb"],
                  pyarrow_pool_backend=out["pyarrow_backend"], load_average=_loadavg(), measured_at=_now())
    print(f" {rec['wall_s']:8.2f} s  {rec['peak_rss_mb']:>8} MB  ("
          + ", ".join(f"{k} {v:.2f}" for k, v in out["stages_s"].items()) + ")", flush=True)
    return rec


def bench_snapshot_replay(users: int) -> dict:
    """``snapshot_1m_replay``: ``prior_state`` from a checkpoint 29 days behind (29 deltas replayed)."""
    store, _ = snapshot_dataset(users)
    print(f"  replay    users={users:>9,} ...", end="", flush=True)
    out, process_wall, rss_kb = _child(["snapshot_replay", json.dumps({"store": str(store), "users": users,
                                                                       "seed": SEED, "bench_day": BENCH_DAY})])
    rec = _record("snapshot_1m_replay", out["users"], out["wall_s"], rss_kb, 0, events_per_s=None,
                  events_note="events = users in the replayed state", process_wall_s=round(process_wall, 2),
                  snapshot_users=users, users=out["users"], companies=out["companies"], day=out["day"],
                  previous_day=out["previous_day"], base_state=out["base_state"],
                  deltas_replayed=out["deltas_replayed"], load_average=_loadavg(), measured_at=_now())
    print(f" {rec['wall_s']:8.2f} s  {rec['peak_rss_mb']:>8} MB  ({out['deltas_replayed']} deltas)", flush=True)
    return rec


def _peak_stage(rss_after: dict) -> str:
    """The first stage after which the child's peak RSS had its final value."""
    top = max(v["peak"] for v in rss_after.values())
    return next(k for k, v in rss_after.items() if v["peak"] == top)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _dlt_env() -> dict:
    """The dlt child's environment: the benchmark's (credentials) without the repository on PYTHONPATH."""
    env = _env()
    env.pop("PYTHONPATH", None)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _dlt_version() -> str | None:
    """dlt's version in .venv-dlt (from its dist-info; importing dlt there would take seconds)."""
    found = sorted(DLT_VENV.glob("lib/python*/site-packages/dlt-*.dist-info"))
    return found[-1].name[len("dlt-"):-len(".dist-info")] if found else None


def _stages(out: dict) -> dict | None:
    """A child's seconds per stage (``stages``), rounded; None when it did not report them."""
    stages = out.get("stages")
    if not isinstance(stages, dict):
        return None
    return {str(k): round(v, 3) if isinstance(v, (int, float)) else v for k, v in stages.items()}


def bench_export(name: str, events: int, server: S3Server, profile_dir: Path | None) -> dict:
    folder, info = dataset(events)
    bucket = server.fresh_bucket(f"bench-{name}")
    args = {"data": str(folder), "bucket": bucket, "endpoint": server.endpoint, "day": BENCH_DAY}
    profile = profile_dir / f"profile-{name}-{events}.speedscope.json" if profile_dir else None
    print(f"  {name:<9} N={events:>9,} ...", end="", flush=True)
    if name == "dlt":
        # its own interpreter and environment; the script path (not -m) so nothing of the repo is imported
        out, process_wall, rss_kb = _child([json.dumps(args)], cmd=[str(DLT_PYTHON.relative_to(REPO)),
                                                                    str((HERE / "dlt_child.py").relative_to(REPO))],
                                           env=_dlt_env())
    else:
        out, process_wall, rss_kb = _child([name, json.dumps(args)], profile=profile)
    if out.get("rows") is not None and name != "exporter" and out["rows"] != events:
        raise RuntimeError(f"{name} exported {out['rows']} rows of {events}")
    rec = _record(name, events, out["wall_s"], rss_kb if profile is None else out["maxrss_kb"], info["arrow_bytes"],
                  process_wall_s=round(process_wall, 2), output_bytes=out.get("output_bytes"),
                  files=out.get("files"), rows_exported=out.get("rows"), source_mb=round(info["arrow_bytes"] / MB, 1),
                  cpu_s=out.get("cpu_s"))
    stages = _stages(out)
    if stages is not None:
        rec["stages"] = stages
    if name == "dlt":
        rec.update(dlt_version=out.get("dlt_version"), tables=out.get("tables"),
                   dlt_meta_files=out.get("dlt_meta_files"), parquet_row_groups=out.get("parquet", {}).get("row_groups"),
                   parquet_compression=out.get("parquet", {}).get("compression"),
                   imports_in_timed_part=out.get("imports_in_run"))
    if profile:
        rec["profile"] = str(profile.relative_to(REPO))
    print(f" {rec['wall_s']:8.2f} s  {rec['events_per_s']:>10,} ev/s  {rec['peak_rss_mb']:>8} MB", flush=True)
    return rec


# ------------------------------------------------------------------------------- backfill
def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    import httpx

    response = httpx.post(url, json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    if "errors" in body:
        raise RuntimeError(f"GraphQL error: {body['errors']}")
    return body["data"]


class _TreeSampler(threading.Thread):
    """Samples the process tree under ``pid``: peak RSS (VmHWM) of run workers and of the whole tree."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.run_hwm_kb: dict[int, int] = {}
        self.tree_rss_kb = 0

    @staticmethod
    def _hwm_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        import psutil

        while not self.stop_event.is_set():
            try:
                procs = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    cmd = " ".join(p.cmdline())
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
                # Run workers: `dagster api execute_run`, or (code server launches) a multiprocessing
                # spawn child of `dagster api grpc`.
                if "execute_run" in cmd or "execute_step" in cmd or "spawn_main" in cmd:
                    hwm = self._hwm_kb(p.pid)
                    self.run_hwm_kb[p.pid] = max(hwm, self.run_hwm_kb.get(p.pid, 0))
            self.tree_rss_kb = max(self.tree_rss_kb, total // 1024)
            self.stop_event.wait(self.interval)


def bench_backfill(days: int, events_per_day: int, days_per_run: int | None, keep: bool = False,
                   documented: bool = False) -> dict:
    """An asset backfill of ``days`` days ending yesterday through ``dagster dev``, timed to completion.

    ``documented`` False (record ``backfill_365``): the seven event-type exports and the manifest
    (``userpilot_files: []``); True (record ``backfill_365_documented``): also Userpilot's documented
    files the sync job writes by default (user and company snapshots, feature-tag files)."""
    root = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    home, jobs, exports = root / "dagster_home", root / "sync_jobs", root / "exports"
    for d in (home, jobs, exports):
        d.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    today = datetime.now(timezone.utc).date()
    first = today - timedelta(days=days)  # the backfill covers [first, yesterday]
    per_run = f"backfill_days_per_run: {days_per_run}\n" if days_per_run else ""
    (jobs / "bench.yaml").write_text(
        "name: bench\nsync_id: \"90002\"\napp_token: NX-bench0002\n"
        f"source: {{kind: demo, events_per_day: {events_per_day}, seed: {SEED}}}\n"
        f"destination: {{kind: local, path: {json.dumps(str(exports))}, prefix: userpilot_events}}\n"
        "formats: [{format: parquet, compression: zstd}]\n"
        + ("" if documented else "userpilot_files: []\n")
        + f"{per_run}schedules_running: false\nbackfill_days: 0\n"
    )
    port = _free_port()
    env = dict(_env(), DAGSTER_HOME=str(home), USERPILOT_SYNC_JOBS_DIR=str(jobs),
               USERPILOT_SYNC_STAGING_DIR=str(root / "staging"))
    log = open(root / "dagster_dev.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/graphql"
    sampler = _TreeSampler(proc.pid)
    print(f"  backfill  {days} days x {events_per_day:,} events{', documented files on' if documented else ''} (dagster dev on 127.0.0.1:{port}) ...", end="", flush=True)
    try:
        deadline = time.monotonic() + 240
        location = None
        while location is None:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited: {(root / 'dagster_dev.log').read_text()[-3000:]}")
            try:
                data = _gql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    location = entries[0]["name"]
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the code location did not load within 240 s")
            time.sleep(1)
        nodes = _gql(url, "{ assetNodes { assetKey { path } isPartitioned } }")["assetNodes"]
        selection = [{"path": n["assetKey"]["path"]} for n in nodes
                     if n["isPartitioned"] and n["assetKey"]["path"][0] == "bench"]
        keys = [(first + timedelta(days=i)).isoformat() for i in range(days)]
        # the partitions are the window, added by the userpilot_partition_window sensor at daemon start
        while True:
            listed = _gql(url, """{ assetNodeOrError(assetKey: {path: ["bench", "track"]}) { ... on AssetNode {
                                     partitionKeysByDimension { partitionKeys } } } }""")["assetNodeOrError"]
            if set(keys) <= set(listed["partitionKeysByDimension"][0]["partitionKeys"]):
                break
            if time.monotonic() > deadline + 120:
                raise TimeoutError("the partition window sensor did not add the backfill's days")
            time.sleep(1)
        sampler.start()
        t0 = time.perf_counter()
        launched = _gql(
            url,
            """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
                 ... on InvalidSubsetError { message } ... on UnauthorizedError { message } } }""",
            {"p": {"partitionNames": keys, "assetSelection": selection}},
        )["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"launchPartitionBackfill failed: {launched}")
        backfill_id = launched["backfillId"]
        status = None
        while True:
            status = _gql(url, """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                                    ... on PartitionBackfill { status } } }""",
                          {"id": backfill_id})["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING"):
                break
            if time.perf_counter() - t0 > 3600:
                raise TimeoutError("the backfill did not finish within an hour")
            time.sleep(1)
        wall = time.perf_counter() - t0
        runs = _gql(url, """query($t: [ExecutionTag!]) { runsOrError(filter: {tags: $t}) {
                              ... on Runs { results { runId status startTime endTime } } } }""",
                    {"t": [{"key": "dagster/backfill", "value": backfill_id}]})["runsOrError"]["results"]
        sampler.stop_event.set()
        sampler.join(5)
        from userpilot_sync.destination.manifest import rows_by_event_type

        manifests = list(exports.rglob("_manifest.json"))
        exported = sum(sum(rows_by_event_type(json.loads(m.read_text())).values()) for m in manifests)
        run_walls = [r["endTime"] - r["startTime"] for r in runs if r["endTime"] and r["startTime"]]
        rec = _record(
            "backfill_365_documented" if documented else "backfill_365", exported, wall,
            max(sampler.run_hwm_kb.values(), default=0), 0,
            days=days, events_per_day=events_per_day, backfill_status=status,
            backfill_days_per_run=days_per_run or 31, runs=len(runs),
            runs_succeeded=sum(r["status"] == "SUCCESS" for r in runs), manifests=len(manifests),
            run_wall_s_max=round(max(run_walls, default=0), 1), run_wall_s_sum=round(sum(run_walls), 1),
            dagster_tree_peak_rss_mb=round(sampler.tree_rss_kb / 1024, 1),
            peak_rss_note="max VmHWM of the run worker processes (sampled every 0.5 s)",
        )
        print(f" {status}: {wall:8.1f} s, {len(runs)} runs, {len(manifests)} manifests, "
              f"run peak {rec['peak_rss_mb']} MB", flush=True)
        return rec
    finally:
        sampler.stop_event.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        if keep:
            print(f"  (kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------- report
def machine() -> dict:
    import importlib.metadata as md

    mem_kb = 0
    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(fh.readline().split()[1])
    except OSError:
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("polars", "pyarrow", "pandas", "pandera", "dagster", "boto3", "moto"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dlt_version = _dlt_version()
    if dlt_version:
        versions["dlt (.venv-dlt)"] = dlt_version
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def targets(records: list[dict]) -> list[str]:
    """The performance issue's targets, evaluated on this run's records.

    Ratios are taken at 5M events when 5M was measured, else at the largest size both contenders
    have (the line names the size); exporter ahead of dlt at the largest size both have.
    """
    by = {(r["name"], r["events"]): r for r in records if r["name"] != "backfill_365"}
    sizes = sorted({e for (n, e) in by if n == "exporter"})
    lines = []

    def at(other: str) -> int | None:
        """5M when both the exporter and ``other`` have it, else the largest size they share."""
        shared = [n for n in sizes if (other, n) in by]
        return 5_000_000 if 5_000_000 in shared else (shared[-1] if shared else None)

    def rate_line(other: str, n: int | None, target: float, label: str) -> None:
        if n is None:
            return
        ratio = by[("exporter", n)]["events_per_s"] / by[(other, n)]["events_per_s"]
        lines.append(f"exporter/{other} events/s at N={n:,}: {ratio:.2f}x (target {label}) "
                     f"{'OK' if ratio >= target else 'MISSED'}")

    rate_line("naive", at("naive"), 5, ">= 5x at 5M")
    rate_line("floor", at("floor"), 0.7, ">= 0.7x at 5M")
    shared = [n for n in sizes if ("dlt", n) in by]
    if shared:
        n = shared[-1]
        ex, dl = by[("exporter", n)], by[("dlt", n)]
        ratio = ex["events_per_s"] / dl["events_per_s"]
        lines.append(f"exporter ahead of dlt (events/s) at N={n:,}: {ex['events_per_s']:,} vs {dl['events_per_s']:,} "
                     f"= {ratio:.2f}x (target > 1x) {'OK' if ratio > 1 else 'MISSED'}")
    if sizes:
        for n in [n for n in sizes if n in (5_000_000, 10_000_000)] or [sizes[-1]]:
            rss = by[("exporter", n)]["peak_rss_mb"]
            lines.append(f"exporter peak RSS at N={n:,}: {rss} MB (target <= 600 MB at 5M and 10M) "
                         f"{'OK' if rss is not None and rss <= 600 else 'MISSED'}")
        base = 1_000_000 if 1_000_000 in sizes else sizes[0]
        for n in [n for n in sizes if n > base]:
            ratio = by[("exporter", n)]["peak_rss_mb"] / by[("exporter", base)]["peak_rss_mb"]
            lines.append(f"exporter peak RSS N={n:,} / N={base:,}: {ratio:.2f}x (target <= 1.2x the 1M peak) "
                         f"{'OK' if ratio <= 1.2 else 'MISSED'}")
    for r in records:
        if r["name"] == "backfill_365":
            ok = r["wall_s"] <= 300 and r["backfill_status"] in ("COMPLETED", "COMPLETED_SUCCESS")
            lines.append(f"backfill {r['days']} days x {r['events_per_day']:,}: {r['wall_s']:.0f} s wall, status "
                         f"{r['backfill_status']} (target <= 300 s) {'OK' if ok else 'MISSED'}")
    return lines


def table(records: list[dict]) -> str:
    head = f"{'name':<18} {'events':>11} {'wall_s':>9} {'events/s':>11} {'MB/s':>8} {'peak_rss_mb':>12}"
    lines = [head, "-" * len(head)]
    for r in records:
        rate = f"{r['events_per_s']:,}" if r["events_per_s"] is not None else "-"
        lines.append(f"{r['name']:<18} {r['events']:>11,} {r['wall_s']:>9.2f} {rate:>11} "
                     f"{r['mb_per_s'] if r['mb_per_s'] is not None else '-':>8} {r['peak_rss_mb'] or '-':>12}")
    for r in records:
        if r.get("stages") and r["name"] in EXPORT_CONTENDERS:
            lines.append(f"  {r['name']} N={r['events']:,} stages (s): " + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["stages"].items()))
        if r["name"] == "snapshot_1m":
            lines.append(f"  snapshot_1m: {r['users']:,} users, {r['companies']:,} companies, delta rows "
                         f"{r['delta_rows']['all_users']:,} users / {r['delta_rows']['all_companies']:,} companies, "
                         f"all_users {r['output_bytes']:,} bytes, peak RSS reached in {r['peak_rss_reached_in']}; "
                         "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items()))
        elif r["name"] == "snapshot_1m_replay":
            lines.append(f"  snapshot_1m_replay: prior_state of {r['day']} = full state of {r['base_state']} "
                         f"+ {r['deltas_replayed']} deltas")
    return "\n".join(lines)


def contenders_at(size: int, only: set[str], only_given: bool) -> list[str]:
    """The export contenders run on a day of ``size`` events: those of --only, and by default (no
    explicit --only) only LARGE_DAY_CONTENDERS on days of LARGE_DAY events or more."""
    names = [c for c in EXPORT_CONTENDERS if c in only]
    if size >= LARGE_DAY and not only_given:
        names = [c for c in names if c in LARGE_DAY_CONTENDERS]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000,10000000",
                        help="events per day to export (comma-separated, default %(default)s); days of "
                             f"{LARGE_DAY:,} events or more run only {' and '.join(LARGE_DAY_CONTENDERS)} "
                             "unless --only is given")
    parser.add_argument("--backfill-days", type=int, default=365)
    parser.add_argument("--backfill-events", type=int, default=20000, help="events per day in the backfill")
    parser.add_argument("--backfill-days-per-run", type=int, default=None,
                        help="override the sync job's backfill_days_per_run (default: the model default, 31)")
    parser.add_argument("--snapshot-users", type=int, default=1_000_000,
                        help="identified users of the snapshot benchmarks (snapshot_1m, snapshot_1m_replay)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of exporter,naive,floor,dlt,backfill_365,snapshot_1m,"
                             "snapshot_1m_replay,backfill_365_documented; default: all but snapshot_1m_replay "
                             f"(it replays 29 days of deltas) and backfill_365_documented, and at sizes of {LARGE_DAY:,} events or more only "
                             f"{' and '.join(LARGE_DAY_CONTENDERS)} (naive would need ~7 GB). Given "
                             "explicitly, its contenders run at every size. dlt runs in .venv-dlt/ "
                             "(make bench-dlt-env) and is skipped when that is missing")
    parser.add_argument("--quick", action="store_true",
                        help="small run: sizes 100000,500000, backfill 31 days x 5,000 events, "
                             "50,000 snapshot users")
    parser.add_argument("--baseline", action="store_true", help="also write benchmarks/results/baseline.json")
    parser.add_argument("--profile", action="store_true",
                        help="run the exporter under py-spy (speedscope files in benchmarks/results/); "
                             "RSS then comes from the child's own getrusage")
    parser.add_argument("--keep-backfill", action="store_true", help="keep the backfill's temporary folder")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the records of --out whose name this run did not measure (e.g. add "
                             "snapshot_1m to a full run's latest.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.backfill_days, args.backfill_events = "100000,500000", 31, 5000
        args.snapshot_users = 50_000
    sizes = [int(s) for s in args.sizes.split(",") if s]
    only_given = args.only is not None
    only = {n for n in (args.only or "exporter,naive,floor,dlt,backfill_365,snapshot_1m").split(",") if n}
    unknown = only - {*EXPORT_CONTENDERS, "backfill_365", "backfill_365_documented", "snapshot_1m", "snapshot_1m_replay"}
    if unknown:
        parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")
    skipped = []
    if "dlt" in only and not DLT_PYTHON.exists():
        skipped.append(f"dlt: skipped, {DLT_PYTHON.relative_to(REPO)} is missing (create it with `make bench-dlt-env`)")
        print(skipped[-1], flush=True)
        only.discard("dlt")
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpus']} cpu ({info['cpu']}), {info['ram_gib']} GiB, Python {info['python']}, "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), flush=True)
    records: list[dict] = []
    started = time.perf_counter()
    plan = [(n, contenders_at(n, only, only_given)) for n in sizes]
    plan = [(n, names) for n, names in plan if names]
    if plan:
        for n, names in plan:
            if n >= LARGE_DAY and not only_given:
                left_out = [c for c in EXPORT_CONTENDERS if c in only and c not in names]
                if left_out:
                    print(f"N={n:,}: {', '.join(names)} only ({', '.join(left_out)} not by default at "
                          f">= {LARGE_DAY:,} events; --only overrides)", flush=True)
            dataset(n)
        server = S3Server()
        try:
            for n, names in plan:
                for name in names:
                    profile_dir = RESULTS if (args.profile and name == "exporter") else None
                    records.append(bench_export(name, n, server, profile_dir))
        finally:
            server.close()
    for name in ("backfill_365", "backfill_365_documented"):
        if name in only and args.backfill_days > 0:
            records.append(bench_backfill(args.backfill_days, args.backfill_events, args.backfill_days_per_run,
                                          keep=args.keep_backfill, documented=name.endswith("_documented")))
    if "snapshot_1m" in only and args.snapshot_users > 0:
        records.append(bench_snapshot(args.snapshot_users))
    if "snapshot_1m_replay" in only and args.snapshot_users > 0:
        records.append(bench_snapshot_replay(args.snapshot_users))
    print()
    print(table(records))
    print()
    for line in targets(records):
        print(line)
    doc = records
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = None
    if args.merge and out.exists():
        measured = {r["name"] for r in records}
        kept = [r for r in json.loads(out.read_text()) if r["name"] not in measured]
        doc = kept + records
        old_meta = out.with_name(out.stem + ".meta.json")
        before = json.loads(old_meta.read_text()) if old_meta.exists() else {}
        note = (f"merged: {', '.join(sorted(measured))} measured at measured_at; "
                f"{', '.join(dict.fromkeys(r['name'] for r in kept))} kept from the previous {out.name} "
                f"(its measured_at {before.get('measured_at')}; its note: {before.get('note')})")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    meta = {"machine": info, "bench_day": BENCH_DAY, "seed": SEED, "total_s": round(time.perf_counter() - started, 1),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "targets": targets(doc),
            "load_average_end": _loadavg()}
    if note:
        meta["note"] = note
    if plan:
        meta["contenders_by_size"] = {str(n): names for n, names in plan}
    if skipped:
        meta["skipped"] = skipped
    out.with_name(out.stem + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.baseline:
        (RESULTS / "baseline.json").write_text(json.dumps(doc, indent=2) + "\n")
        (RESULTS / "baseline.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} ({time.perf_counter() - started:.0f} s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
