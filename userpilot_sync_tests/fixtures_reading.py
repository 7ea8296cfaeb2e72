"""Real exports for the readers' guide tests (docs/reading.md): 3 days, the second without `track`.

One chunk folder (a ``files`` source) holds three demo days; the middle day has no ``track``
events, so ``track`` has an empty export there (no file, ``rows: 0`` in the manifest). A few
``track`` rows of the last day carry the values behind the guide's traps: a ``session`` of
``"007"``, a ``metadata`` key that appears only late in the range, and an ``event_name`` with a
newline, quotes and a comma. The sync job writes every format (Parquet, NDJSON gzip, CSV, Avro) in the
layout asked for, through the core (``pipeline.sync_partition``), like a run of the sync job.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl

from userpilot_sync.partitions import day_window
from userpilot_sync.pipeline import sync_partition
from userpilot_sync.source.demo import DemoSource
from userpilot_sync_tests.fixtures_core import make_job

DAYS = [date(2026, 3, 7), date(2026, 3, 8), date(2026, 3, 9)]
EMPTY_DAY = DAYS[1]  # no track events: the export of track that day is empty
NOW = datetime(2026, 3, 10, 3, tzinfo=timezone.utc)
FORMATS = [{"format": "parquet"}, {"format": "ndjson", "compression": "gzip"}, {"format": "csv"}, {"format": "avro"}]
#: A metadata key that appears only in the last day's file; a session id with a leading zero; an
#: event name with a comma, quotes and a newline (CSV quotes it over two lines).
TRICKY_METADATA = '{"note":"late key","plan":"pro","value":7}'
TRICKY_SESSION = "007"
TRICKY_NAME = 'Clicked "Export", then\nsaved'


def write_chunks(folder: Path, events_per_day: int = 300) -> Path:
    """Write the source's chunk file (three demo days, traps included) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for d in DAYS:
        start, end = day_window(d)
        frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", events_per_day, d.day).iter_blocks(start, end)])
        if d == EMPTY_DAY:
            frame = frame.filter(pl.col("event_type") != "track")
        if d == DAYS[-1]:
            track = frame.filter((pl.col("event_type") == "track") & pl.col("session").is_not_null())
            last = track.get_column("internal_event_id").tail(2).to_list()
            frame = frame.with_columns(
                pl.when(pl.col("internal_event_id") == last[0]).then(pl.lit(TRICKY_SESSION))
                .otherwise(pl.col("session")).alias("session"),
                pl.when(pl.col("internal_event_id") == last[1]).then(pl.lit(TRICKY_NAME))
                .otherwise(pl.col("event_name")).alias("event_name"),
                pl.when(pl.col("internal_event_id") == last[1]).then(pl.lit(TRICKY_METADATA))
                .otherwise(pl.col("metadata")).alias("metadata"))
        frames.append(frame)
    pl.concat(frames).write_parquet(folder / "export-part1.parquet")
    return folder


def export_days(root: Path, chunks: Path, layout: str, formats: list[dict] = FORMATS) -> tuple[Path, list[dict]]:
    """Export the three days with ``layout`` in ``formats`` under ``root``; returns (sync folder, manifests)."""
    job = make_job(root, source={"kind": "files", "path": str(chunks)}, layout=layout, formats=formats,
                   userpilot_files=[])
    manifests = [sync_partition(job, d.isoformat(), root / "staging", now=NOW, run_id=f"reading-{layout}").manifest
                 for d in DAYS]
    return Path(job.destination.path) / job.destination.prefix / job.sync_folder, manifests


def manifest_rows(manifests: list[dict], event_type: str) -> int:
    """Rows of ``event_type`` the manifests say were exported over the range."""
    return sum(m["event_types"][event_type]["rows"] for m in manifests)


def fenced_snippets(markdown: str, language: str) -> dict[str, str]:
    """The fenced ``language`` code blocks of ``markdown`` whose first line is ``# test: <name>``,
    by name (the guide's snippets, run as they are written). Raises ValueError on a repeated name."""
    out: dict[str, str] = {}
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}" and i + 1 < len(lines) and lines[i + 1].startswith("# test: "):
            name = lines[i + 1][len("# test: "):].strip()
            j = i + 2
            while lines[j].strip() != "```":
                j += 1
            if name in out:
                raise ValueError(f"snippet {name!r} appears twice")
            out[name] = "\n".join(lines[i + 2:j]) + "\n"
            i = j
        i += 1
    return out
