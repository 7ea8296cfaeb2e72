"""Prepare one export (one event type of one partition) from staged raw events.

For each hour bucket of the event type, in hour order:

1. apply the sync job's filters (event names include/exclude globs, user/company lists);
2. add the parsed interaction columns (``entity_type``, ``entity_id``, ``interaction_status``);
3. drop exact duplicates (same ``internal_event_id``, same content) — exact duplicates share
   ``inserted_at`` (a hashed field), hence the same hour bucket;
4. refuse ids seen twice with different content (a ValidationError naming samples);
5. sort stably by (``inserted_at``, ``internal_event_id``);
6. validate with the event type's pandera schema (data level, eager frame), in groups of
   consecutive buckets of about ``VALIDATION_ROWS`` rows (one pandera call per group);
7. write each group to ``prepared/<event_type>/<NNNNN>.arrow`` (Arrow IPC, like staging).

Buckets are processed one at a time (memory ~ one group of ``VALIDATION_ROWS`` rows plus one hour bucket), and since buckets
are written in hour order the export is globally ordered and de-duplicated. The result, a
:class:`PreparedExport`, is a handle to validated files that the destination's writers stream
out; nothing reaches the destination unless every bucket validated.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa

from userpilot_sync.config.model import Filters, SyncJob
from userpilot_sync.errors import ValidationError
from userpilot_sync.partitions import day_window, parse_partition
from userpilot_sync.schema.events import KNOWN_INTERACTION_STATUSES, KNOWN_SOURCES, export_arrow_schema
from userpilot_sync.schema.validation import validate_export_frame
from userpilot_sync.staging import STAGED_SUFFIX, IpcFileWriter, StagedDay, read_ipc_files

PREPARED_RECORD = "prepared.json"
SORT_KEY = ("inserted_at", "internal_event_id")
#: Buckets are validated and written in groups of at least this many rows (bounded memory).
VALIDATION_ROWS = 200_000


@dataclass
class PreparedExport:
    """A validated, de-duplicated, ordered export waiting to be written to the destination.

    ``files`` are Arrow IPC files (in order) whose rows, concatenated, are the export; their
    columns are exactly :func:`~userpilot_sync.schema.events.export_arrow_schema`.
    """

    sync_job: str
    partition: str
    event_type: str
    files: list[str]
    rows: int
    rows_staged: int
    filtered_out: int
    duplicates_dropped: int
    exclude_columns: list[str]
    unknown_sources: dict[str, int] = field(default_factory=dict)
    unknown_statuses: dict[str, int] = field(default_factory=dict)
    entity_types: dict[str, int] = field(default_factory=dict)
    source_rows: int = 0

    @property
    def arrow_schema(self) -> pa.Schema:
        return export_arrow_schema(self.event_type, self.exclude_columns)

    def iter_batches(self, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream the export's rows in order, as record batches of the export schema."""
        schema = self.arrow_schema
        for path in self.files:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if batch.schema != schema:
                    batch = batch.cast(schema)
                for offset in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(offset, batch_rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def glob_to_regex(pattern: str) -> str:
    """A shell-style glob (``*``, ``?``, ``[...]``) as an anchored regular expression."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "^(?s:" + "".join(out) + ")$"


def filter_expr(filters: Filters) -> pl.Expr | None:
    """One polars predicate for the row filters of a sync job (None when nothing filters)."""
    preds: list[pl.Expr] = []
    if filters.event_names_include:
        preds.append(pl.any_horizontal([pl.col("event_name").str.contains(glob_to_regex(p)) for p in filters.event_names_include]))
    if filters.event_names_exclude:
        preds.append(~pl.any_horizontal([pl.col("event_name").str.contains(glob_to_regex(p)) for p in filters.event_names_exclude]))
    for col, include, exclude in (
        ("user_id", filters.user_ids_include, filters.user_ids_exclude),
        ("company_id", filters.company_ids_include, filters.company_ids_exclude),
    ):
        if include:
            preds.append(pl.col(col).is_in(list(include)).fill_null(False))
        if exclude:
            preds.append(~pl.col(col).is_in(list(exclude)).fill_null(False))
    if not preds:
        return None
    return pl.all_horizontal(preds)


def _add_interaction_columns(frame: pl.DataFrame) -> pl.DataFrame:
    parts = pl.col("event_name").str.extract_groups(r"^([^:]*):(.*):([^:]*)$")
    return frame.with_columns(
        parts.struct.field("1").alias("entity_type"),
        parts.struct.field("2").alias("entity_id"),
        parts.struct.field("3").alias("interaction_status"),
    )


def _read_bucket(pattern: str) -> pl.DataFrame:
    """One staged hour bucket (a glob of its IPC files, read in name order) as a frame."""
    frame = pl.from_arrow(read_ipc_files(sorted(glob.glob(pattern))))
    assert isinstance(frame, pl.DataFrame)
    return frame


def prepare_export(staged: StagedDay, job: SyncJob, event_type: str, out_dir: Path) -> PreparedExport:
    """Filter, de-duplicate, order and validate one event type of a staged partition.

    Writes ordered Parquet buckets under ``out_dir`` (replaced if present). Raises
    ValidationError naming the sync job, partition, event type, column and failing values.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    day_start, day_end = day_window(parse_partition(staged.partition))
    schema = export_arrow_schema(event_type, staged.exclude_columns)
    predicate = filter_expr(job.filters)
    files: list[str] = []
    rows = staged_rows = filtered = dupes = 0
    unknown_sources: Counter = Counter()
    unknown_statuses: Counter = Counter()
    entities: Counter = Counter()
    pending: list[pl.DataFrame] = []
    pending_rows = 0

    def flush() -> None:
        # Validate and write the pending buckets as one prepared file (fewer, larger validations).
        nonlocal pending, pending_rows, rows
        if not pending:
            return
        frame = pl.concat(pending, how="vertical", rechunk=True)
        pending, pending_rows = [], 0
        validate_export_frame(
            frame,
            sync_job=job.name,
            partition=staged.partition,
            event_type=event_type,
            exclude_columns=staged.exclude_columns,
            app_token=job.app_token,
            day_start=day_start,
            day_end=day_end,
        )
        if "source" in frame.columns:
            for value, n in frame.get_column("source").drop_nulls().value_counts().iter_rows():
                if value not in KNOWN_SOURCES:
                    unknown_sources[value] += n
        if event_type == "interaction":
            for value, n in frame.get_column("interaction_status").value_counts().iter_rows():
                if value not in KNOWN_INTERACTION_STATUSES:
                    unknown_statuses[value] += n
            for value, n in frame.get_column("entity_type").value_counts().iter_rows():
                entities[value] += n
        if frame.height:
            path = out_dir / f"{len(files):05d}{STAGED_SUFFIX}"
            writer = IpcFileWriter(path, schema)
            try:
                writer.write_table(frame.to_arrow().cast(schema))
            finally:
                writer.close()
            files.append(str(path))
            rows += frame.height

    for bucket in staged.bucket_files(event_type):
        frame = _read_bucket(bucket)
        staged_rows += frame.height
        if predicate is not None:
            kept = frame.filter(predicate)
            filtered += frame.height - kept.height
            frame = kept
        if event_type == "interaction":
            frame = _add_interaction_columns(frame)
        # Fast path: ids all distinct -> no exact duplicates and no conflicting ids, nothing to
        # drop (hashing one column instead of every column of every row).
        if frame.get_column("internal_event_id").is_duplicated().any():
            before = frame.height
            frame = frame.unique(maintain_order=True)
            dupes += before - frame.height
            clash = frame.filter(pl.col("internal_event_id").is_duplicated())
        else:
            clash = frame.clear()
        if clash.height:
            ids = clash.get_column("internal_event_id").unique(maintain_order=True).head(5).to_list()
            raise ValidationError(
                f"sync job {job.name!r}, partition {staged.partition}, event type {event_type!r}: "
                f"column 'internal_event_id' has {clash.height} row(s) sharing an id with different content, "
                f"e.g. {ids!r}; an id must identify one event. Fix the source data and re-materialize the "
                f"partition. Nothing was exported for this partition."
            )
        pending.append(frame.sort(list(SORT_KEY), maintain_order=True).select(schema.names))
        pending_rows += frame.height
        if pending_rows >= VALIDATION_ROWS:
            flush()
    flush()
    prepared = PreparedExport(
        sync_job=job.name,
        partition=staged.partition,
        event_type=event_type,
        files=files,
        rows=rows,
        rows_staged=staged_rows,
        filtered_out=filtered,
        duplicates_dropped=dupes,
        exclude_columns=list(staged.exclude_columns),
        unknown_sources=dict(sorted(unknown_sources.items())),
        unknown_statuses=dict(sorted(unknown_statuses.items())),
        entity_types=dict(sorted(entities.items())),
        source_rows=staged.rows_received,
    )
    (out_dir / PREPARED_RECORD).write_text(prepared.to_json())
    return prepared


def load_prepared(out_dir: Path) -> PreparedExport:
    """Read back a :class:`PreparedExport` written by :func:`prepare_export`."""
    return PreparedExport(**json.loads((Path(out_dir) / PREPARED_RECORD).read_text()))
