"""The exporter's required work at its cheapest: a lower bound for the speed targets.

    python -m benchmarks.bound [--events 5000000] [--repeat 3] [--threads 1]
                               [--results benchmarks/results/latest.json] [--out benchmarks/results/bound.json]

Runs, on the benchmark's cached day (``benchmarks/.data/``, built on first use as in
``benchmarks.run``), each step the exporter cannot skip, one after another, with the day in memory
(no staging, no Dagster, no upload, no memory bound: ~5 GB peak at 5M events), with the product's
own functions, and prints the CPU seconds (user + system, every thread) and wall seconds of each
step, the least of ``--repeat`` runs. By default every library runs on one thread (polars'
``POLARS_MAX_THREADS``, Arrow's CPU and I/O pools, Parquet reads): no thread hand-offs or spinning
are counted, only the work.

* ``read``: the chunk files decoded in 65,536-row batches (the floor's and dlt's read);
* ``normalise``: ``source.normalize.normalize_arrow`` per batch (source columns -> the Userpilot
  Event Schema, UTF-8 checks), as staging does;
* ``split``: the partition's UTC window kept and each batch split per event type and hour, as
  staging splits (dlt splits per event type too);
* ``order``: per event type, consecutive hours grouped up to >= 65,536 rows as the exporter groups
  them (``export.VALIDATION_ROWS``): the id check (``internal_event_id`` distinct), the stable sort
  by ``export.SORT_KEY``, the gather of each 65,536-row slice, interaction's derived columns;
* ``validate``: ``schema.validation.validate_export_frame`` (pandera) per slice, the product's
  validation unit;
* ``cast``: polars -> Arrow and the cast to the export schema, per slice;
* ``encode``: ``destination.formats.PartsWriter`` (Parquet/zstd, the product's settings and its
  SHA-256 of each part) into a temporary folder;
* ``staging_round_trip`` (reported apart, not in the bound): the split day written once as the
  product's uncompressed staged Arrow IPC files and read back memory-mapped, the price of bounded
  memory when a source may send any hour last.

The bound is ``sum(CPU s) / cores``: the wall time of this work if every core were busy all the
time, which a streaming exporter cannot quite reach (its read and normalise run in source order).
With ``--results``, the exporter, dlt, floor and naive records of the same size from a
``benchmarks.run`` results file are printed next to it, with the wall time each speed target asks
for. Writes ``benchmarks/results/bound.json``. It bounds an exporter built on these libraries
(polars, pyarrow, pandera), not every conceivable one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH_ROWS = 65_536
BOUND_STEPS = ("read", "normalise", "split", "order", "validate", "cast", "encode")
# the steps of the bound that neither dlt nor the floor does (both read, split or not, and encode)
EXPORTER_ONLY = ("normalise", "order", "validate", "cast")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Steps:
    """CPU and wall seconds per step, summed over every ``with steps("name"):`` block."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}

    def __call__(self, name: str) -> "_Steps":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._open = self._name, _cpu_s(), time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        name, cpu, wall = self._open
        step = self.seconds.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0})  # a step may be entered many times
        step["cpu_s"] = round(step["cpu_s"] + _cpu_s() - cpu, 3)
        step["wall_s"] = round(step["wall_s"] + time.perf_counter() - wall, 3)


def measure(chunks: Path, day: str, app_token: str, *, threads: int = 1) -> dict:
    """Run the steps once on the day in ``chunks``; returns ``{"steps": {...}, "rows": ..., ...}``.
    ``threads``: the threads Arrow may use (polars' are set by ``main`` before polars is imported)."""
    import userpilot_sync  # noqa: F401  (first: the process defaults, allocators, as in the exporter)

    import numpy as np
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from userpilot_sync.config.model import FormatSpec
    from userpilot_sync.destination.formats import PartsWriter
    from userpilot_sync.export import SORT_KEY, VALIDATION_ROWS, _add_interaction_columns, _hour_groups
    from userpilot_sync.partitions import day_window
    from userpilot_sync.schema.events import export_arrow_schema
    from userpilot_sync.schema.validation import validate_export_frame
    from userpilot_sync.source.normalize import normalize_arrow
    from userpilot_sync.staging import IpcFileWriter, _large_strings

    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)
    steps = _Steps()
    start, end = day_window(date.fromisoformat(day))
    work = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    try:
        with steps("read"):
            batches = [batch for path in sorted(chunks.glob("chunk-*.parquet"))
                       for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, use_threads=threads > 1)]
        source_rows = sum(b.num_rows for b in batches)
        with steps("normalise"):
            frames = [normalize_arrow(batch)[0] for batch in batches]
        del batches
        with steps("split"):
            # per event type: {hour: [parts in source order]}, as staging buckets them
            hours: dict[str, dict[int, list]] = {}
            in_window = (pl.col("inserted_at") >= start) & (pl.col("inserted_at") < end)
            for frame in frames:
                frame = frame.filter(in_window).with_columns(pl.col("inserted_at").dt.hour().alias("_hour"))
                for (event_type, hour), part in frame.partition_by(
                        ["event_type", "_hour"], as_dict=True, maintain_order=True).items():
                    hours.setdefault(event_type, {}).setdefault(hour, []).append(part.drop("_hour"))
        del frames
        encoded = rows = 0
        for event_type, by_hour in hours.items():
            schema = export_arrow_schema(event_type)
            with steps("encode"):
                writer = PartsWriter(schema, FormatSpec(format="parquet", compression="zstd"), work / "parquet",
                                     event_type)
            listed = [(hour, [(0, 0, sum(p.height for p in by_hour[hour]))]) for hour in sorted(by_hour)]
            for group in _hour_groups(listed, VALIDATION_ROWS):
                with steps("order"):
                    frame = pl.concat([p for hour, _ in group for p in by_hour[hour]], rechunk=False)
                    if frame.get_column("internal_event_id").is_duplicated().any():
                        raise SystemExit(f"{event_type}: ids repeat; the bound assumes distinct ids (the demo day)")
                    order = frame.select(pl.arg_sort_by(list(SORT_KEY), maintain_order=True)).to_series()
                for offset in range(0, frame.height, BATCH_ROWS):
                    with steps("order"):
                        part = frame.select(pl.all().gather(order.slice(offset, BATCH_ROWS)))
                        if event_type == "interaction":
                            part = _add_interaction_columns(part)
                        part = part.select(schema.names)
                    with steps("validate"):
                        validate_export_frame(part, sync_job="bound", partition=day, event_type=event_type,
                                              app_token=app_token, day_start=start, day_end=end)
                    with steps("cast"):
                        table = part.to_arrow(compat_level=pl.CompatLevel.newest()).cast(schema)
                    del part
                    with steps("encode"):
                        writer.write(table)
                    rows += table.num_rows
                    del table
                del frame, order
            with steps("encode"):
                encoded += sum(p.bytes for p in writer.close())
        with steps("staging_round_trip"):
            staged_rows = 0
            for event_type, by_hour in hours.items():
                path = work / f"{event_type}.arrow"
                first = next(iter(by_hour.values()))[0]
                staged = IpcFileWriter(path, _large_strings(first.slice(0, 0).to_arrow().schema))
                for hour in sorted(by_hour):
                    for part in by_hour[hour]:
                        staged.write_table(part.to_arrow())
                staged.close()
                with pa.memory_map(str(path)) as source:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        back = pl.from_arrow(reader.get_batch(i))
                        staged_rows += back.height
                        np.asarray(back.get_column("inserted_at").to_physical())  # touch the pages
                path.unlink()
        assert staged_rows == rows, (staged_rows, rows)
        return {"steps": steps.seconds, "source_rows": source_rows, "rows": rows, "encoded_bytes": encoded}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def least(runs: list[dict]) -> dict:
    """Per step, the run with the least CPU seconds (its CPU and wall), and every run's CPU."""
    steps = {}
    for name in runs[0]["steps"]:
        best = min((r["steps"][name] for r in runs), key=lambda s: s["cpu_s"])
        steps[name] = {**best, "cpu_s_runs": [r["steps"][name]["cpu_s"] for r in runs]}
    return {**runs[0], "steps": steps, "repeat": len(runs)}


def summary(measured: dict, cores: int, records: list[dict] | None, events: int) -> tuple[dict, list[str]]:
    """The bound and, from ``records`` (a benchmarks.run results list), the targets' wall times."""
    steps = measured["steps"]
    bound_cpu = sum(steps[s]["cpu_s"] for s in BOUND_STEPS)
    only_cpu = sum(steps[s]["cpu_s"] for s in EXPORTER_ONLY)
    staging_cpu = steps["staging_round_trip"]["cpu_s"]
    out = {
        "events": events,
        "cores": cores,
        "bound_cpu_s": round(bound_cpu, 2),
        "bound_wall_s": round(bound_cpu / cores, 2),
        "exporter_only_cpu_s": round(only_cpu, 2),
        "with_staging_cpu_s": round(bound_cpu + staging_cpu, 2),
        "with_staging_wall_s": round((bound_cpu + staging_cpu) / cores, 2),
    }
    lines = [f"{'step':<20}{'CPU s':>9}{'wall s':>9}   CPU s of each run"]
    for name, s in steps.items():
        runs = " / ".join(f"{c:.2f}" for c in s.get("cpu_s_runs", []))
        lines.append(f"{name:<20}{s['cpu_s']:>9.2f}{s['wall_s']:>9.2f}   {runs}")
    lines += [
        "",
        f"required work (in memory, {', '.join(BOUND_STEPS)}): {bound_cpu:.2f} CPU s "
        f"-> at best {bound_cpu / cores:.2f} s wall on {cores} cores",
        f"  of which neither dlt nor the floor does ({', '.join(EXPORTER_ONLY)}): {only_cpu:.2f} CPU s",
        f"with the staging round trip (bounded memory): {bound_cpu + staging_cpu:.2f} CPU s "
        f"-> at best {(bound_cpu + staging_cpu) / cores:.2f} s wall",
    ]
    if records:
        by_name = {r["name"]: r for r in records if r.get("events") == events}
        exp = by_name.get("exporter")
        if exp:
            lines.append(f"exporter (results file): {exp['wall_s']:.2f} s wall, {exp.get('cpu_s', float('nan')):.2f} CPU s")
            out["exporter"] = {k: exp.get(k) for k in ("wall_s", "cpu_s")}
        for name, factor, label in (("dlt", 1.0, "ahead of dlt"), ("floor", 1 / 0.7, ">= 0.7x floor"),
                                    ("naive", 1 / 5, ">= 5x naive")):
            rec = by_name.get(name)
            if not rec:
                continue
            need = rec["wall_s"] * factor
            verdict = ("within reach of the bound" if out["bound_wall_s"] < need else "below the bound: out of reach")
            lines.append(f"target {label}: needs <= {need:.2f} s wall ({name} {rec['wall_s']:.2f} s, "
                         f"{rec.get('cpu_s', float('nan')):.2f} CPU s); {verdict}"
                         + ("" if out["with_staging_wall_s"] < need or out["bound_wall_s"] >= need
                            else ", not with bounded memory"))
            out[f"target_{name}_wall_s"] = round(need, 2)
    return out, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--results", default=str(RESULTS / "latest.json"),
                        help="a benchmarks.run results file to compare with ('' for none)")
    parser.add_argument("--out", default=str(RESULTS / "bound.json"))
    parser.add_argument("--repeat", type=int, default=3, help="runs; each step's least CPU counts (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads polars and Arrow may use (default 1: the work, without threading overhead)")
    args = parser.parse_args(argv)
    if "polars" in sys.modules:
        raise SystemExit("bound: polars was imported before its thread count could be set")
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)

    from benchmarks.children import APP_TOKEN
    from benchmarks.run import BENCH_DAY, dataset, machine

    chunks, info = dataset(args.events)
    measured = least([measure(chunks, BENCH_DAY, APP_TOKEN, threads=args.threads) for _ in range(max(1, args.repeat))])
    if measured["rows"] != info["events"]:
        raise SystemExit(f"bound: {measured['rows']} rows exported of {info['events']} events")
    records = None
    if args.results and Path(args.results).exists():
        loaded = json.loads(Path(args.results).read_text())
        records = loaded["records"] if isinstance(loaded, dict) else loaded
    out, lines = summary(measured, os.cpu_count() or 1, records, info["events"])
    print("\n".join(lines))
    result = {"machine": machine(), "measured": measured, "summary": out,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
