"""Child processes of the benchmark: one measured workload per process.

    python -m benchmarks.children s3server                      local moto S3 server on 127.0.0.1
    python -m benchmarks.children generate <json args>          demo events -> Parquet chunk files
    python -m benchmarks.children exporter|naive|floor <json>   one measured export
    (the ``dlt`` contender runs in its own environment: benchmarks/dlt_child.py)
    python -m benchmarks.children snapshot_setup <json>         the snapshot benchmark's state store
    python -m benchmarks.children snapshot|snapshot_replay <json>  one measured snapshot day / replay
                                                                (benchmarks/snapshots.py)

A measured child prints one JSON line (``{"wall_s": ..., "maxrss_kb": ...}``) as its last line
of stdout; ``wall_s`` covers the work only (imports and client setup excluded, the same for
every contender). The parent measures peak RSS itself with ``os.wait4`` (the child's own
``ru_maxrss``): the S3 server runs in another process and is never counted.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

APP_TOKEN = "NX-bench0001"
SYNC_ID = "90001"
PREFIX = "userpilot_events"


# ------------------------------------------------------------------------------- S3 server
def s3server() -> None:
    """Start moto's S3 server on a free loopback port, print the port, stop when stdin closes."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(port, flush=True)
    try:
        sys.stdin.read()  # EOF when the parent exits or closes the pipe
    finally:
        server.stop()


def _s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                        aws_secret_access_key="bench", config=Config(retries={"total_max_attempts": 1}))


# ------------------------------------------------------------------------------- data
def _generate_part(args: tuple) -> tuple[str, int, int]:
    from datetime import date

    import pyarrow as pa
    import pyarrow.parquet as pq

    from userpilot_sync.source.demo import DemoSource

    events, seed, day, blocks, path = args
    source = DemoSource(APP_TOKEN, events_per_day=events, seed=seed)
    tables = [source.block_events(date.fromisoformat(day), b) for b in blocks if source._block_size(b)]
    table = pa.concat_tables(tables) if tables else source.block_events(date.fromisoformat(day), 0).slice(0, 0)
    pq.write_table(table, path, compression="zstd")
    return path, table.num_rows, table.nbytes


def generate(args: dict) -> None:
    """Write one day of demo events as Parquet/zstd chunk files (``chunk-NNNNN.parquet``)."""
    from concurrent.futures import ProcessPoolExecutor

    from userpilot_sync.source.demo import BLOCKS_PER_DAY

    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    per_file = args.get("blocks_per_file", 8)
    jobs = [
        (args["events"], args["seed"], args["day"], list(range(b, min(b + per_file, BLOCKS_PER_DAY))),
         str(out / f"chunk-{i:05d}.parquet"))
        for i, b in enumerate(range(0, BLOCKS_PER_DAY, per_file))
    ]
    with ProcessPoolExecutor(max_workers=args.get("workers", 2)) as pool:
        results = list(pool.map(_generate_part, jobs))
    info = {
        "events": sum(r[1] for r in results),
        "arrow_bytes": sum(r[2] for r in results),
        "file_bytes": sum(Path(r[0]).stat().st_size for r in results),
        "files": len(results),
        "day": args["day"],
        "seed": args["seed"],
    }
    print(json.dumps(info))


def _chunk_files(data: str) -> list[Path]:
    return sorted(Path(data).glob("chunk-*.parquet"))


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_CPU_AT_START: list[float] = []


def _start() -> float:
    """Start the clock of the timed part: returns perf_counter and remembers the CPU seconds used."""
    _CPU_AT_START[:] = [_cpu_s()]
    return time.perf_counter()


def _finish(t0: float, extra: dict | None = None) -> None:
    wall = time.perf_counter() - t0
    rec = {"wall_s": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if _CPU_AT_START:
        # CPU seconds of the timed part (every thread): cpu_s / wall_s = cores kept busy on average
        rec["cpu_s"] = round(_cpu_s() - _CPU_AT_START[0], 3)
    rec.update(extra or {})
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------- exporter
def exporter(args: dict) -> None:
    """This project's sync_partition: FilesSource over the chunks -> S3Storage (moto, loopback)."""
    from datetime import date, datetime, timedelta, timezone

    from userpilot_sync.config.model import FilesSourceConfig, FormatSpec, S3Destination, SyncJob
    from userpilot_sync.destination.s3 import S3Storage
    from userpilot_sync.destination.manifest import rows_by_event_type
    from userpilot_sync.pipeline import sync_partition
    from userpilot_sync.source.files import FilesSource

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    job = SyncJob(
        name="bench", sync_id=SYNC_ID, app_token=APP_TOKEN,
        source=FilesSourceConfig(path=args["data"]),
        destination=S3Destination(bucket=args["bucket"], prefix=PREFIX, endpoint_url=args["endpoint"],
                                  region="us-east-1"),
        formats=(FormatSpec(format="parquet", compression="zstd"),),
        # the event exports alone, comparable with naive and floor (snapshot_1m measures the snapshots)
        userpilot_files=(),
    )
    storage = S3Storage.from_config(job)
    day = date.fromisoformat(args["day"])
    now = datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc) + timedelta(days=1)
    staging = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=args.get("tmp")))
    # seconds per stage, filled by sync_partition when it has the `timings` keyword (newer versions)
    timings: dict | None = {} if "timings" in inspect.signature(sync_partition).parameters else None
    extra_kwargs = {"timings": timings} if timings is not None else {}
    try:
        t0 = _start()
        result = sync_partition(job, args["day"], staging, storage=storage, source=FilesSource(args["data"]),
                                run_id="bench", now=now, **extra_kwargs)
        _finish(t0, {"rows": sum(rows_by_event_type(result.manifest).values()),
                     "output_bytes": sum(f.bytes for f in result.files), "files": len(result.files),
                     **({"stages": timings} if timings is not None else {})})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- naive
def _pandas_schema(event_type: str):
    """pandera-on-pandas equivalent of schema/validation.py (same checks, pandas dtypes)."""
    import pandas as pd
    import pandera.pandas as pap

    from userpilot_sync.schema.events import export_columns
    from userpilot_sync.schema.validation import _checks_for

    columns = {}
    for col in export_columns(event_type):
        kind = str(col.arrow_type)
        if kind == "string":
            dtype, coerce = str, False
        elif kind == "int32":
            dtype, coerce = pd.Int32Dtype(), True  # pandas reads nullable int32 as float64
        else:
            dtype, coerce = pd.DatetimeTZDtype(unit="us", tz="UTC"), True
        columns[col.name] = pap.Column(
            dtype, checks=_checks_for(col.name, event_type, APP_TOKEN, None, None),
            nullable=col.nullable, unique=col.name == "internal_event_id", coerce=coerce,
        )
    return pap.DataFrameSchema(columns, strict=True, ordered=True)


def naive(args: dict) -> None:
    """pandas read -> pandera-on-pandas validation -> to_parquet (zstd) -> one put per file."""
    import pandas as pd

    from userpilot_sync.schema.events import EVENT_TYPES

    client = _s3_client(args["endpoint"])
    schemas = {et: _pandas_schema(et) for et in EVENT_TYPES}
    t0 = _start()
    frame = pd.concat([pd.read_parquet(p) for p in _chunk_files(args["data"])], ignore_index=True)
    rows = out_bytes = 0
    for et in EVENT_TYPES:
        part = frame[frame["event_type"] == et]
        if et == "interaction":
            parsed = part["event_name"].str.extract(r"^([^:]*):(.*):([^:]*)$")
            part = part.assign(entity_type=parsed[0], entity_id=parsed[1], interaction_status=parsed[2])
        part = schemas[et].validate(part, lazy=True)
        buf = io.BytesIO()
        part.to_parquet(buf, compression="zstd", index=False)
        body = buf.getvalue()
        client.put_object(Bucket=args["bucket"], Key=f"naive/{args['day']}/{et}.parquet", Body=body)
        rows += len(part)
        out_bytes += len(body)
    _finish(t0, {"rows": rows, "output_bytes": out_bytes, "files": len(EVENT_TYPES)})


# ------------------------------------------------------------------------------- floor
def floor(args: dict) -> None:
    """pyarrow read -> write one Parquet/zstd file -> one put. No validation, no split."""
    import pyarrow.parquet as pq

    client = _s3_client(args["endpoint"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-floor-", dir=args.get("tmp")))
    try:
        t0 = _start()
        path = tmp / "events.parquet"
        writer = None
        rows = 0
        for chunk in _chunk_files(args["data"]):
            for batch in pq.ParquetFile(chunk).iter_batches(batch_size=65_536):
                if writer is None:
                    writer = pq.ParquetWriter(path, batch.schema, compression="zstd")
                writer.write_batch(batch)
                rows += batch.num_rows
        writer.close()
        size = path.stat().st_size
        with open(path, "rb") as body:
            client.put_object(Bucket=args["bucket"], Key=f"floor/{args['day']}/events.parquet", Body=body,
                              ContentLength=size)
        _finish(t0, {"rows": rows, "output_bytes": size, "files": 1})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


COMMANDS = {"generate": generate, "exporter": exporter, "naive": naive, "floor": floor}


def main(argv: list[str]) -> None:
    if argv[0] == "s3server":
        s3server()
        return
    if argv[0] in COMMANDS:
        COMMANDS[argv[0]](json.loads(argv[1]))
        return
    from benchmarks.snapshots import COMMANDS as SNAPSHOT_COMMANDS  # numpy/polars at import: only here

    SNAPSHOT_COMMANDS[argv[0]](json.loads(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
