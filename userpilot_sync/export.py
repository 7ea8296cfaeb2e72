"""Prepare one export (one event type of one partition) from staged raw events, encoded once.

The staged hours of the event type (``StagedDay.hours``) are read in hour order, in groups of
consecutive hours of about ``VALIDATION_ROWS`` staged rows (record batches of the staged files).
For each group:

1. apply the sync job's filters (event names include/exclude globs, user/company lists);
2. add the parsed interaction columns (``entity_type``, ``entity_id``, ``interaction_status``);
3. drop exact duplicates (same ``internal_event_id``, same content) — exact duplicates share
   ``inserted_at`` (a hashed field), hence the same hour: duplicates are looked for per hour;
4. refuse ids seen twice within an hour with different content (a ValidationError naming samples);
5. sort stably by (``inserted_at``, ``internal_event_id``) — hours are disjoint ranges of
   ``inserted_at``, so sorting a run of hours at once orders it exactly as hour by hour;
6. validate with the event type's pandera schema (data level, eager frame);
7. hand the validated rows, cast to the export schema one ``ENCODE_ROWS`` slice at a time, to
   one streaming writer per export format
   (``destination/formats.py:PartsWriter``), which encodes them to local part files under
   ``<out_dir>/<format>/`` — the only encode: the bytes that upload are the bytes validated here;
   optionally (``keep_rows``) also to ``<out_dir>/<NNNNN>.arrow`` for Userpilot's documented files,
   which read the export's rows again.

Two ways through a group, with the same result byte for byte (the writers re-batch rows into
their own row groups, so how rows are handed to them does not show in the files):

* **In slices** (a group of more than ``ENCODE_ROWS`` staged rows whose ids are all distinct, the
  usual case): only the two sort-key columns of the group are read first (from memory-mapped
  staged files, which touches only those columns' pages); with distinct ids there is nothing to
  de-duplicate (steps 3-4). The stable sort of all the group's rows is computed from the keys; then
  each ``ENCODE_ROWS`` slice of that order is gathered from the mapped files, filtered (the kept
  rows of a stable sort, in order, are the stable sort of the kept rows), validated and encoded.
  Memory: the group's keys plus one slice, whatever the size of an hour (one hour of ``track`` is
  ~170,000 rows on a 10M-event day), when the source delivers roughly in time order; when the
  sorted order is scattered over the staged batches, gathering a slice touches pages of most of
  the group's mapped files (file-backed, released when the slice's maps close and its rows are
  encoded). When a slice fails validation, the group is read whole and validated as on the whole
  path, so the ValidationError is the one reading it whole gives.
* **Whole** (a group of one slice or less, or one where an id repeats): the group is read into
  memory; ids that repeat are de-duplicated and checked hour by hour (an hour is where two rows of
  one id meet), otherwise the sorted order is a permutation applied one slice at a time when
  encoding. Memory: one group. A ValidationError describes the group, its samples in staged order
  (in sorted order, hour by hour, when ids repeat).

Small exports (one group read whole, e.g. each event type of each day of a backfill range at
20,000 events a day) can be prepared together, :func:`prepare_small_exports`: their rows are
validated in one pandera call (pandera costs ~40 ms per call whatever the rows, ~50 small polars
queries), and each alone only when that call fails, so files and errors are those of
:func:`prepare_export`.

The result, a :class:`PreparedExport`, is a handle to the encoded parts; nothing reaches the
destination here, and the caller uploads a day only after every event type of the day prepared
(``pipeline.prepare_days``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from userpilot_sync.config.model import Filters, FormatSpec, SyncJob
from userpilot_sync.destination.formats import ROW_GROUP_ROWS, LocalPart, PartsWriter
from userpilot_sync.errors import ValidationError
from userpilot_sync.partitions import day_window, parse_partition
from userpilot_sync.schema.events import KNOWN_INTERACTION_STATUSES, KNOWN_SOURCES, export_arrow_schema
from userpilot_sync.schema.validation import validate_export_frame
from userpilot_sync.staging import STAGED_SUFFIX, IpcFileWriter, StagedDay

PREPARED_RECORD = "prepared.json"
SORT_KEY = ("inserted_at", "internal_event_id")
#: Hours are read, validated and encoded in groups of at least this many staged rows (bounded memory:
#: with one group per preparing thread the 5M-event day stays under 600 MB, docs/performance.md).
VALIDATION_ROWS = 65_536
#: rows cast to the export schema and handed to the writers at once (their row group: formats.ROW_GROUP_ROWS)
ENCODE_ROWS = ROW_GROUP_ROWS


@dataclass
class PreparedExport:
    """A validated, de-duplicated, ordered export, encoded and waiting to be uploaded.

    ``parts`` maps each export format (``parquet``, ``ndjson``, ``csv``, ``avro``) to its local
    part files in order (``{"path", "rows", "bytes", "sha256"}``: bytes and sha256 of the file as
    it will upload). ``files``, when the rows were kept (``keep_rows``), are Arrow IPC files whose
    rows, concatenated, are the export, with exactly the columns of
    :func:`~userpilot_sync.schema.events.export_arrow_schema`; otherwise empty.
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
    parts: dict[str, list[dict]] = field(default_factory=dict)
    rows_kept: bool = False

    @property
    def arrow_schema(self) -> pa.Schema:
        return export_arrow_schema(self.event_type, self.exclude_columns)

    def local_parts(self, fmt: str) -> list[LocalPart]:
        """The encoded part files of one format, in order. Raises KeyError naming the export when
        the format was not encoded (prepared for another sync job's formats)."""
        if fmt not in self.parts:
            raise KeyError(f"sync job {self.sync_job!r}, partition {self.partition}, event type {self.event_type!r}: "
                           f"no {fmt} files were encoded (encoded: {sorted(self.parts) or 'none'})")
        return [LocalPart(Path(p["path"]), p["rows"], p["bytes"], p["sha256"]) for p in self.parts[fmt]]

    def iter_batches(self, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream the export's rows in order, as record batches of the export schema (only when the
        rows were kept: ``prepare_export(..., keep_rows=True)``; raises ValueError otherwise)."""
        if not self.rows_kept and self.rows:
            raise ValueError(f"sync job {self.sync_job!r}, partition {self.partition}, event type "
                             f"{self.event_type!r}: the rows were not kept (prepare with keep_rows=True)")
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

    def moved(self, old_root: Path, new_root: Path, out_dir: Path) -> None:
        """Point the paths of the encoded parts and kept rows from ``old_root`` to ``new_root``
        after the folder holding them was renamed (a staged day moved into place), and rewrite
        ``out_dir/prepared.json`` (``out_dir``: the export's folder after the move)."""
        old, new = str(old_root), str(new_root)

        def move(path: str) -> str:
            return new + path[len(old):] if path.startswith(old + os.sep) else path

        self.files = [move(f) for f in self.files]
        self.parts = {fmt: [dict(p, path=move(p["path"])) for p in parts] for fmt, parts in self.parts.items()}
        (Path(out_dir) / PREPARED_RECORD).write_text(self.to_json())


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


class _StagedHours:
    """Reads staged hours of one event type from its staged files (``<raw_dir>/<NNNNN>.arrow``):
    record batches by ``StagedDay.hours`` references."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = Path(raw_dir)
        self.readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self.sources: list[pa.OSFile] = []

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.sources.clear()
        self.readers.clear()

    def read(self, hours: list[tuple[int, list[tuple[int, int, int]]]]) -> pl.DataFrame:
        """The rows of ``hours`` (in hour order, each hour in staged order) with an ``_hour`` column."""
        batches: list[pa.RecordBatch] = []
        hour_rows: list[int] = []
        for hour, refs in hours:
            n = 0
            for number, index, _ in refs:
                reader = self.readers.get(number)
                if reader is None:
                    # plain reads, not a memory map: mapped pages of the staged files would count in the
                    # process's memory (RSS) for as long as the file stays open
                    source = pa.OSFile(str(self.raw_dir / f"{number:05d}{STAGED_SUFFIX}"))
                    self.sources.append(source)
                    reader = pa.ipc.open_file(source)
                    self.readers[number] = reader
                batch = reader.get_batch(index)
                batches.append(batch)
                n += batch.num_rows
            hour_rows.append(n)
        frame = pl.from_arrow(pa.Table.from_batches(batches))
        assert isinstance(frame, pl.DataFrame)
        # one column for the whole group (a polars call per hour cost ~0.3 ms each, 168 per day)
        hour_of_row = np.repeat(np.array([hour for hour, _ in hours], dtype=np.int8), hour_rows)
        return frame.with_columns(pl.Series("_hour", hour_of_row, dtype=pl.Int8))


class _MappedBatches:
    """The staged record batches of one group, memory-mapped (``with``: the maps are closed on exit).

    A mapped batch costs nothing until its pages are read: selecting two columns touches only those
    columns' pages, and taking some rows touches only theirs. Pages read count in the process's memory
    (RSS) while the map is open (and zero-copy slices keep theirs until their rows are encoded), so a
    map is opened for one pass or one slice, never for a whole group.
    ``refs`` are ``(file number, batch index)`` pairs, in group order.
    """

    def __init__(self, raw_dir: Path, refs: list[tuple[int, int]]):
        self.raw_dir = Path(raw_dir)
        self.refs = refs
        self.maps: dict[int, pa.MemoryMappedFile] = {}
        self.readers: dict[int, pa.ipc.RecordBatchFileReader] = {}

    def __enter__(self) -> "_MappedBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.readers.clear()
        for source in self.maps.values():
            source.close()
        self.maps.clear()

    def batch(self, i: int) -> pa.RecordBatch:
        number, index = self.refs[i]
        reader = self.readers.get(number)
        if reader is None:
            source = pa.memory_map(str(self.raw_dir / f"{number:05d}{STAGED_SUFFIX}"))
            self.maps[number] = source
            reader = self.readers[number] = pa.ipc.open_file(source)
        return reader.get_batch(index)

    def columns(self, names: list[str]) -> pl.DataFrame:
        """Some columns of every batch of the group, in group order, as one frame."""
        table = pa.Table.from_batches([self.batch(i).select(names) for i in range(len(self.refs))])
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame

    def take(self, rows: np.ndarray, starts: np.ndarray) -> pl.DataFrame:
        """The rows at positions ``rows`` of the group (``starts``: each batch's first position),
        in the order given, every column. Rows taken from a batch in one consecutive run (a source
        that delivers in time order) are a zero-copy slice of the mapped batch."""
        if not len(rows):
            return pl.from_arrow(self.batch(0).slice(0, 0))  # type: ignore[return-value]
        in_order = bool(np.all(rows[1:] > rows[:-1]))
        ascending = None if in_order else np.argsort(rows, kind="stable")
        wanted = rows if ascending is None else rows[ascending]
        which = np.searchsorted(starts, wanted, side="right") - 1
        bounds = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(wanted)]
        pieces = []
        for first, end in zip(bounds[:-1], bounds[1:]):
            i = int(which[first])
            batch = self.batch(i)
            local = wanted[first:end] - starts[i]
            if int(local[-1]) - int(local[0]) + 1 == len(local):
                pieces.append(batch.slice(int(local[0]), len(local)))
            else:
                pieces.append(batch.take(pa.array(local)))
        frame = pl.from_arrow(pa.Table.from_batches(pieces))
        assert isinstance(frame, pl.DataFrame)
        del pieces
        if ascending is None:
            return frame
        rank = np.empty_like(ascending)
        rank[ascending] = np.arange(len(ascending))
        return frame.select(pl.all().gather(pl.Series(rank)))


def _dedupe_hour(frame: pl.DataFrame, job: SyncJob, partition: str, event_type: str) -> tuple[pl.DataFrame, int]:
    """Exact duplicates dropped from one hour's rows; raises ValidationError on ids that clash."""
    before = frame.height
    frame = frame.unique(maintain_order=True)
    clash = frame.filter(pl.col("internal_event_id").is_duplicated())
    if clash.height:
        ids = clash.get_column("internal_event_id").unique(maintain_order=True).head(5).to_list()
        raise ValidationError(
            f"sync job {job.name!r}, partition {partition}, event type {event_type!r}: "
            f"column 'internal_event_id' has {clash.height} row(s) sharing an id with different content, "
            f"e.g. {ids!r}; an id must identify one event. Fix the source data and re-materialize the "
            f"partition. Nothing was exported for this partition."
        )
    return frame, before - frame.height


def _hour_groups(hours: list, rows_per_group: int) -> Iterator[list]:
    """Consecutive hours grouped until a group holds at least ``rows_per_group`` staged rows
    (counted from the batches' lengths, not read)."""
    group: list = []
    rows = 0
    for hour in hours:
        group.append(hour)
        rows += sum(n for *_, n in hour[1])
        if rows >= rows_per_group:
            yield group
            group, rows = [], 0
    if group:
        yield group


class ExportPreparer:
    """One export (an event type of a partition) prepared group by group: the streaming form of
    :func:`prepare_export`, for callers that receive the staged hours while staging still runs
    (``pipeline.stage_and_prepare``).

    ``add(group)`` takes the next group of consecutive staged hours (``[(hour, [(file number,
    batch index, rows), ...]), ...]``, hours ascending, groups in order; the staged files under
    ``raw_dir`` holding them must be closed); ``finish(source_rows)`` closes the encoded parts and
    returns the :class:`PreparedExport`; ``abort()`` closes everything and deletes ``out_dir``.
    Fed the groups of :func:`_hour_groups` over all staged hours, the result is byte for byte the
    one :func:`prepare_export` gives. ``add`` raises ValidationError (naming sync job, partition,
    event type, column and samples); the preparer is then aborted.
    """

    def __init__(self, job: SyncJob, partition: str, event_type: str, exclude_columns: list[str], raw_dir: Path,
                 out_dir: Path, *, formats: tuple[FormatSpec, ...] | None = None, keep_rows: bool = False):
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        self.job = job
        self.partition = partition
        self.event_type = event_type
        self.exclude_columns = list(exclude_columns)
        self.out_dir = out_dir
        self.keep_rows = keep_rows
        self.formats = tuple(job.formats if formats is None else formats)
        self.day_start, self.day_end = day_window(parse_partition(partition))
        self.schema = export_arrow_schema(event_type, self.exclude_columns)
        self.predicate = filter_expr(job.filters)
        self.files: list[str] = []
        self.rows = self.staged_rows = self.filtered = self.dupes = 0
        self.unknown_sources: Counter = Counter()
        self.unknown_statuses: Counter = Counter()
        self.entities: Counter = Counter()
        self.writers = [PartsWriter(self.schema, spec, out_dir / spec.format, event_type, max_rows=job.max_file_rows,
                                    max_bytes=job.max_file_bytes) for spec in self.formats]
        self.kept: IpcFileWriter | None = None
        self.reader = _StagedHours(raw_dir)
        self.closed = False

    def add(self, group: list) -> None:
        """Filter, de-duplicate, order, validate and encode one group of staged hours."""
        try:
            self._add(group)
        except BaseException:
            self.abort()
            raise

    def _add(self, group: list) -> None:
        refs = [(number, index) for _, hour_refs in group for number, index, _ in hour_refs]
        counts = np.array([n for _, hour_refs in group for *_, n in hour_refs], dtype=np.int64)
        rows = int(counts.sum())
        if rows <= ENCODE_ROWS:
            self._add_read(group)
            return
        # Sliced: the sort keys first (two columns), then the rows one slice of the sorted order at
        # a time, gathered from the memory-mapped staged batches: memory is one slice, not the group.
        with _MappedBatches(self.reader.raw_dir, refs) as mapped:
            keys = mapped.columns(list(SORT_KEY))
        if keys.get_column("internal_event_id").is_duplicated().any():
            del keys
            self._add_read(group)  # ids repeat: de-duplicated hour by hour, whole hours in memory
            return
        # the stable sort of all rows; the filter below keeps a subsequence of it, which is the
        # stable sort of the kept rows (the order the whole-group path gives)
        order = keys.select(pl.arg_sort_by(list(SORT_KEY), maintain_order=True)).to_series().to_numpy()
        del keys
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.staged_rows += rows
        for offset in range(0, rows, ENCODE_ROWS):
            with _MappedBatches(self.reader.raw_dir, refs) as mapped:
                frame = mapped.take(order[offset:offset + ENCODE_ROWS], starts)
            if self.predicate is not None:
                kept_rows = frame.filter(self.predicate)
                self.filtered += frame.height - kept_rows.height
                frame = kept_rows
            if frame.height:
                if self.event_type == "interaction":
                    frame = _add_interaction_columns(frame)
                try:
                    self._emit(frame.select(self.schema.names), None)
                except ValidationError as slice_error:
                    # the refusal describes the whole group, as reading it whole does (every failing
                    # column, counts of the group, samples in staged order); the group is read only
                    # on this path, and the preparer is aborted after it
                    del frame
                    whole, _ = self._read_group(group)
                    self.validate(whole)
                    raise slice_error from None
            del frame

    def _add_read(self, group: list) -> None:
        """One group read whole (a small group, or one whose ids repeat)."""
        self._emit(*self._read_group(group))

    def _read_group(self, group: list) -> tuple[pl.DataFrame, pl.Series | None]:
        """One group read whole, filtered, de-duplicated: its rows (columns of the export schema) and
        their sorted order (positions; None when they are in order). Raises ValidationError on ids
        that clash; nothing is validated or encoded yet."""
        job, event_type, schema = self.job, self.event_type, self.schema
        frame = self.reader.read(group)
        self.reader.close()  # the batches were read into memory; at most one group's files are open
        self.staged_rows += frame.height
        if self.predicate is not None:
            kept_rows = frame.filter(self.predicate)
            self.filtered += frame.height - kept_rows.height
            frame = kept_rows
        if event_type == "interaction":
            frame = _add_interaction_columns(frame)
        # Fast path: ids all distinct -> no exact duplicates and no conflicting ids, nothing to
        # drop (hashing one column instead of every column of every row); else hour by hour.
        order: pl.Series | None = None  # the rows' sorted order, when the frame itself is not sorted
        if frame.get_column("internal_event_id").is_duplicated().any():
            pieces = []
            for (_,), hour_frame in frame.group_by(["_hour"], maintain_order=True):
                hour_frame, dropped = _dedupe_hour(hour_frame.drop("_hour"), job, self.partition, event_type)
                self.dupes += dropped
                pieces.append(hour_frame.sort(list(SORT_KEY), maintain_order=True))
            frame = pl.concat(pieces, how="vertical") if pieces else frame.drop("_hour")
        else:
            # the stable sort as a permutation, applied a slice at a time when encoding below: no
            # sorted copy of the whole group next to it (the same rows in the same order)
            frame = frame.drop("_hour")
            order = frame.select(pl.arg_sort_by(list(SORT_KEY), maintain_order=True)).to_series()
            if order.is_sorted():  # a permutation in ascending order: the rows are in order already
                order = None
        return frame.select(schema.names), order

    def validate(self, frame: pl.DataFrame) -> None:
        """Validate rows of this export (columns of the export schema) against the event type's
        pandera schema, inside this partition's UTC day. Raises ValidationError."""
        validate_export_frame(
            frame,
            sync_job=self.job.name,
            partition=self.partition,
            event_type=self.event_type,
            exclude_columns=self.exclude_columns,
            app_token=self.job.app_token,
            day_start=self.day_start,
            day_end=self.day_end,
        )

    def _emit(self, frame: pl.DataFrame, order: pl.Series | None, *, validated: bool = False) -> None:
        """Validate rows of the export (columns of the export schema; not again when ``validated``)
        and hand them to the writers in ``order`` (positions in ``frame``; None: as they are)."""
        event_type, schema = self.event_type, self.schema
        if not validated:
            self.validate(frame)
        if "source" in frame.columns:
            for value, n in frame.get_column("source").drop_nulls().value_counts().iter_rows():
                if value not in KNOWN_SOURCES:
                    self.unknown_sources[value] += n
        if event_type == "interaction":
            for value, n in frame.get_column("interaction_status").value_counts().iter_rows():
                if value not in KNOWN_INTERACTION_STATUSES:
                    self.unknown_statuses[value] += n
            for value, n in frame.get_column("entity_type").value_counts().iter_rows():
                self.entities[value] += n
        # Encoded a row group at a time: string views straight from polars, one cast to the export
        # schema's strings per slice, so the cast copy is one slice (ENCODE_ROWS), not the whole
        # group (a group is at least one hour: ~170,000 rows of one event type on a 10M-event day).
        # The writers re-batch rows into their own row groups, so the bytes are the same.
        for offset in range(0, frame.height, ENCODE_ROWS):
            part = (frame.slice(offset, ENCODE_ROWS) if order is None
                    else frame.select(pl.all().gather(order.slice(offset, ENCODE_ROWS))))
            table = part.to_arrow(compat_level=pl.CompatLevel.newest()).cast(schema)
            del part
            for writer in self.writers:
                writer.write(table)
            if self.keep_rows:
                if self.kept is None:
                    path = self.out_dir / f"{len(self.files):05d}{STAGED_SUFFIX}"
                    self.kept = IpcFileWriter(path, schema)
                    self.files.append(str(path))
                self.kept.write_table(table)
            self.rows += table.num_rows
            del table

    def finish(self, source_rows: int) -> PreparedExport:
        """Close the encoded parts; the prepared export (also written to ``out_dir/prepared.json``).
        ``source_rows``: the rows the partition received from the source (``StagedDay.rows_received``)."""
        try:
            parts = {spec.format: [{"path": str(p.path), "rows": p.rows, "bytes": p.bytes, "sha256": p.sha256}
                                   for p in writer.close()] for spec, writer in zip(self.formats, self.writers)}
        except BaseException:
            self.abort()
            raise
        self._close_inputs()
        prepared = PreparedExport(
            sync_job=self.job.name,
            partition=self.partition,
            event_type=self.event_type,
            files=self.files,
            rows=self.rows,
            rows_staged=self.staged_rows,
            filtered_out=self.filtered,
            duplicates_dropped=self.dupes,
            exclude_columns=self.exclude_columns,
            unknown_sources=dict(sorted(self.unknown_sources.items())),
            unknown_statuses=dict(sorted(self.unknown_statuses.items())),
            entity_types=dict(sorted(self.entities.items())),
            source_rows=source_rows,
            parts=parts,
            rows_kept=self.keep_rows,
        )
        (self.out_dir / PREPARED_RECORD).write_text(prepared.to_json())
        return prepared

    def _close_inputs(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reader.close()
        if self.kept is not None:
            self.kept.close()

    def abort(self) -> None:
        """Stop: close the staged files and the encoders, delete ``out_dir``. Idempotent."""
        if not self.closed:
            for writer in self.writers:
                writer.abort()
            self._close_inputs()
        shutil.rmtree(self.out_dir, ignore_errors=True)


def prepare_export(staged: StagedDay, job: SyncJob, event_type: str, out_dir: Path, *,
                   formats: tuple[FormatSpec, ...] | None = None, keep_rows: bool = False) -> PreparedExport:
    """Filter, de-duplicate, order, validate and encode one event type of a staged partition.

    Encodes the rows in each of ``formats`` (default: the sync job's) to local part files under
    ``out_dir/<format>/`` (rotated at the sync job's ``max_file_rows``/``max_file_bytes``), and
    with ``keep_rows`` also writes them as Arrow IPC files under ``out_dir`` (for the documented
    files). ``out_dir`` is replaced if present. Raises ValidationError naming the sync job,
    partition, event type, column and failing values; nothing is left open on errors.
    """
    preparer = ExportPreparer(job, staged.partition, event_type, staged.exclude_columns,
                              staged.root / "raw" / event_type, out_dir, formats=formats, keep_rows=keep_rows)
    for group in _hour_groups(staged.hours(event_type), VALIDATION_ROWS):
        preparer.add(group)
    return preparer.finish(staged.rows_received)


def is_small_export(staged: StagedDay, event_type: str) -> bool:
    """True when the event type of a staged day is one group of hours read whole (fewer staged rows
    than ``VALIDATION_ROWS`` and at most one slice, counted from the staged batches' index):
    :func:`prepare_small_exports` can take it."""
    rows = sum(n for _, refs in staged.hours(event_type) for *_, n in refs)
    return rows < VALIDATION_ROWS and rows <= ENCODE_ROWS


def prepare_small_exports(job: SyncJob, event_type: str, items: list[tuple[StagedDay, Path, bool]]
                          ) -> list[PreparedExport | ValidationError]:
    """Prepare small exports of one event type (:func:`is_small_export`; e.g. the days of a backfill
    range) with one pandera call for all of them instead of one per export.

    ``items``: ``(staged day, out_dir, keep_rows)`` each. Returns, in the items' order, what
    :func:`prepare_export` gives for each alone, byte for byte: the :class:`PreparedExport`, or the
    ValidationError that refuses it (its ``out_dir`` removed). The rows of all items are validated
    at once against the event type's schema with the range's bounds, and each item's
    ``inserted_at`` is checked against its own UTC day; if anything fails, each item is validated
    again on its own, so an error names its own partition, columns and samples. Memory: the items'
    rows (callers keep a batch under ``VALIDATION_ROWS`` rows plus one item). Other errors (disk,
    library) are raised after every item was closed.
    """
    preparers: list[ExportPreparer | None] = []
    read: list[tuple[pl.DataFrame, pl.Series | None] | None] = []
    results: list[PreparedExport | ValidationError | None] = [None] * len(items)
    try:
        for i, (staged, out_dir, keep) in enumerate(items):
            if not is_small_export(staged, event_type):
                raise ValueError(f"sync job {job.name!r}, partition {staged.partition}, event type {event_type!r}: "
                                 f"{staged.rows_by_event_type.get(event_type, 0)} staged rows are not a small export")
            preparer = ExportPreparer(job, staged.partition, event_type, staged.exclude_columns,
                                      staged.root / "raw" / event_type, out_dir, keep_rows=keep)
            preparers.append(preparer)
            groups = list(_hour_groups(staged.hours(event_type), VALIDATION_ROWS))
            if len(groups) > 1:  # pragma: no cover - is_small_export counts the same batches
                raise ValueError(f"sync job {job.name!r}, partition {staged.partition}, event type "
                                 f"{event_type!r}: {len(groups)} groups of hours are not a small export")
            try:
                read.append(preparer._read_group(groups[0]) if groups else None)  # closes its files
            except ValidationError as exc:  # ids that clash: this export is refused, the others go on
                preparer.abort()
                results[i] = exc
                read.append(None)
        pending = [i for i, r in enumerate(read) if r is not None and results[i] is None]
        if not _valid_together(job, event_type, [(preparers[i], read[i][0]) for i in pending]):
            for i in pending:
                try:
                    preparers[i].validate(read[i][0])
                except ValidationError as exc:
                    preparers[i].abort()
                    results[i] = exc
        for i, (staged, _, _) in enumerate(items):
            if results[i] is not None:
                continue
            if read[i] is not None:
                frame, order = read[i]
                preparers[i]._emit(frame, order, validated=True)
                read[i] = None
            results[i] = preparers[i].finish(staged.rows_received)
    except BaseException:
        for preparer in preparers:
            preparer.abort()
        raise
    return results  # type: ignore[return-value]


def _valid_together(job: SyncJob, event_type: str, frames: list[tuple[ExportPreparer, pl.DataFrame]]) -> bool:
    """True when the rows of every (preparer, frame) pass the event type's schema in one call and
    each frame's ``inserted_at`` lies inside its own partition's UTC day; False otherwise (the
    caller then validates each frame alone)."""
    if not frames:
        return True
    for preparer, frame in frames:
        if frame.height:
            stamps = frame.get_column("inserted_at")
            if not (preparer.day_start <= stamps.min() and stamps.max() < preparer.day_end):
                return False
    first = frames[0][0]
    if any(frame.schema != frames[0][1].schema for _, frame in frames):
        return False  # columns or dtypes differ somewhere (concat could cast them): one by one
    together = pl.concat([frame for _, frame in frames], how="vertical")
    try:
        validate_export_frame(
            together,
            sync_job=job.name,
            partition=f"{frames[0][0].partition}..{frames[-1][0].partition}",
            event_type=event_type,
            exclude_columns=first.exclude_columns,
            app_token=job.app_token,
            day_start=min(p.day_start for p, _ in frames),
            day_end=max(p.day_end for p, _ in frames),
        )
    except ValidationError:
        return False
    return True


def load_prepared(out_dir: Path) -> PreparedExport:
    """Read back a :class:`PreparedExport` written by :func:`prepare_export`."""
    return PreparedExport(**json.loads((Path(out_dir) / PREPARED_RECORD).read_text()))
