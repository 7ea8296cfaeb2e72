"""Byte identity of the exports: record the sha256 of every file a fixed set of cases writes, compare later.

    python -m benchmarks.identity record benchmarks/results/identity.json   # before a change
    python -m benchmarks.identity check benchmarks/results/identity.json    # after it: exit 1 on any difference

Cases (all to local folders, fixed seeds, days inside the 365-day window):

* ``formats``: one demo day (20,000 events) through ``pipeline.sync_partition`` in every format
  and compression (Parquet zstd/snappy, NDJSON gzip, CSV, Avro deflate), files rotated at 3,000
  rows, an event-name exclude filter, an excluded column, and every documented file (snapshots,
  feature tags, per-tag and per-label files);
* ``large``: one demo day of 300,000 events, Parquet/zstd rotated at 4 MB, NDJSON;
* ``range``: the CLI's range run (``sync --from D1 --to D3``, Dagster in process of the CLI, one
  extraction of 3 days), hive layout, Parquet + CSV/gzip, the default documented files.

Data files are compared by sha256; manifests (run ids, times) by their ``files`` entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FORMATS_JOB = """
name: ident_formats
sync_id: "70001"
app_token: NX-ident0001
source: {kind: demo, events_per_day: 20000, seed: 7}
destination: {kind: local, path: "%(dest)s", prefix: userpilot_events}
formats:
  - {format: parquet, compression: zstd}
  - {format: ndjson, compression: gzip}
  - {format: csv}
  - {format: avro, compression: deflate}
max_file_rows: 3000
filters:
  event_names_exclude: ["*_9*"]
  exclude_columns: [hostname]
userpilot_files: [all_users, all_companies, feature_tags_breakdown, feature_tags_definitions,
                  track_feature_per_tag, track_labeled_per_label]
state: {kind: local, path: "%(state)s"}
"""

LARGE_JOB = """
name: ident_large
sync_id: "70002"
app_token: NX-ident0002
source: {kind: demo, events_per_day: 300000, seed: 11}
destination: {kind: local, path: "%(dest)s", prefix: userpilot_events}
formats:
  - {format: parquet, compression: zstd}
  - {format: ndjson}
max_file_bytes: 4000000
userpilot_files: []
"""

RANGE_JOB = """
name: ident_range
sync_id: "70003"
app_token: NX-ident0003
source: {kind: demo, events_per_day: 8000, seed: 3}
destination: {kind: local, path: "%(dest)s", prefix: userpilot_events}
layout: hive
formats:
  - {format: parquet, compression: zstd}
  - {format: csv, compression: gzip}
state: {kind: local, path: "%(state)s"}
schedules_running: false
"""


def _sha(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _digest_tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.name == "_manifest.json":
            manifest = json.loads(path.read_text())
            out[rel] = sorted(json.dumps(f, sort_keys=True) for f in manifest.get("files", []))
        else:
            out[rel] = _sha(path)
    return out


def _one_day(template: str, work: Path, day: str) -> dict[str, object]:
    from userpilot_sync.config.loader import load_sync_job_file
    from userpilot_sync.pipeline import sync_partition

    dest, state = work / "dest", work / "state"
    jobs = work / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "job.yaml").write_text(template % {"dest": dest, "state": state})
    job = load_sync_job_file(jobs / "job.yaml")
    sync_partition(job, day, work / "staging")
    return _digest_tree(dest)


def _range(work: Path, first: str, last: str) -> dict[str, object]:
    dest, state, jobs, home = work / "dest", work / "state", work / "jobs", work / "home"
    jobs.mkdir(parents=True)
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
    (jobs / "ident_range.yaml").write_text(RANGE_JOB % {"dest": dest, "state": state})
    env = dict(os.environ, DAGSTER_HOME=str(home), USERPILOT_SYNC_JOBS_DIR=str(jobs),
               USERPILOT_SYNC_STAGING_DIR=str(work / "staging"))
    subprocess.run([sys.executable, "-m", "userpilot_sync.cli", "sync", "--job", "ident_range", "--from", first,
                    "--to", last], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return _digest_tree(dest)


def record_all() -> dict[str, dict[str, object]]:
    today = datetime.now(timezone.utc).date()
    # fixed calendar days (not "yesterday"): the demo generator's events depend on the day
    day = date(2026, 11, 20)
    if (today - day).days > 360:
        raise SystemExit("benchmarks.identity: the fixed days left the 365-day window; move them and re-record")
    out: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="ident-") as tmp:
        tmp_path = Path(tmp)
        out["formats"] = _one_day(FORMATS_JOB, tmp_path / "formats", day.isoformat())
        out["large"] = _one_day(LARGE_JOB, tmp_path / "large", day.isoformat())
        out["range"] = _range(tmp_path / "range", (day - timedelta(days=2)).isoformat(), day.isoformat())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    mode, path = argv[0], Path(argv[1])
    got = record_all()
    if mode == "record":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) for v in got.values())} files in {len(got)} cases -> {path}")
        return 0
    want = json.loads(path.read_text())
    bad = 0
    for case in sorted(set(want) | set(got)):
        a, b = want.get(case, {}), got.get(case, {})
        for rel in sorted(set(a) | set(b)):
            if a.get(rel) != b.get(rel):
                bad += 1
                what = "missing" if rel not in b else "new" if rel not in a else "differs"
                print(f"{case}: {rel}: {what}")
        print(f"{case}: {len(b)} files, {'identical' if a == b else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
