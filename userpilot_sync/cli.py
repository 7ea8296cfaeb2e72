"""Command line: run sync jobs through Dagster without the UI, and see every day's status.

    python -m userpilot_sync.cli sync [--job NAME] [--days N | --partition YYYY-MM-DD ... | --from D --to D]
                                      [--allow-shrink]
    python -m userpilot_sync.cli status [--job NAME] [--json] [--all]
    python -m userpilot_sync.cli move-history --from OLD_DAGSTER_HOME
    python -m userpilot_sync.cli preview --job NAME --partition YYYY-MM-DD [--json] [--sample-rows N]

Each partition is one run of the sync job's asset job (a --from/--to backfill: one run per
``backfill_days_per_run`` days, one extraction each), recorded in the Dagster instance of
``$DAGSTER_HOME`` (``make run`` uses ``.dagster_home/`` in the project folder), so the UI shows the
same history. Prints one line per run (its failure's one-line cause, its warnings and every failed
ERROR check per day on stderr), the exported files and the newest manifest. Exit codes: 0 success;
1 a run failed (or the instance could not be opened); 2 bad arguments or sync-job files; 3 every
run succeeded but an ERROR check failed. ``move-history`` copies the runs, event logs, backfills and
day partitions of another instance (e.g. the local SQLite one) into ``$DAGSTER_HOME``'s (e.g. the
cluster's PostgreSQL) so fingerprints and history carry over (``defs/move.py``). ``status`` lists every day of the 365-day window as
complete, empty, replacing, running, failed, late, pending or missing (``defs/status.py``). The
instance is opened under an initialisation lock in ``$DAGSTER_HOME`` (``defs/instance.py``), so
several commands started at once on a new ``DAGSTER_HOME`` are safe. ``preview`` runs ``<job>_preview``
for one day (``preview.py``: the object keys, rows, sample rows and manifest an export would write;
nothing reaches the destination, nothing is recorded but the run; exit 1 when the day's export
would fail, with its one-line cause).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg

from userpilot_sync.config.loader import load_sync_jobs
from userpilot_sync.defs.automation import backfill_ranges
from userpilot_sync.defs.instance import InstanceInitTimeout, open_instance
from userpilot_sync.defs.keys import SyncJobKeys
from userpilot_sync.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, sync_window_partitions
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.defs.recovery import recover_dead_runs
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.errors import UserpilotSyncError, WindowError
from userpilot_sync.guards import ALLOW_SHRINK_TAG
from userpilot_sync.partitions import check_in_window, last_complete_days, parse_partition, window_bounds


#: Exit codes (docs/operations.md): success; a run failed; bad arguments or sync-job files; every run
#: succeeded but an ERROR check failed (e.g. filters removed every event of a type).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECK_ERRORS = 0, 1, 2, 3

#: Console logging of runs started here: warnings and errors only (the UI shows every event).
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _tree(root: Path, limit: int = 60) -> list[str]:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        lines.append(f"  {path.relative_to(root).as_posix():<48} {path.stat().st_size:>10,d} bytes")
    if len(lines) > limit:
        lines = lines[: limit // 2] + [f"  ... {len(lines) - limit} more ..."] + lines[-limit // 2 :]
    return lines


def _ranges(job, args) -> list[tuple[date, date]]:
    """(first, last) day of each run to launch; raises ValueError/WindowError for bad days."""
    if args.range_from:
        # Backfill: runs of up to backfill_days_per_run days, each one extraction split by day,
        # exactly what an asset backfill launches (without needing the daemon).
        start = parse_partition(args.range_from)
        end = parse_partition(args.range_to or args.range_from)
        if end < start:
            raise ValueError(f"--to {end.isoformat()} is before --from {start.isoformat()}")
        days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        ranges = [(parse_partition(a), parse_partition(b)) for a, b in backfill_ranges(days, job.backfill_days_per_run)]
    else:
        if args.days < 1 and not args.partition:
            raise ValueError("--days must be at least 1")
        keys = args.partition or [d.isoformat() for d in last_complete_days(args.days)]
        ranges = [(parse_partition(k), parse_partition(k)) for k in keys]
    if args.range_from:
        # a backfill may reach before the window: those days are refused one by one by the run
        # (reported, not exported); a backfill entirely outside the window is refused here
        check_in_window(job.name, ranges[-1][1])
        oldest = window_bounds()[0]
        ranges = [(max(first, min(oldest, last)), last) for first, last in ranges if last >= oldest] or ranges[-1:]
    else:
        for first, _ in ranges:
            check_in_window(job.name, first)  # single days: refuse up front with the window message
    for first, _ in ranges:
        if job.partitions_start is not None and first < job.partitions_start:
            raise ValueError(
                f"sync job {job.name!r}: partition {first.isoformat()} is before partitions_start "
                f"{job.partitions_start.isoformat()}"
            )
    return ranges


def failure_messages(result) -> list[str]:
    """The one-line causes of a run's failed steps (a ``dg.Failure``'s description, else the root error)."""
    messages = []
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data is not None and data.user_failure_data.description:
            messages.append(data.user_failure_data.description.strip())
            continue
        error = data.error
        while error.cause is not None:
            error = error.cause
        messages.append(error.message.strip())
    return messages


def run_warnings(instance: dg.DagsterInstance, result) -> list[str]:
    """What a run warned about, which the quiet console hides: the export step's warning log lines
    (refused days, staging a crashed run left behind, ...) and failed WARN checks, one per day."""
    import logging

    lines = [entry.user_message for entry in instance.all_logs(result.run_id)
             if entry.level >= logging.WARNING and entry.step_key and entry.dagster_event is None
             and entry.level < logging.ERROR]
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN:
            lines.append(_check_line(evaluation))
    return lines


def _check_line(evaluation) -> str:
    what = evaluation.description or ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in
                                               evaluation.metadata.items() if k.startswith("rows"))
    return f"check {evaluation.asset_key.to_user_string()}:{evaluation.check_name} on {evaluation.partition}: {what}"


def run_check_errors(result) -> list[str]:
    """Failed ERROR checks of a run, one line per day and check, except ``day_exported`` of days the
    run's failure already explains."""
    return [_check_line(e) for e in result.get_asset_check_evaluations()
            if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
            and not (e.check_name == "day_exported" and not result.success)]


def config_problem(job, exc: Exception) -> str:
    """One sentence for a run Dagster refused before it started (e.g. an unset secret variable)."""
    import re

    match = re.search(r'environment variable "([^"]+)"', str(exc))
    if match:
        return (f"the environment variable {match.group(1)} is not set (a secret of sync job {job.name!r}, "
                f"read through dg.EnvVar); set it and run again. Nothing was run.")
    return str(exc).strip().splitlines()[0]


class _UsageError(Exception):
    """Bad arguments or sync-job files: the message is printed, the exit code is EXIT_USAGE."""


def _load(name: str):
    """Every configured sync job and the one named ``name``; _UsageError names what is wrong."""
    try:
        jobs = load_sync_jobs()
    except UserpilotSyncError as exc:
        raise _UsageError(str(exc)) from None
    by_name = {j.name: j for j in jobs}
    if name not in by_name:
        raise _UsageError(f"unknown sync job {name!r}; configured: {', '.join(sorted(by_name)) or 'none'}")
    return jobs, by_name[name]


def cmd_sync(args: argparse.Namespace) -> int:
    jobs, job = _load(args.job)
    try:
        ranges = _ranges(job, args)
    except (ValueError, WindowError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    defs = build_definitions(jobs)
    keys = SyncJobKeys(job)
    job_def = defs.resolve_job_def(keys.sync_job_name)
    failed: list[str] = []
    check_errors: list[str] = []
    with open_instance() as instance:
        recovered = recover_dead_runs(instance, pools=[job.pool])
        if recovered.failed_runs or recovered.freed_slots_of:
            print(f"sync job {job.name}: recovered from dead runs: {recovered.summary()}", file=sys.stderr)
        sync_window_partitions(instance, keys)
        for first, last in ranges:
            label = first.isoformat() if first == last else f"{first.isoformat()}...{last.isoformat()}"
            tags = keys.run_tags("cli")
            if args.allow_shrink:
                tags[ALLOW_SHRINK_TAG] = "true"
            try:
                if first == last:
                    result = job_def.execute_in_process(
                        partition_key=first.isoformat(), instance=instance, tags=tags, raise_on_error=False,
                        run_config=QUIET,
                    )
                else:
                    tags.update({RANGE_START_TAG: first.isoformat(), RANGE_END_TAG: last.isoformat()})
                    result = job_def.execute_in_process(instance=instance, tags=tags, raise_on_error=False,
                                                        run_config=QUIET)
            except dg.DagsterInvalidConfigError as exc:
                print(f"sync job {job.name}: partition {label} REFUSED before the run started: "
                      f"{config_problem(job, exc)}", file=sys.stderr)
                failed.append(label)
                break
            status = "ok" if result.success else "FAILED"
            print(f"sync job {job.name}: partition {label} {status} (run {result.run_id})", flush=True)
            for warning in run_warnings(instance, result):
                print("    warning: " + warning.replace("\n", "\n    "), file=sys.stderr)
            for error in run_check_errors(result):
                check_errors.append(label)
                print("    ERROR " + error.replace("\n", "\n    "), file=sys.stderr)
            if not result.success:
                failed.append(label)
                for message in failure_messages(result):
                    print("    " + message.replace("\n", "\n    "), file=sys.stderr)
    if job.source.kind in ("demo", "export_api") and not failed:
        with open_instance() as instance:
            result = defs.resolve_job_def(keys.lookups_job_name).execute_in_process(
                instance=instance, raise_on_error=False, run_config=QUIET, tags=keys.run_tags("cli")
            )
        print(f"sync job {job.name}: lookups {'ok' if result.success else 'FAILED'} (run {result.run_id})")
        if not result.success:
            failed.append("lookups")
            for message in failure_messages(result):
                print("    " + message.replace("\n", "\n    "), file=sys.stderr)
    if job.destination.kind == "local":
        root = Path(job.destination.path) / layout_for(job).root
        print(f"\nExported files under {root}:")
        print("\n".join(_tree(root)) if root.exists() else "  (none)")
        manifests = sorted(root.rglob("_manifest.json"))
        ran = {(f + timedelta(days=i)).isoformat() for f, l in ranges for i in range((l - f).days + 1)}
        manifests = [m for m in manifests if json.loads(m.read_text())["partition"] in ran] or manifests
        if manifests:
            newest = max(manifests, key=lambda p: json.loads(p.read_text())["partition"])
            doc = json.loads(newest.read_text())
            print(f"\nNewest manifest ({newest.relative_to(root).as_posix()}):")
            print(json.dumps(doc, indent=2))
    if failed:
        print(f"\n{len(failed)} partition(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    if check_errors:
        print(f"\nexported, but ERROR checks failed in run(s) of: {', '.join(dict.fromkeys(check_errors))} "
              f"(see above; exit code {EXIT_CHECK_ERRORS})", file=sys.stderr)
        return EXIT_CHECK_ERRORS
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Every day of the window: complete, empty, replacing, running, failed, late, pending, missing."""
    from userpilot_sync.defs.status import day_statuses, summary

    keys = SyncJobKeys(_load(args.job)[1])
    with open_instance() as instance:
        statuses = day_statuses(instance, keys)
    counts = summary(statuses)
    if args.json:
        print(json.dumps({"sync_job": keys.name, "summary": counts, "days": [d.to_dict() for d in statuses]}, indent=2))
        return EXIT_OK
    print(f"sync job {keys.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    shown = statuses if args.all else [d for d in statuses if d.status != "missing" or d.late]
    for d in reversed(shown):  # newest first
        rows = "" if d.rows is None else f"{d.rows:>10,d} rows"
        note = d.reason or d.last_attempt or ""
        late = " LATE" if d.late else ""
        print(f"  {d.partition}  {d.status:<9}{late:<5} {rows:>15}  {note.splitlines()[0][:120] if note else ''}")
    if not args.all and len(shown) < len(statuses):
        print(f"  ({len(statuses) - len(shown)} older missing days not shown; --all shows every day)")
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    """Dry run of one day (``preview.py``): runs ``<job>_preview`` in the instance (it holds the app
    token's pool slot like an export), prints its preview document; nothing reaches the destination."""
    from userpilot_sync.preview import render

    jobs, job = _load(args.job)
    try:
        if not 0 <= args.sample_rows <= 100:
            raise ValueError(f"--sample-rows {args.sample_rows}: expected 0..100")
        day = parse_partition(args.partition)
        check_in_window(job.name, day)
    except (ValueError, WindowError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    keys = SyncJobKeys(job)
    job_def = build_definitions(jobs).resolve_job_def(keys.preview_job_name)
    op = job_def.graph.node_names()[0]
    run_config = {**QUIET, "ops": {op: {"config": {"partition": day.isoformat(), "sample_rows": args.sample_rows}}}}
    with open_instance() as instance:
        recover_dead_runs(instance, pools=[job.pool])  # a dead run's pool slot would block the preview
        try:
            result = job_def.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False,
                                                tags=keys.run_tags("preview"))
        except dg.DagsterInvalidConfigError as exc:
            print(f"sync job {job.name}: preview of {day.isoformat()} REFUSED before the run started: "
                  f"{config_problem(job, exc)}", file=sys.stderr)
            return EXIT_FAILED
    if not result.success:
        for message in failure_messages(result):
            print(message, file=sys.stderr)
        return EXIT_FAILED
    doc = next(e.step_output_data.metadata["preview"].value for e in result.all_events if e.is_successful_output)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return EXIT_OK


def cmd_move_history(args: argparse.Namespace) -> int:
    """Copy the history of the instance in ``--from`` into the instance of ``$DAGSTER_HOME``."""
    from userpilot_sync.defs.move import MoveError, move_history

    old_home = Path(args.source).expanduser().resolve()
    if not (old_home / "dagster.yaml").is_file() and not (old_home / "history").is_dir():
        raise _UsageError(f"--from {old_home}: not a DAGSTER_HOME (no dagster.yaml, no history/ folder)")
    try:
        jobs = load_sync_jobs()
    except UserpilotSyncError as exc:
        raise _UsageError(str(exc)) from None
    names = [SyncJobKeys(job).partitions_name for job in jobs]
    with dg.DagsterInstance.from_config(str(old_home)) as source, open_instance() as target:
        try:
            report = move_history(source, target, names, log=print)
        except MoveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(f"moved the history of {old_home} into DAGSTER_HOME: {report.summary()}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="userpilot_sync", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="export partitions of one sync job")
    sync.add_argument("--job", default="demo", help="sync job name (default: demo)")
    which = sync.add_mutually_exclusive_group()
    which.add_argument("--days", type=int, default=7, help="the last N complete UTC days (default: 7)")
    which.add_argument("--partition", action="append", help="a partition key YYYY-MM-DD (repeatable)")
    which.add_argument("--from", dest="range_from", help="backfill: first day YYYY-MM-DD (runs of backfill_days_per_run days)")
    sync.add_argument("--to", dest="range_to", help="backfill: last day YYYY-MM-DD (with --from; default: --from)")
    sync.add_argument("--allow-shrink", action="store_true",
                      help="let re-exports lose more rows than checks.max_shrink (run tag userpilot_sync/allow_shrink)")
    sync.set_defaults(func=cmd_sync)
    status = sub.add_parser("status", help="every day of a sync job's 365-day window, from the Dagster instance")
    status.add_argument("--job", default="demo", help="sync job name (default: demo)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--all", action="store_true", help="also list the missing days before the first export")
    status.set_defaults(func=cmd_status)
    preview = sub.add_parser("preview", help="dry run of one day: the keys, rows, sample rows and manifest an export "
                                             "would write; writes nothing to the destination")
    preview.add_argument("--job", default="demo", help="sync job name (default: demo; may be disabled)")
    preview.add_argument("--partition", required=True, help="the UTC day YYYY-MM-DD")
    preview.add_argument("--json", action="store_true", help="the preview document as JSON (docs/operations.md)")
    preview.add_argument("--sample-rows", type=int, default=3, help="rows shown per file (default: 3)")
    preview.set_defaults(func=cmd_preview)
    move = sub.add_parser("move-history", help="copy another instance's runs and history into $DAGSTER_HOME's "
                                               "(e.g. local SQLite -> cluster PostgreSQL)")
    move.add_argument("--from", dest="source", required=True, help="the old DAGSTER_HOME (its dagster.yaml)")
    move.set_defaults(func=cmd_move_history)
    args = parser.parse_args(argv)
    if getattr(args, "range_to", None) and not args.range_from:
        parser.error("--to needs --from")
    try:
        return args.func(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except InstanceInitTimeout as exc:  # another process kept the instance's initialisation lock
        print(exc, file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
