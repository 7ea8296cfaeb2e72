"""The ``dlt`` contender: one measured export of the day's chunk files with dlt 1.x.

    .venv-dlt/bin/python benchmarks/dlt_child.py '<json args>'     (cwd: the repository)

Runs in the benchmark-only environment ``.venv-dlt/`` (``benchmarks/requirements-dlt.txt``,
created by ``make bench``): dlt's S3 extra pins botocore, so dlt never enters the product's lock.
It needs only dlt and pyarrow: it must not import ``userpilot_sync`` nor ``benchmarks`` (neither is
installed there).

What it measures is dlt's fast path, used the ordinary way: a resource yields the chunk files of
the day as Arrow tables, split per ``event_type`` into one dlt table per event type
(``dlt.mark.with_table_name``: one export per event type, like the exporter), no validation and no
schema contract; ``pipeline.run`` with the ``filesystem`` destination on the benchmark's moto S3
server, ``loader_file_format="parquet"``, ``write_disposition="replace"``. Parquet compression is
set to zstd (dlt's default is snappy) so that every contender writes the same codec. Everything
else is dlt's default (buffer of 5,000 rows per flush, no file rotation, 20 load workers).

The same protocol as ``benchmarks/children.py``: the last line of stdout is one JSON object with
``wall_s`` (the work only: ``pipeline.run``; imports, pipeline and client set-up excluded, as for
the other contenders), ``maxrss_kb``, ``rows``, ``output_bytes`` and ``files`` (the data files of
the event tables found by listing the bucket prefix after the run) and ``stages`` (seconds per dlt
step, from the pipeline trace). The parent measures peak RSS itself with ``os.wait4``.

Arguments (JSON): ``data`` (the chunk folder), ``bucket``, ``endpoint`` (the moto server),
``day``; optional ``tmp`` (parent folder of the temporary pipelines/working dirs).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: the folder (key prefix) of the export in the bucket; the dataset name is a folder below it
PREFIX = "dlt"
DATASET = "userpilot_events"
PIPELINE = "bench_dlt"



def _cpu_s() -> float:
    """CPU seconds (user + system, every thread) of this process so far (dlt's load threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def main(args: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-dlt-", dir=args.get("tmp")))
    # dlt's own folders and configuration, all in the temporary folder; set before dlt is imported
    for var, sub in (("DLT_DATA_DIR", "data"), ("DLT_PROJECT_DIR", "project"), ("DLT_LOCAL_DIR", "local")):
        (work / sub).mkdir()
        os.environ[var] = str(work / sub)
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"
    # dlt writes Parquet with snappy by default; the other contenders write zstd
    os.environ["DATA_WRITER__COMPRESSION"] = "zstd"
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: dict, work: Path) -> None:
    import dlt
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from dlt.common.configuration.specs import AwsCredentials

    chunks = sorted(Path(args["data"]).glob("chunk-*.parquet"))
    credentials = AwsCredentials(aws_access_key_id="bench", aws_secret_access_key="bench",
                                 region_name="us-east-1", endpoint_url=args["endpoint"])
    destination = dlt.destinations.filesystem(bucket_url=f"s3://{args['bucket']}/{PREFIX}",
                                              credentials=credentials)
    pipeline = dlt.pipeline(pipeline_name=PIPELINE, pipelines_dir=str(work / "pipelines"),
                            destination=destination, dataset_name=DATASET, progress=None)

    # One dlt table per event type, as the exporter writes one export per event type. A chunk file is
    # one Arrow table; each event type's rows of it are one item for that table. (Measured at 1M
    # events: one single table for the whole day took 3.8-4.3 s against 4.9-5.9 s split per event
    # type, i.e. the split costs ~25 %: the filters, 68 smaller row groups instead of 12, 7 uploads
    # instead of 1. Not much slower than dlt's normal use, so the split is what is measured.)
    @dlt.resource(name="events", write_disposition="replace")
    def events():
        for path in chunks:
            table = pq.read_table(path)
            column = table["event_type"]
            for event_type in pc.unique(column).to_pylist():
                part = table.filter(pc.equal(column, event_type))
                yield dlt.mark.with_table_name(part, event_type)

    # Set-up, as the other contenders create their S3 client before the clock starts: the modules dlt
    # would import lazily during its first run (s3fs/aiobotocore, pyarrow.dataset) and the
    # destination's S3 filesystem client (fsspec caches the instance; the run reuses it).
    import dlt.common.libs.pyarrow  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import s3fs  # noqa: F401

    pipeline.destination_client()
    before = set(sys.modules)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    pipeline.run(events(), loader_file_format="parquet")
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0

    trace = pipeline.last_trace
    stages = {step.step: (step.finished_at - step.started_at).total_seconds()
              for step in trace.steps if step.finished_at and step.started_at and step.step != "run"}
    # the rest of pipeline.run: syncing state and schema with the destination before the steps
    stages["other"] = max(0.0, wall - sum(stages.values()))
    row_counts = trace.last_normalize_info.row_counts
    # dlt's bookkeeping tables (_dlt_loads, _dlt_pipeline_state, _dlt_version) are not output
    event_tables = sorted(t for t in row_counts if not t.startswith("_dlt"))
    files, output_bytes, meta_files = _listing(args, event_tables)
    out = {
        "wall_s": wall,
        "cpu_s": round(cpu, 3),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rows": sum(row_counts[t] for t in event_tables),
        "output_bytes": output_bytes,
        "files": files,
        "tables": len(event_tables),
        "dlt_meta_files": meta_files,
        "stages": stages,
        "parquet": _parquet_shape(args, event_tables),
        "dlt_version": dlt.__version__,
        "imports_in_run": len(set(sys.modules) - before),
    }
    print(json.dumps(out), flush=True)


def _fs(args: dict):
    import s3fs

    return s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=args["endpoint"],
                             client_kwargs={"region_name": "us-east-1"})


def _listing(args: dict, event_tables: list[str]) -> tuple[int, int, int]:
    """(data files of the event tables, their bytes, dlt's other files) under the bucket prefix."""
    root = f"{args['bucket']}/{PREFIX}/{DATASET}/"
    files = output_bytes = meta = 0
    for key, info in _fs(args).find(root, detail=True).items():
        table = key[len(root):].split("/", 1)[0]
        if table in event_tables and key.endswith(".parquet"):
            files += 1
            output_bytes += info["size"]
        else:
            meta += 1
    return files, output_bytes, meta


def _parquet_shape(args: dict, event_tables: list[str]) -> dict:
    """Row groups and compression of the written files (footers read back after the timed part)."""
    import pyarrow.parquet as pq

    fs = _fs(args)
    row_groups, codecs = 0, set()
    for table in event_tables:
        for key in fs.find(f"{args['bucket']}/{PREFIX}/{DATASET}/{table}/"):
            if key.endswith(".parquet"):
                with fs.open(key, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
                row_groups += meta.num_row_groups
                codecs.update(meta.row_group(i).column(c).compression
                              for i in range(meta.num_row_groups) for c in range(meta.num_columns))
    return {"row_groups": row_groups, "compression": sorted(codecs)}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
