"""Helpers of the fault-injection suite (``test_faults.py``).

* sync-job files, Dagster homes and environments for the CLI and for ``dagster dev``;
* :func:`wait_for_pause` / :func:`kill_worker`: the pause points of ``userpilot_sync/faults.py``
  (the first process reaching an armed point writes ``<pause dir>/<point>`` with its pid and
  sleeps; the test kills that pid with SIGKILL);
* destination views (local folder, S3 through the moto admin client) that read what a reader of
  the bucket would see: the day's files, its manifest, hidden temp files, open multipart uploads;
* :func:`reference_export`: a clean export of the same day, made without Dagster
  (``pipeline.sync_partition``) into a folder of its own — the expected bytes and event ids;
* :class:`DagsterDev` (``fixtures_core``, imported here for the suite): ``dagster dev`` (webserver +
  daemon) on a test ``DAGSTER_HOME`` with short intervals, driven over GraphQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.journal import JOURNAL_FOLDER
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.manifest import READABLE_STATUSES
from userpilot_sync.faults import PAUSE_AT_ENV, PAUSE_DIR_ENV, POINTS
from userpilot_sync.procs import process_alive
from userpilot_sync_tests.fixtures_core import DagsterDev  # noqa: F401 (the fault suite's import)

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "_manifest.json"
DAY_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------ sync jobs, homes, env
def sync_job_data(name: str, sync_id: str, destination: dict, *, app_token: str = "NX-fault0001",
                  events_per_day: int = 400, seed: int = 11, **extra) -> dict:
    """A demo sync job (stopped schedules, no initial backfill) as a dict for YAML and SyncJob."""
    data = {
        "name": name,
        "sync_id": sync_id,
        "title": f"fault injection: {name}",
        "app_token": app_token,
        "source": {"kind": "demo", "events_per_day": events_per_day, "seed": seed},
        "destination": destination,
        "formats": [{"format": "parquet", "compression": "zstd"}],
        "schedules_running": False,
        # a few hundred events a day leave some event types empty on some days: a WARN, not exit code 3
        "checks": {"empty_days": "warn"},
    }
    data.update(extra)
    return data


def local_destination(folder: Path) -> dict:
    return {"kind": "local", "path": str(folder), "prefix": "userpilot_events"}


def s3_destination(endpoint: str, bucket: str, **extra) -> dict:
    return {"kind": "s3", "bucket": bucket, "prefix": "userpilot_events", "region": "us-east-1",
            "endpoint_url": endpoint, **extra}


def write_sync_jobs(folder: Path, jobs: list[dict]) -> list[SyncJob]:
    """One YAML file per sync job in ``folder``; returns the validated sync jobs."""
    folder.mkdir(parents=True, exist_ok=True)
    for data in jobs:
        (folder / f"{data['name']}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return [SyncJob.model_validate(data) for data in jobs]


def dagster_home(folder: Path, *, fast: bool = False) -> Path:
    """A fresh ``DAGSTER_HOME`` with ``deploy/dagster.yaml`` (pools limit 1, run monitoring on);
    ``fast``: run monitoring every second and a run queue that dequeues every second (for tests
    of the daemon). The start timeout stays the deployment's (180 s): a run process needs about
    10 s of imports on idle cores, but several times that while the other pytest-xdist worker and
    the other run processes share the 2 cores, and a run failed for a slow start never reaches its
    pause point."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    if fast:
        config["run_monitoring"].update({"poll_interval_seconds": 1, "cancel_timeout_seconds": 60})
        config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                                     "config": {"dequeue_interval_seconds": 1}}
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def project_env(home: Path, jobs_dir: Path, staging: Path, *, aws_keys: tuple[str, str] | None = None,
                pause_at: list[str] | None = None, pause_dir: Path | None = None) -> dict[str, str]:
    """Environment for the CLI or ``dagster dev``: the test instance, sync jobs, staging root,
    AWS credentials (the moto ``writer``: write-only) and the pause points."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "USERPILOT_SYNC_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), USERPILOT_SYNC_JOBS_DIR=str(jobs_dir),
               USERPILOT_SYNC_STAGING_DIR=str(staging), AWS_EC2_METADATA_DISABLED="true",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    if aws_keys:
        env.update(AWS_ACCESS_KEY_ID=aws_keys[0], AWS_SECRET_ACCESS_KEY=aws_keys[1])
    if pause_at:
        assert pause_dir is not None and set(pause_at) <= set(POINTS)
        env.update({PAUSE_AT_ENV: ",".join(pause_at), PAUSE_DIR_ENV: str(pause_dir)})
    return env


def cli_sync(job: str, *days: str, range_to: str | None = None) -> list[str]:
    """``python -m userpilot_sync.cli sync --job JOB --partition D`` (or ``--from D --to range_to``)."""
    cmd = [sys.executable, "-m", "userpilot_sync.cli", "sync", "--job", job]
    if range_to:
        return cmd + ["--from", days[0], "--to", range_to]
    for day in days:
        cmd += ["--partition", day]
    return cmd


def run_cli(cmd: list[str], env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run a CLI command to its end; returns the result and its wall time (s)."""
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def export_in_process(job: SyncJob, home: Path, staging: Path, pk: str, monkeypatch,
                      aws_keys: tuple[str, str] | None = None) -> str:
    """A complete export of ``pk`` into ``job``'s destination, recorded in the instance at ``home``,
    run in the test process (``execute_in_process``, as the CLI does, without its ~10 s of imports
    in a new process). Returns the run id."""
    import dagster as dg

    from userpilot_sync.cli import failure_messages
    from userpilot_sync.defs.project import build_definitions
    from userpilot_sync_tests.fixtures_core import run_sync

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    if aws_keys:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_keys[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_keys[1])
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    defs = build_definitions([job], staging)
    with dg.DagsterInstance.get() as instance:
        result = run_sync(defs, instance, pk, job_name=f"{job.name}_sync")
        assert result.success, failure_messages(result)
        return result.run_id


# ------------------------------------------------------------------------------------ pause points
def wait_for_pause(pause_dir: Path, point: str, timeout: float, alive: Callable[[], bool] | None = None,
                   describe: Callable[[], str] | None = None) -> int:
    """The pid written to ``<pause_dir>/<point>`` once a process paused there (it then sleeps)."""
    marker = Path(pause_dir) / point
    deadline = time.monotonic() + timeout
    next_probe = 0.0
    while True:
        try:
            text = marker.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit():
            return int(text)
        probe = alive is not None and time.monotonic() >= next_probe
        if probe:
            next_probe = time.monotonic() + 1.0  # at most one liveness probe a second
        if probe and not alive():
            raise AssertionError(f"the run ended before it reached the pause point {point!r}\n"
                                 + (describe() if describe else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"no process reached the pause point {point!r} within {timeout:.0f} s\n"
                                 + (describe() if describe else ""))
        time.sleep(0.1)


def arm(pause_dir: Path, point: str) -> None:
    """Make ``point`` pause the next process that reaches it (remove its marker)."""
    (Path(pause_dir) / point).unlink(missing_ok=True)


def disarm_all(pause_dir: Path) -> None:
    """Let every process pass every point (a marker file that names no pid)."""
    Path(pause_dir).mkdir(parents=True, exist_ok=True)
    for point in POINTS:
        (Path(pause_dir) / point).write_text("disarmed")


def kill_worker(pid: int, timeout: float = 10) -> None:
    """SIGKILL ``pid`` (the run worker in a pause point) and wait until it is gone (or a zombie)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ destinations
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def event_ids(files: dict[str, bytes]) -> Counter:
    """``internal_event_id`` of every row of the event-type Parquet files among ``files`` (name ->
    bytes); Userpilot's documented files (``all_users``, ...) in the same date folders are skipped —
    readers select files by name, never by ``*.parquet``."""
    import pyarrow.parquet as pq

    from userpilot_sync.schema.events import EVENT_TYPES

    ids: Counter = Counter()
    for name, data in files.items():
        stem = name.rsplit("/", 1)[-1].split(".")[0]
        event_type = next((et for et in EVENT_TYPES if stem == et or stem.startswith(f"{et}_0")), None)
        if name.endswith(".parquet") and event_type is not None:
            ids.update(pq.read_table(io.BytesIO(data), columns=["internal_event_id"]).column(0).to_pylist())
    return ids


class DestinationView:
    """What a reader of the destination sees (the test may list and read; the exporter may not)."""

    kind: str

    def __init__(self, job: SyncJob):
        self.job = job
        self.layout = layout_for(job)

    def get(self, relative_path: str) -> bytes | None:  # path relative to the sync folder
        raise NotImplementedError

    def day_names(self, pk: str) -> list[str]:
        """Visible object names in the day's folder (data files and the manifest)."""
        raise NotImplementedError

    def tmp_files(self) -> list[str]:
        return []

    def open_uploads(self) -> list[str]:
        return []

    def day_files(self, pk: str) -> dict[str, bytes]:
        """The day's data files (name -> bytes), the manifest left out."""
        return {n: self.get(f"{pk}/{n}") for n in self.day_names(pk) if n != MANIFEST}

    def manifest(self, pk: str) -> dict | None:
        data = self.get(f"{pk}/{MANIFEST}")
        return json.loads(data) if data is not None else None

    def check_manifest(self, pk: str) -> str | None:
        """The day's manifest status (None: no manifest). A readable manifest (complete/empty) must
        list only files that exist with exactly its sha256 (assert)."""
        manifest = self.manifest(pk)
        if manifest is None:
            return None
        if manifest["status"] in READABLE_STATUSES:
            for entry in manifest["files"]:
                data = self.get(entry["path"])
                assert data is not None, f"manifest {manifest['status']} of {pk} lists a missing file {entry['path']}"
                assert sha256(data) == entry["sha256"], f"manifest of {pk} lists a partial/other file {entry['path']}"
                assert len(data) == entry["bytes"], entry["path"]
        return manifest["status"]


class LocalView(DestinationView):
    kind = "local"

    @property
    def root(self) -> Path:
        return Path(self.job.destination.path)

    def _path(self, relative_path: str) -> Path:
        return self.root / self.layout.key(relative_path)

    def get(self, relative_path: str) -> bytes | None:
        path = self._path(relative_path)
        return path.read_bytes() if path.is_file() else None

    def day_names(self, pk: str) -> list[str]:
        folder = self._path(pk)
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def tmp_files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(".*.tmp")) \
            if self.root.is_dir() else []


class S3View(DestinationView):
    kind = "s3"

    def __init__(self, job: SyncJob, admin: Any):
        super().__init__(job)
        self.admin = admin
        self.bucket = job.destination.bucket

    def get(self, relative_path: str) -> bytes | None:
        try:
            return self.admin.get_object(Bucket=self.bucket, Key=self.layout.key(relative_path))["Body"].read()
        except self.admin.exceptions.NoSuchKey:
            return None

    def day_names(self, pk: str) -> list[str]:
        prefix = self.layout.key(f"{pk}/")
        listed = self.admin.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"][len(prefix):] for o in listed)

    def open_uploads(self) -> list[str]:
        uploads = self.admin.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(f"s3 multipart upload {u['Key'].rsplit('/', 2)[-2]}/{u['Key'].rsplit('/', 1)[-1]}"
                      for u in uploads)


def view_of(job: SyncJob, moto: Any = None) -> DestinationView:
    return S3View(job, moto.client("admin")) if job.destination.kind == "s3" else LocalView(job)


def staging_leftovers(staging_root: Path, job_name: str) -> list[str]:
    """What runs left under the staging root for ``job_name``: temp folders (``.staging-*``,
    ``.work-*``), staged day folders, pending upload-journal records (``.uploads/*.json``)."""
    job_dir = Path(staging_root) / job_name
    found = []
    if job_dir.is_dir():
        for p in sorted(job_dir.iterdir()):
            if p.is_dir() and (p.name.startswith((".staging-", ".work-")) or DAY_FOLDER.fullmatch(p.name)):
                found.append(f"staging {p.name}/")
        journal = job_dir / JOURNAL_FOLDER
        found += [f"journal record {p.name}" for p in sorted(journal.glob("*.json"))] if journal.is_dir() else []
    return found


def leftovers(view: DestinationView, staging_root: Path) -> list[str]:
    """Every leftover of a killed run this suite looks for (see :func:`staging_leftovers`), plus
    hidden temp files in a local destination and open S3 multipart uploads."""
    return (staging_leftovers(staging_root, view.job.name) + [f"tmp file {t}" for t in view.tmp_files()]
            + view.open_uploads())


# ------------------------------------------------------------------------------------ reference exports
@dataclass(frozen=True)
class Reference:
    """A clean export of one day: data-file bytes by name and the exported event ids."""

    hashes: dict[str, str]
    ids: Counter
    rows_by_event_type: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(self.ids.values())


_REFERENCES: dict[tuple[str, str], Reference] = {}
_REFERENCES_LOCK = threading.Lock()
#: Settings that name a sync job but do not shape its data files (the demo's rows depend on the
#: source, the app token, filters and formats; the sync id and name only on the folder and manifest).
_IDENTITY = {"source_file", "destination", "name", "sync_id", "title", "owners", "schedules_running",
             "backfill_days_per_run"}


def reference_export(job: SyncJob, pk: str, folder: Path) -> Reference:
    """Export ``pk`` of ``job``'s settings into a local folder of its own, without Dagster and
    without faults (``pipeline.sync_partition``); cached per (data settings, day)."""
    with _REFERENCES_LOCK:
        return _reference_export(job, pk, folder)


def _reference_export(job: SyncJob, pk: str, folder: Path) -> Reference:
    from userpilot_sync.destination.manifest import rows_by_event_type
    from userpilot_sync.pipeline import sync_partition

    settings = job.model_dump(mode="json", exclude=_IDENTITY)
    settings["destination_prefix"] = job.destination.prefix
    cache_key = (json.dumps(settings, sort_keys=True), pk)
    if cache_key not in _REFERENCES:
        data = job.model_dump(mode="json", exclude={"source_file"})
        data["destination"] = local_destination(folder / "exports")
        ref_job = SyncJob.model_validate(data)
        manifest = sync_partition(ref_job, pk, folder / "staging").manifest
        files = LocalView(ref_job).day_files(pk)
        assert manifest["status"] == "complete" and sorted(files) == sorted(f["path"].split("/")[-1]
                                                                            for f in manifest["files"])
        _REFERENCES[cache_key] = Reference({n: sha256(b) for n, b in files.items()}, event_ids(files),
                                           rows_by_event_type(manifest))
    return _REFERENCES[cache_key]


# ------------------------------------------------------------------------------------ figures
def figures_table(report: dict, path: Path) -> list[str]:
    """The figures ``test_faults.py`` wrote to ``path`` as table lines (the same columns it prints
    at the end of its module; under pytest-xdist the controller prints these, see ``conftest.py``)."""
    lines = ["fault injection figures (" + str(path) + "):",
             f"{'case':<34} {'kill point':<16} {'dest':<5} {'launcher':<8} {'re-run':<7} {'recovery s':>10} "
             f"{'rows':>6} {'lost':>4} {'dup':>4}  leftovers at kill -> after re-run"]
    for r in report.get("cases", []):
        lines.append(
            f"{r['case']:<34} {r['kill_point']:<16} {r['destination']:<5} {r['launcher']:<8} {r['rerun_by']:<7} "
            f"{r['recovery_s']:>10.1f} {r['rows_expected']:>6} {r['rows_lost']:>4} {r['rows_duplicated']:>4}  "
            f"{len(r['leftovers_at_kill'])} ({'; '.join(r['leftovers_at_kill']) or '-'}) -> "
            f"{len(r['leftovers_after'])}")
    lines.append(f"module wall time: {report.get('suite_wall_time_s', 0):.1f} s")
    return lines
