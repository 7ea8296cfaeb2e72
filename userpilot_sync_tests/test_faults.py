"""Fault injection: export runs killed with SIGKILL at exact moments, and the next run recovers alone.

Kill points are the pause points of ``userpilot_sync/faults.py`` (``staged``, ``uploading``,
``multipart`` — S3 only —, ``before_manifest``): the first process reaching an armed point writes
its pid to ``<pause dir>/<point>`` and sleeps; the test kills that pid — the *run worker*: the CLI
process itself, or for a run the daemon launched, the run's own process (not the daemon's).

The matrix covers every kill point on every destination (a local folder, S3 on a moto server over
loopback with the write-only ``writer`` credential: PutObject + AbortMultipartUpload) and each
launcher (the CLI, and runs queued in ``dagster dev`` and started by its daemon), not the whole
product. For every case it asserts, with values:

1. the re-run of the same day completes without manual action, in a bounded time (measured);
2. 0 rows lost and 0 duplicated by ``internal_event_id`` against a clean reference export of the
   same day (``pipeline.sync_partition`` into a folder of its own, no Dagster, no faults);
3. byte-identical files (sha256) to the reference;
4. no manifest lists a missing or partial file: at the kill, after it and after the re-run, a
   ``complete``/``empty`` manifest lists only files that exist with its sha256; a kill during a
   re-export leaves ``replacing``;
5. no leftovers after the next run: no ``.staging-*``/``.work-*`` folders or staged days under the
   staging root, no pending upload-journal records (``<staging root>/<sync job>/.uploads``), no
   hidden ``.*.tmp`` files in a local destination, no open S3 multipart uploads (listed by the
   test with the admin credential; the exporter never lists).

Plus a range run and a single-day run of an overlapping day started together on a fresh
``DAGSTER_HOME``: both finish, in bounded time, every day complete.

The figures of every case (kill point, destination, launcher, recovery time, rows lost/duplicated,
leftovers found/cleaned) are written to ``fault_injection_figures.json`` in pytest's base temp
folder and printed as a table at the end of the module (``docs/operations.md`` quotes them).
Run: ``.venv/bin/python -m pytest -m faults``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from userpilot_sync.defs.instance import open_instance
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import sync_window_partitions
from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.faults import POINTS
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_faults import (
    MiB,
    REPO,
    DagsterDev,
    arm,
    cli_sync,
    dagster_home,
    disarm_all,
    event_ids,
    export_in_process,
    kill_worker,
    leftovers,
    local_destination,
    project_env,
    reference_export,
    run_cli,
    s3_destination,
    sha256,
    sync_job_data,
    view_of,
    wait_for_pause,
    write_sync_jobs,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: The day every fault case exports (each case has its own sync job, destination and instance).
DAY = last_complete_days(3)[0].isoformat()
#: The days of the concurrent range run (D1..D4) and single-day run (D1).
RANGE_DAYS = [d.isoformat() for d in last_complete_days(12)[:4]]
#: A bounded recovery: the re-run must complete within this (seconds). Required: < 5 minutes.
RECOVERY_LIMIT_S = 300
EVENTS = 400
#: The multipart case (page_view only): enough events that page_view.ndjson (uncompressed, about
#: 570 bytes a row, 40 % of the demo's events) is above the smallest multipart threshold the
#: configuration allows (5 MiB): about 6 MB, uploaded in two parts of at most 5 MiB.
MULTIPART_EVENTS = 26000


@dataclass(frozen=True)
class Case:
    point: str  # the pause point the run is killed at
    destination: str  # local | s3
    launcher: str  # who launched the killed run: cli | daemon
    rerun: str  # who launched the re-run: cli | daemon
    reexport: bool  # the day was exported completely before the killed run

    @property
    def id(self) -> str:
        return f"{self.point}-{self.destination}-{self.launcher}"

    @property
    def job_name(self) -> str:
        return f"{self.launcher[0]}_{self.point}_{self.destination}"

    @property
    def manifest_at_kill(self) -> str | None:
        """The manifest a reader finds while the killed run is paused (and after the kill)."""
        if not self.reexport:
            return None  # a first export writes no manifest before its complete one
        return "complete" if self.point == "staged" else "replacing"


CLI_CASES = [
    Case("staged", "local", "cli", "cli", reexport=True),
    Case("uploading", "s3", "cli", "cli", reexport=True),
    Case("multipart", "s3", "cli", "cli", reexport=False),
    Case("before_manifest", "local", "cli", "cli", reexport=True),
]
DAEMON_CASES = [
    Case("uploading", "local", "daemon", "cli", reexport=False),
    Case("staged", "s3", "daemon", "cli", reexport=False),
    Case("before_manifest", "s3", "daemon", "daemon", reexport=True),
]
ALL_CASES = CLI_CASES + DAEMON_CASES


def _job_data(case: Case, root: Path, moto) -> dict:
    sync_id = str(20000 + ALL_CASES.index(case))
    if case.destination == "local":
        return sync_job_data(case.job_name, sync_id, local_destination(root / f"exports_{case.job_name}"),
                             events_per_day=EVENTS)
    bucket = moto.create_bucket(f"faults-{case.job_name.replace('_', '-')}")
    if case.point == "multipart":
        return sync_job_data(
            case.job_name, sync_id,
            s3_destination(moto.endpoint, bucket, multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB),
            events_per_day=MULTIPART_EVENTS, filters={"event_types": ["page_view"]},
            formats=[{"format": "parquet", "compression": "zstd"}, {"format": "ndjson", "compression": "none"}])
    return sync_job_data(case.job_name, sync_id, s3_destination(moto.endpoint, bucket), events_per_day=EVENTS)


# ------------------------------------------------------------------------------------ figures
@pytest.fixture(scope="module", autouse=True)
def figures(request, tmp_path_factory):
    """Rows of figures, one per case; written to JSON and printed as a table at the module's end."""
    rows: list[dict] = []
    started = time.monotonic()
    yield rows
    report = {"suite_wall_time_s": round(time.monotonic() - started, 1), "cases": rows}
    path = tmp_path_factory.getbasetemp() / "fault_injection_figures.json"
    path.write_text(json.dumps(report, indent=2))
    lines = ["", "fault injection figures (" + str(path) + "):",
             f"{'case':<34} {'kill point':<16} {'dest':<5} {'launcher':<8} {'re-run':<7} {'recovery s':>10} "
             f"{'rows':>6} {'lost':>4} {'dup':>4}  leftovers at kill -> after re-run"]
    for r in rows:
        lines.append(
            f"{r['case']:<34} {r['kill_point']:<16} {r['destination']:<5} {r['launcher']:<8} {r['rerun_by']:<7} "
            f"{r['recovery_s']:>10.1f} {r['rows_expected']:>6} {r['rows_lost']:>4} {r['rows_duplicated']:>4}  "
            f"{len(r['leftovers_at_kill'])} ({'; '.join(r['leftovers_at_kill']) or '-'}) -> "
            f"{len(r['leftovers_after'])}")
    lines.append(f"module wall time: {report['suite_wall_time_s']:.1f} s")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    else:  # pragma: no cover - without the terminal reporter
        print("\n".join(lines))


# ------------------------------------------------------------------------------------ shared checks
def _state(view, staging: Path, pk: str) -> tuple[str | None, list[str]]:
    """The day's manifest status (readable manifests verified file by file) and the leftovers."""
    return view.check_manifest(pk), leftovers(view, staging)


def _verify_recovered(case_name: str, view, staging: Path, pk: str, reference, *, before: dict | None = None) -> dict:
    """Assert the day is complete and identical to the reference, and nothing is left over."""
    assert view.check_manifest(pk) == "complete"
    manifest = view.manifest(pk)
    files = view.day_files(pk)
    assert sorted(files) == sorted(reference.hashes), (case_name, sorted(files))
    assert sorted(f["path"].split("/")[-1] for f in manifest["files"]) == sorted(files)
    hashes = {name: sha256(data) for name, data in files.items()}
    expected = dict(reference.hashes)
    if case_name.startswith("concurrent"):
        # runs of different days in either order: a day's user/company snapshots depend on which
        # earlier days were exported before it, until the snapshot sensor's range run recomputes the
        # stale ones (proven in test_documented_files); every other file must be identical
        for name in ("all_users.parquet", "all_companies.parquet"):
            hashes.pop(name, None)
            expected.pop(name, None)
    assert hashes == expected, f"{case_name}: files differ from the clean reference export"
    if before is not None:
        assert hashes == before, f"{case_name}: files differ from the complete export before the kill"
    ids = event_ids(files)
    assert all(n == 1 for n in reference.ids.values())
    lost = sum((reference.ids - ids).values())
    duplicated = sum((ids - reference.ids).values())
    assert (lost, duplicated) == (0, 0), f"{case_name}: {lost} rows lost, {duplicated} duplicated"
    assert rows_by_event_type(manifest) == reference.rows_by_event_type
    left = leftovers(view, staging)
    assert left == [], f"{case_name}: leftovers after the next run: {left}"
    return {"rows_expected": reference.rows, "rows_exported": sum(ids.values()), "rows_lost": lost,
            "rows_duplicated": duplicated, "files": len(files), "bytes": sum(len(b) for b in files.values()),
            "bytes_identical": True, "leftovers_after": left, "manifest_after": manifest["status"],
            "manifest_run_id": manifest["run_id"]}


def _cleanup_lines(lines: list[str]) -> list[str]:
    """What a run logged about cleaning a killed run's leftovers (staging, upload journal)."""
    keys = ("left behind", "upload leftover")
    return [line.strip().removeprefix("warning: ") for line in lines if any(k in line for k in keys)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ CLI cases
@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_a_cli_run_killed_at_a_pause_point_is_recovered_by_the_next_run(case, tmp_path, request, monkeypatch,
                                                                         figures):
    moto = request.getfixturevalue("moto_s3") if case.destination == "s3" else None
    [job] = write_sync_jobs(tmp_path / "sync_jobs", [_job_data(case, tmp_path, moto)])
    home = dagster_home(tmp_path / "home")
    staging = tmp_path / "staging"
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    keys = moto.keys["writer"] if moto else None
    env = project_env(home, tmp_path / "sync_jobs", staging, aws_keys=keys, pause_at=[case.point], pause_dir=pauses)
    view = view_of(job, moto)
    reference = reference_export(job, DAY, tmp_path / "reference")
    sync = cli_sync(job.name, DAY)

    before = None
    if case.reexport:  # the day's complete export, before the run that is killed
        export_in_process(job, home, staging, DAY, monkeypatch, keys)
        assert view.check_manifest(DAY) == "complete"
        before = {name: sha256(data) for name, data in view.day_files(DAY).items()}
        assert before == reference.hashes

    victim_err = tmp_path / "victim.stderr"
    with open(victim_err, "w") as err:
        victim = subprocess.Popen(sync, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                  start_new_session=True)
    try:
        pid = wait_for_pause(pauses, case.point, 240, alive=lambda: victim.poll() is None,
                             describe=lambda: victim_err.read_text()[-3000:])
        assert pid == victim.pid  # the CLI runs the day in its own process: it is the run worker
        manifest_at_kill, at_kill = _state(view, staging, DAY)
        assert manifest_at_kill == case.manifest_at_kill
        if case.point == "multipart":  # an upload is open in the bucket, and recorded in the journal
            open_uploads = [x for x in at_kill if x.startswith("s3 multipart")]
            assert open_uploads == [f"s3 multipart upload {DAY}/page_view.ndjson"], at_kill
            assert any(x.startswith("journal record") for x in at_kill), at_kill
        kill_worker(pid)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    # after the crash a reader still finds no readable manifest that lies (replacing stays replacing)
    assert view.check_manifest(DAY) == case.manifest_at_kill

    again, recovery_s = run_cli(sync, env)  # the same command, no manual step in between
    assert again.returncode == 0, again.stderr[-3000:]
    assert recovery_s < RECOVERY_LIMIT_S
    assert "recovered from dead runs: marked failed (process gone)" in again.stderr, again.stderr[-2000:]
    cleanup = _cleanup_lines(again.stderr.splitlines())
    if case.point == "multipart":  # the killed upload was aborted from the journal's record, and said so
        assert any("multipart upload" in line and "aborted" in line for line in cleanup), again.stderr[-3000:]
        assert len(view.get(f"{DAY}/page_view.ndjson")) > job.destination.multipart_threshold_bytes
    result = _verify_recovered(case.id, view, staging, DAY, reference, before=before)
    figures.append({"case": case.id, "kill_point": case.point, "destination": case.destination,
                    "launcher": case.launcher, "rerun_by": case.rerun,
                    "export": "re-export" if case.reexport else "first export", "manifest_at_kill": manifest_at_kill,
                    "worker_killed": "the CLI process", "recovery_s": round(recovery_s, 1),
                    "dead_run_marked_failed_by": "userpilot_sync recovery in the CLI, before its run",
                    "pool_slot_freed_by": ("the run itself, done with the source before the kill"
                                           if case.point in ("uploading", "multipart", "before_manifest")
                                           else "userpilot_sync recovery in the CLI, before its run"),
                    "leftovers_at_kill": at_kill, "cleanup_logged": cleanup, **result})


# ------------------------------------------------------------------------------------ background cases
# The daemon cases (one after the other) and the concurrent-runs case run in background threads of
# the test process, started with the module: they mostly wait for processes of their own (dagster
# dev loading its code location, run workers, the run queue, sensor ticks, two CLI processes), so
# they overlap the CLI cases instead of adding to the suite's wall time on 2 cores. Each test then
# collects its case's outcome: the figures, or the assertion that failed (with its traceback). The
# CLI cases use pause folders of their own, so the daemon's armed pause point never catches a CLI
# run, nor the other way round; every case has its own sync job, destination and instance.
class DaemonCells:
    """``dagster dev`` on a test DAGSTER_HOME (``deploy/dagster.yaml`` plus run monitoring and a
    run queue polled every second), one sync job per daemon case, every pause point listed but
    disarmed (each case arms its own)."""

    def __init__(self, root: Path, moto, cases: list[Case]):
        self.root, self.moto = root, moto
        jobs = write_sync_jobs(root / "sync_jobs", [_job_data(case, root, moto) for case in DAEMON_CASES])
        self.jobs = {case.id: job for case, job in zip(DAEMON_CASES, jobs)}
        self.home = dagster_home(root / "home", fast=True)
        self.pauses = root / "pauses"
        self.staging = root / "staging"
        disarm_all(self.pauses)
        self.env = project_env(self.home, root / "sync_jobs", self.staging, aws_keys=moto.keys["writer"],
                               pause_at=list(POINTS), pause_dir=self.pauses)
        # Re-export cases: the day's complete export, recorded in the same instance, made here in
        # the test process (before any background thread: it sets DAGSTER_HOME and the AWS keys in
        # this process's environment for the run), while dagster dev loads. The instance and the
        # sync jobs' partitions are created first, under the project's initialisation lock, so
        # neither the run nor dagster dev creates them concurrently.
        self.before: dict[str, dict[str, str]] = {}
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DAGSTER_HOME", str(self.home))
            with open_instance() as instance:
                for job in jobs:
                    sync_window_partitions(instance, SyncJobKeys(job))
            self.dev = DagsterDev(root, self.env).start()
            for case in cases:
                if case.reexport:
                    job = self.jobs[case.id]
                    export_in_process(job, self.home, self.staging, DAY, env, moto.keys["writer"])
                    self.before[case.id] = {n: sha256(b) for n, b in view_of(job, moto).day_files(DAY).items()}

    def run(self, case: Case) -> dict:
        dev, job, pauses, staging = self.dev, self.jobs[case.id], self.pauses, self.staging
        dev.wait_loaded()
        view = view_of(job, self.moto)
        reference = reference_export(job, DAY, self.root / f"reference_{case.job_name}")
        dev.wait(f"day {DAY} of {job.name} in the partitions (window sensor)",
                 lambda: DAY in dev.partition_keys(job.name), 120, interval=1)
        finished = ("SUCCESS", "FAILURE", "CANCELED")

        before = self.before.get(case.id)
        if case.reexport:  # the day was exported completely before the run that is killed
            assert view.check_manifest(DAY) == "complete"
            assert before == reference.hashes

        arm(pauses, case.point)
        victim = dev.launch(job.name, DAY)
        pid = wait_for_pause(pauses, case.point, 240, alive=lambda: dev.status(victim) not in finished,
                             describe=dev.log_tail)
        worker = _cmdline(pid)
        # the run's own process (started for the run by the code server), not dagster dev's processes
        assert pid != dev.proc.pid
        assert any(f"Executing steps in process (pid: {pid})" in m for m in dev.messages(victim)), worker
        manifest_at_kill, at_kill = _state(view, staging, DAY)
        assert manifest_at_kill == case.manifest_at_kill
        kill_worker(pid)
        killed_at, killed_wall = time.monotonic(), time.time()
        assert view.check_manifest(DAY) == case.manifest_at_kill

        if case.rerun == "daemon":
            # queued at once, as a schedule tick or a backfill would; the daemon starts it when the
            # app token's pool slot is free again
            rerun = dev.launch(job.name, DAY)
            status = dev.wait_finished(rerun, RECOVERY_LIMIT_S)
            assert status == "SUCCESS", "\n".join(dev.messages(rerun)[-20:]) + dev.log_tail()
            slot_freed_by = self._slot_freed_by(victim, killed_wall)
            cleanup = _cleanup_lines(dev.messages(rerun))
        else:
            again, _ = run_cli(cli_sync(job.name, DAY), self.env)
            assert again.returncode == 0, again.stderr[-3000:]
            slot_freed_by = self._slot_freed_by(victim, killed_wall, again.stderr)
            cleanup = _cleanup_lines(again.stderr.splitlines())
        recovery_s = time.monotonic() - killed_at
        assert recovery_s < RECOVERY_LIMIT_S

        assert dev.wait_finished(victim, 60) == "FAILURE"
        messages = dev.messages(victim)
        if any("userpilot_sync marked the run failed" in m for m in messages):
            marked_by = "userpilot_sync recovery"
        elif any("Run execution process" in m for m in messages):
            marked_by = "Dagster code server (its run process exited)"
        else:
            marked_by = "other: " + " | ".join(messages[-3:])
        result = _verify_recovered(case.id, view, staging, DAY, reference, before=before)
        assert result["manifest_run_id"] != victim
        return {"case": case.id, "kill_point": case.point, "destination": case.destination,
                "launcher": case.launcher, "rerun_by": case.rerun,
                "export": "re-export" if case.reexport else "first export", "manifest_at_kill": manifest_at_kill,
                "worker_killed": "the run's process: " + worker[:100], "recovery_s": round(recovery_s, 1),
                "dead_run_marked_failed_by": marked_by, "pool_slot_freed_by": slot_freed_by,
                "leftovers_at_kill": at_kill, "cleanup_logged": cleanup, **result}


    def _slot_freed_by(self, victim: str, killed_wall: float, cli_stderr: str | None = None) -> str:
        """Who freed the pool slot the killed run held: the run itself once it was done with the
        source (before the kill), the CLI's recovery before its run, the ``userpilot_run_recovery``
        sensor, or Dagster's run monitoring (whichever came first)."""
        if any("done with the source; pool slot" in m for m in self.dev.messages(victim)):
            return "the run itself, done with the source before the kill"
        if cli_stderr is not None and "recovered from dead runs" in cli_stderr and victim in cli_stderr:
            return "userpilot_sync recovery in the CLI, before its run"
        ticks = [t for t in self.dev.sensor_ticks("userpilot_run_recovery", limit=20)
                 if victim in (t["skipReason"] or "")]
        if ticks:
            return f"userpilot_run_recovery sensor, {float(ticks[-1]['timestamp']) - killed_wall:.0f} s after the kill"
        # the re-run got the slot, so it was freed: by Dagster's own run monitoring once the code server
        # had marked the run failed (deploy/dagster.yaml: free_slots_after_run_end_seconds: 1)
        return "Dagster run monitoring (free_slots_after_run_end_seconds)"


def _concurrent_runs(root: Path, after: Callable[[], object] | None = None) -> dict:
    """``sync --from D1 --to D4`` (``backfill_days_per_run: 1``: one run per day) and ``sync
    --partition D1`` started together on a fresh DAGSTER_HOME: both exit 0 in bounded time, every
    day complete and identical to its reference, nothing left over. ``after``: waited for first
    (dagster dev loading: fewer processes compete with it on 2 cores)."""
    if after is not None:
        with contextlib.suppress(Exception):  # a daemon that does not load fails its own cases
            after()
    name = "c_concurrent"
    [job] = write_sync_jobs(root / "sync_jobs", [sync_job_data(
        name, "29999", local_destination(root / "exports"), events_per_day=300, backfill_days_per_run=1)])
    env = project_env(dagster_home(root / "home"), root / "sync_jobs", root / "staging")
    view = view_of(job)
    commands = [cli_sync(name, RANGE_DAYS[0], range_to=RANGE_DAYS[-1]), cli_sync(name, RANGE_DAYS[0])]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=RECOVERY_LIMIT_S)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    took = time.monotonic() - started
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
    assert took < RECOVERY_LIMIT_S
    ranged, single = outputs[0][1], outputs[1][1]
    assert all(f"partition {pk} ok" in ranged for pk in RANGE_DAYS), ranged[-2000:]
    assert f"partition {RANGE_DAYS[0]} ok" in single
    rows = lost = duplicated = files = size = 0
    for pk in RANGE_DAYS:
        reference = reference_export(job, pk, root / f"reference_{pk}")
        result = _verify_recovered(f"concurrent {pk}", view, root / "staging", pk, reference)
        assert result["rows_exported"] == 300
        rows, files, size = rows + result["rows_exported"], files + result["files"], size + result["bytes"]
        lost, duplicated = lost + result["rows_lost"], duplicated + result["rows_duplicated"]
    return {"case": "range D1..D4 + day D1 together", "kill_point": "-", "destination": "local",
            "launcher": "cli", "rerun_by": "-", "export": "first export (D1 twice)", "manifest_at_kill": None,
            "worker_killed": "-", "recovery_s": round(took, 1), "dead_run_marked_failed_by": "-",
            "pool_slot_freed_by": "-", "rows_expected": 300 * len(RANGE_DAYS), "rows_exported": rows,
            "rows_lost": lost, "rows_duplicated": duplicated, "files": files, "bytes": size, "bytes_identical": True,
            "leftovers_at_kill": [], "leftovers_after": leftovers(view, root / "staging"), "cleanup_logged": [],
            "manifest_after": "complete", "manifest_run_id": None}


class Background:
    """The background cases of the selected tests: daemon cases in one thread (in order), the
    concurrent-runs case in another."""

    def __init__(self, request, tmp_path_factory, daemon_cases: list[Case], concurrent: bool):
        self.daemon = None
        self.futures: dict[str, Future] = {}
        self.pools = []
        if daemon_cases:
            self.daemon = DaemonCells(tmp_path_factory.mktemp("faults_daemon"), request.getfixturevalue("moto_s3"),
                                      daemon_cases)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faults-daemon")
            self.pools.append(pool)
            self.futures.update({case.id: pool.submit(self.daemon.run, case) for case in daemon_cases})
        if concurrent:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faults-concurrent")
            self.pools.append(pool)
            self.futures["concurrent"] = pool.submit(_concurrent_runs, tmp_path_factory.mktemp("faults_concurrent"),
                                                     self.daemon.dev.wait_loaded if self.daemon else None)

    def result(self, key: str) -> dict:
        return self.futures[key].result(timeout=900)

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.daemon is not None:
            self.daemon.dev.stop()


@pytest.fixture(scope="module", autouse=True)
def _background(request, tmp_path_factory, figures):
    """Start the background cases of the selected tests with the module."""
    mine = [item for item in request.session.items if item.module is request.module]
    daemon_cases = [item.callspec.params["case"] for item in mine if "daemon_case" in item.fixturenames]
    concurrent = any("concurrent_case" in item.fixturenames for item in mine)
    background = Background(request, tmp_path_factory, daemon_cases, concurrent)
    try:
        yield background
    finally:
        background.close()


@pytest.fixture
def daemon_case(_background, case) -> dict:
    """The outcome of this daemon case (run in the background; re-raises its failure)."""
    return _background.result(case.id)


@pytest.fixture
def concurrent_case(_background) -> dict:
    return _background.result("concurrent")


@pytest.mark.parametrize("case", DAEMON_CASES, ids=lambda c: c.id)
def test_a_daemon_run_killed_at_a_pause_point_is_recovered_without_a_human(case, daemon_case, figures):
    figures.append(daemon_case)


def test_a_range_run_and_a_single_day_run_started_together_both_finish(concurrent_case, figures):
    figures.append(concurrent_case)
    assert concurrent_case["leftovers_after"] == []


# ------------------------------------------------------------------------------------ coverage
def test_the_matrix_covers_every_kill_point_on_every_destination_and_each_launcher(figures):
    ran = {row["case"] for row in figures}
    if not {case.id for case in ALL_CASES} <= ran:
        pytest.skip("not every case ran in this session (selected out or failed): coverage is judged on a full run")
    covered = {(row["kill_point"], row["destination"]) for row in figures if row["kill_point"] != "-"}
    # "run_start" and "extracting" are the cluster suite's kill points (test_cluster.py: whole workers);
    # "prepared_early" needs days of more than 65,536 events of one type: test_early_prepare.py kills there
    assert covered == {(p, d) for p in POINTS for d in ("local", "s3")
                       if (p, d) != ("multipart", "local") and p not in ("run_start", "extracting", "prepared_early")}
    assert {row["launcher"] for row in figures} == {"cli", "daemon"}
    assert {row["rerun_by"] for row in figures if row["kill_point"] != "-"} == {"cli", "daemon"}
    assert all(row["rows_lost"] == row["rows_duplicated"] == 0 and row["leftovers_after"] == [] for row in figures)
    assert all(row["recovery_s"] < RECOVERY_LIMIT_S for row in figures)
