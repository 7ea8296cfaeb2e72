"""Staging: raw events of one or more partitions, normalised and bucketed on local disk.

Layout of one staged partition (``<root>/<sync_job>/<YYYY-MM-DD>/``)::

    raw/<event_type>/<NNNNN>.arrow     events of that type (usually one file per day and event type)
    staged.json                        the StagedDay record (counts, unknown columns, source facts, and
                                       which record batches of which file hold each hour: ``batches``)

Staged files are Arrow IPC files (uncompressed by default, ``STAGED_COMPRESSION_ENV``): they live
only until the export is written, and IPC costs a fraction of Parquet's encoding to write and is read back without decoding
(see docs/performance.md). Every record batch of a staged file holds the events of one hour (UTC,
by ``inserted_at``); ``StagedDay.batches`` indexes them, so preparation reads an hour (or a run of
hours) by memory-mapping exactly its batches.

Batches from the source are normalised (``source/normalize.py``), excluded columns are dropped
before anything touches disk, rows outside the requested window are counted and skipped, and
every row is appended, as part of one record batch per (day, event type, hour) and source group,
to the IPC writer of its (day, event type). At most ``MAX_OPEN_WRITERS`` writers are open at once
(least recently used are closed; a (day, event type) written again gets another file), so a range
of many days stages with bounded memory and file handles. The source is read one batch ahead in a
background thread (``PREFETCH_BATCHES``); groups of source batches are normalised and split per
(day, event type, hour) on ``stage_threads()`` threads (two groups at a time by default), and one
thread appends their parts to the staged files in source order, so the staged files are the same
for any number of threads. Memory holds a few source groups at a time plus the writers' buffers;
never a whole day.

A day whose events break the schema while staging (an unknown ``event_type``) is marked failed
(``StagedDay.error``) and its other events are still staged; in a one-day extraction the error
is raised at once. A staged day is written
into a temporary folder and renamed into place when complete, so a failed extraction never
leaves a half-staged day behind.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import uuid
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import polars as pl
import pyarrow as pa

from userpilot_sync.errors import ConfigError, SourceError, ValidationError
from userpilot_sync.faults import pause_point
from userpilot_sync.partitions import day_window
from userpilot_sync.schema.events import EVENT_TYPES, staged_arrow_schema
from userpilot_sync.source.base import Extraction, SourceBatch
from userpilot_sync.source.normalize import NormalizeReport, normalize_arrow

STAGED_RECORD = "staged.json"
#: Environment variable choosing the compression of staged Arrow IPC files: ``none`` (default), ``lz4``
#: or ``zstd``. Staged files are internal (never exported) and read once, from the page cache, right
#: after they are written: LZ4 cost ~14 % of the CPU of a day's export (1M events: writing 1.70 ->
#: 0.26 s, reading back 0.79 -> 0.23 s) for ~3.2x fewer staged bytes on local disk (376 MB instead of
#: 118 MB per million events). ``lz4`` suits a worker whose staging disk is small (docs/performance.md).
STAGED_COMPRESSION_ENV = "USERPILOT_SYNC_STAGING_COMPRESSION"
_COMPRESSIONS = {"none": None, "lz4": "lz4", "zstd": "zstd"}


def staged_compression() -> str | None:
    """The staged files' Arrow IPC compression (``None``, ``"lz4"`` or ``"zstd"``) from
    :data:`STAGED_COMPRESSION_ENV`. Raises ConfigError for another value."""
    value = os.environ.get(STAGED_COMPRESSION_ENV, "none").strip().lower() or "none"
    if value not in _COMPRESSIONS:
        raise ConfigError(f"{STAGED_COMPRESSION_ENV}={value!r} is not a staging compression; "
                          f"choose one of {', '.join(_COMPRESSIONS)}")
    return _COMPRESSIONS[value]
#: File suffix of staged buckets and prepared exports (Arrow IPC file format).
STAGED_SUFFIX = ".arrow"
MAX_OPEN_WRITERS = 256
#: Source batches decoded ahead of staging by the prefetch thread.
PREFETCH_BATCHES = 1
#: Consecutive small source batches (e.g. the demo source's 15-minute blocks) are staged together
#: up to this many rows: normalising and bucketing cost a lot per batch, little per row.
COALESCE_ROWS = 65_536
#: Environment variable: threads that normalise and split source groups while staging (``stage_threads``).
STAGE_THREADS_ENV = "USERPILOT_SYNC_STAGE_THREADS"


def ipc_write_options() -> pa.ipc.IpcWriteOptions:
    """Options of every staged/prepared Arrow IPC file."""
    return pa.ipc.IpcWriteOptions(compression=staged_compression())


class IpcFileWriter:
    """An Arrow IPC file writer that owns its output file (closed together)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._sink = pa.OSFile(str(path), "wb")
        try:
            self._writer = pa.ipc.new_file(self._sink, schema, options=ipc_write_options())
        except BaseException:
            self._sink.close()
            raise

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def write_batches(self, table: pa.Table) -> list[int]:
        """Write ``table`` as record batches (one per chunk). Returns their row counts."""
        rows = []
        for batch in table.to_batches():
            if batch.num_rows:
                self._writer.write_batch(batch)
                rows.append(batch.num_rows)
        return rows

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.close()


@dataclass
class StagedDay:
    """One staged partition: where its buckets are and what was counted while staging.

    ``rows_by_event_type`` counts staged rows (before filters and de-duplication);
    ``rows_outside_window`` counts rows the source delivered outside the requested window.
    """

    sync_job: str
    partition: str
    path: str
    rows_received: int = 0
    rows_outside_window: int = 0
    rows_by_event_type: dict[str, int] = field(default_factory=dict)
    unknown_columns: list[str] = field(default_factory=list)
    computed_ids: int = 0
    exclude_columns: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    staged_at: str = ""
    #: Set when the day's events break the schema while staging; the day is not exported.
    error: str | None = None
    #: Per event type, every staged record batch in write order: ``[hour, file number, batch index,
    #: rows]`` (file ``raw/<event_type>/<file number:05d>.arrow``, hour 0-23 UTC of all its rows).
    batches: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.path)

    def staged_file(self, event_type: str, number: int) -> Path:
        """Path of one staged file of an event type."""
        return self.root / "raw" / event_type / f"{number:05d}{STAGED_SUFFIX}"

    def staged_files(self, event_type: str) -> list[str]:
        """Every staged file of one event type (all its rows, in no particular hour order)."""
        numbers = sorted({ref[1] for ref in self.batches.get(event_type, ())})
        return [str(self.staged_file(event_type, n)) for n in numbers]

    def hours(self, event_type: str) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """The staged hours of one event type, ascending: ``(hour, [(file number, batch index, rows),
        ...])`` with each hour's batches in the order they were staged (the source's order)."""
        by_hour: dict[int, list[tuple[int, int, int]]] = {}
        for hour, number, index, rows in self.batches.get(event_type, ()):
            by_hour.setdefault(hour, []).append((number, index, rows))
        return sorted(by_hour.items())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self) -> None:
        """Rewrite this day's staged.json (e.g. after marking it failed)."""
        (self.root / STAGED_RECORD).write_text(self.to_json())

    @classmethod
    def load(cls, folder: Path) -> "StagedDay":
        data = json.loads((Path(folder) / STAGED_RECORD).read_text())
        data["path"] = str(folder)
        return cls(**data)


def partition_dir(root: Path, sync_job: str, partition: str) -> Path:
    """Folder of one staged partition."""
    return Path(root) / sync_job / partition


class _BucketWriters:
    """IPC file writers per (day, event type); at most MAX_OPEN_WRITERS open.

    ``index[(day, event type)]`` lists every written record batch as ``[hour, file number, batch
    index, rows]`` (``StagedDay.batches``).
    """

    def __init__(self, tmp_root: Path, schema: pa.Schema):
        self.tmp_root = tmp_root
        self.schema = schema
        self.writers: OrderedDict[tuple[date, str], tuple[IpcFileWriter, int, list[int]]] = OrderedDict()
        self.sequence: Counter = Counter()
        self.index: dict[tuple[date, str], list[list[int]]] = {}

    def write(self, day: date, event_type: str, hour: int, table: pa.Table) -> None:
        key = (day, event_type)
        entry = self.writers.get(key)
        if entry is None:
            if len(self.writers) >= MAX_OPEN_WRITERS:
                _, (oldest, _, _) = self.writers.popitem(last=False)
                oldest.close()
            folder = self.tmp_root / day.isoformat() / "raw" / event_type
            folder.mkdir(parents=True, exist_ok=True)
            number = self.sequence[key]
            self.sequence[key] += 1
            entry = (IpcFileWriter(folder / f"{number:05d}{STAGED_SUFFIX}", self.schema), number, [0])
            self.writers[key] = entry
        else:
            self.writers.move_to_end(key)
        writer, number, written = entry
        rows = writer.write_batches(table)  # already in the staged schema (cast on the staging threads)
        self.index.setdefault(key, []).extend([hour, number, written[0] + i, n] for i, n in enumerate(rows))
        written[0] += len(rows)

    def close_file_of(self, key: tuple[date, str], numbers: set[int]) -> None:
        """Close the open staged file of ``key`` if its number is in ``numbers`` (its batches become
        readable; the next write of ``key`` starts another file)."""
        entry = self.writers.get(key)
        if entry is not None and entry[1] in numbers:
            del self.writers[key]
            entry[0].close()

    def close(self) -> None:
        for writer, _, _ in self.writers.values():
            writer.close()
        self.writers.clear()


class StagingWatch(Protocol):
    """Told, while staging runs, which staged hours the source has moved past (``stage_days(watch=)``).

    ``group_ready`` hands the next group of consecutive staged hours of one (day, event type), in
    hour order, as :func:`export._hour_groups` would form it over the finished day: ``group`` is
    ``[(hour, [(file number, batch index, rows), ...]), ...]``, the files under ``raw_dir``
    (``<temporary day folder>/raw/<event_type>``) are closed; the last groups come when staging
    finished, before ``stage_days`` returns. ``complete`` follows the last group of a (day, event
    type): its whole day is sealed (or staging finished). ``late`` says a later source batch added
    rows to an hour already handed (or to a complete (day, event type)): every group handed for it
    is void, and none follows. All three are called on the staging thread and must return quickly.
    """

    def group_ready(self, day: date, event_type: str, raw_dir: Path, group: list) -> None: ...

    def complete(self, day: date, event_type: str) -> None: ...

    def late(self, day: date, event_type: str) -> None: ...


#: Hours are handed to a StagingWatch once the oldest event of the newest source group is this many
#: hours past them (an hour of slack for sources that are ordered by time only roughly).
SEAL_LAG_HOURS = 1


class _Sealer:
    """Decides, after each staged source group, which staged hours are complete (sealed) and hands
    them to a :class:`StagingWatch` in groups of at least ``rows_per_group`` staged rows.

    An hour is sealed once the oldest event of the newest source group is ``SEAL_LAG_HOURS`` past
    its end (sources delivering in time order; any other order only costs redone work: a row that
    lands in an hour already handed makes the (day, event type) ``late``, and it is no longer
    handed early)."""

    def __init__(self, writers: _BucketWriters, tmp_root: Path, watch: StagingWatch, rows_per_group: int):
        self.writers = writers
        self.tmp_root = tmp_root
        self.watch = watch
        self.rows_per_group = rows_per_group
        self.sealed = -1  # hours (ordinal: day.toordinal() * 24 + hour) below this are sealed
        self.cursor: Counter = Counter()  # entries of writers.index[key] already looked at
        self.pending: dict[tuple[date, str], dict[int, list[tuple[int, int, int]]]] = {}
        self.handed: dict[tuple[date, str], int] = {}  # hours of the day below this were handed
        self.void: set[tuple[date, str]] = set()

    def _collect(self) -> None:
        for key, entries in self.writers.index.items():
            start = self.cursor[key]
            if start == len(entries) or key in self.void:
                self.cursor[key] = len(entries)
                continue
            self.cursor[key] = len(entries)
            pending = self.pending.setdefault(key, {})
            handed = self.handed.get(key, 0)
            for hour, number, index, rows in entries[start:]:
                if hour < handed:
                    self.void.add(key)
                    self.pending.pop(key, None)
                    self.watch.late(*key)
                    break
                pending.setdefault(hour, []).append((number, index, rows))

    def staged(self, oldest: datetime | None) -> None:
        """After a source group was staged; ``oldest``: its oldest ``inserted_at`` (UTC)."""
        self._collect()
        if oldest is not None:
            hour = oldest.date().toordinal() * 24 + oldest.hour - SEAL_LAG_HOURS
            self.sealed = max(self.sealed, hour)
        for key in list(self.pending):
            self._hand(key, final=False)

    def finish(self) -> None:
        """Staging finished (every staged file closed): hand every remaining hour."""
        self._collect()
        self.sealed = 1 << 62
        for key in list(self.pending):
            self._hand(key, final=True)

    def _hand(self, key: tuple[date, str], final: bool) -> None:
        """Hand the sealed hours of ``key`` in complete groups; once its whole day is sealed (or
        ``final``: staging finished) also the last, partial group, and say it is complete."""
        pending = self.pending[key]
        base = key[0].toordinal() * 24
        group: list = []
        rows = 0
        for hour in sorted(pending):
            if base + hour >= self.sealed:
                break
            group.append((hour, pending[hour]))
            rows += sum(n for *_, n in pending[hour])
            if rows >= self.rows_per_group:
                self._give(key, group)
                group, rows = [], 0
        if final or self.sealed >= base + 24:
            if group:
                self._give(key, group)
            del self.pending[key]
            self.handed[key] = 24  # any later row of this (day, event type) is late
            self.watch.complete(*key)

    def _give(self, key: tuple[date, str], group: list) -> None:
        pending = self.pending[key]
        for hour, _ in group:
            del pending[hour]
        self.handed[key] = group[-1][0] + 1
        self.writers.close_file_of(key, {ref[0] for _, refs in group for ref in refs})
        day, event_type = key
        self.watch.group_ready(day, event_type, self.tmp_root / day.isoformat() / "raw" / event_type, group)


@dataclass
class StagingArea:
    """Days staged into a temporary folder (``stage_days(..., publish=False)``), not yet in place.

    ``days`` are the staged days by partition key, their ``path`` inside ``tmp_root``. ``publish()``
    moves each into ``<root>/<sync job>/<day>/`` (replacing an older staging of it) and returns them
    with their final paths; ``discard()`` deletes the temporary folder. One of the two must be called.
    """

    root: Path
    sync_job: str
    tmp_root: Path
    days: dict[str, StagedDay]

    def publish(self) -> dict[str, StagedDay]:
        try:
            for key, record in self.days.items():
                tmp_day = Path(record.path)
                final = partition_dir(self.root, self.sync_job, key)
                if final.exists():
                    shutil.rmtree(final)
                tmp_day.rename(final)
                record.path = str(final)
        finally:
            shutil.rmtree(self.tmp_root, ignore_errors=True)
        return self.days

    def discard(self) -> None:
        shutil.rmtree(self.tmp_root, ignore_errors=True)


def _prefetched(batches: Iterable[Any], depth: int = PREFETCH_BATCHES, *,
                name: str = "userpilot_sync-prefetch") -> Iterator[Any]:
    """The items of ``batches`` (source batches, normalised frames), produced up to ``depth`` ahead
    by a background thread (the source's decoding, e.g. Parquet or NDJSON, overlaps the staging of
    the previous batch). The iterable's own errors are raised here, in order; when the consumer
    stops early the thread stops too and closes the iterator in its own thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        iterator = iter(batches)
        try:
            for batch in iterator:
                while not stop.is_set():
                    try:
                        items.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as exc:  # handed to the consumer
            items.put((done, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def _coalesced(batches: Iterable[SourceBatch]) -> Iterator[list[SourceBatch]]:
    """Consecutive non-empty batches with one schema, grouped up to ``COALESCE_ROWS`` rows."""
    group: list[SourceBatch] = []
    rows = 0
    for batch in batches:
        n = batch.data.num_rows
        if n == 0:
            continue
        if group and (rows + n > COALESCE_ROWS or not batch.data.schema.equals(group[0].data.schema, check_metadata=True)):
            yield group
            group, rows = [], 0
        group.append(batch)
        rows += n
    if group:
        yield group


def _concat(group: list[SourceBatch]) -> pa.Table:
    return pa.concat_tables(
        [b.data if isinstance(b.data, pa.Table) else pa.Table.from_batches([b.data]) for b in group]
    )


def _large_strings(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in schema])


@dataclass
class _Bucketed:
    """One normalised source group split for staging (``stage_days``): ``parts`` are ``(day,
    event type, hour, Arrow table)`` in the group's order, ``errors`` ``(partition, message)`` for
    events of an unknown event type; ``oldest`` is the group's oldest ``inserted_at`` in the window."""

    report: NormalizeReport
    rows: int
    outside: int = 0
    oldest: datetime | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    parts: list[tuple[date, str, int, pa.Table]] = field(default_factory=list)


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; elsewhere ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_setting(env: str, default: int) -> int:
    """A thread count from the environment variable ``env``, else ``default``. Raises ConfigError
    on a value that is not a positive integer."""
    value = os.environ.get(env)
    if not value:
        return default
    try:
        threads = int(value)
        if threads < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{env}={value!r}: expected a positive integer (threads)") from None
    return threads


def stage_threads() -> int:
    """Threads normalising and splitting source groups while staging: ``USERPILOT_SYNC_STAGE_THREADS``,
    else 2 (at most the CPUs this process may run on). Output does not depend on it. Raises
    ConfigError on a value that is not a positive integer."""
    return threads_setting(STAGE_THREADS_ENV, min(2, usable_cpus()))


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], *, threads: int) -> Iterator[Any]:
    """``fn(item)`` for each item, computed on ``threads`` threads (at most ``threads`` items at once),
    yielded in the items' order. ``fn``'s errors are raised here in order; items after a failing one
    are not yielded. Closing the iterator early waits for the calls already running (each is one
    bounded group) and starts no more."""
    if threads <= 1:
        yield from _prefetched(map(fn, items), name="userpilot_sync-normalize")
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="userpilot_sync-normalize")
    pending: deque = deque()
    iterator = iter(items)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception:
                # the items' own error (e.g. the source failing) comes after the items before it, as
                # in one thread: their results (and errors) first
                while pending:
                    yield pending.popleft().result()
                raise
            pending.append(pool.submit(fn, item))
            if len(pending) >= threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def stage_days(
    extraction: Extraction,
    *,
    sync_job: str,
    days: Iterable[date],
    root: Path,
    exclude_columns: Iterable[str] = (),
    watch: StagingWatch | None = None,
    rows_per_group: int = 65_536,
    publish: bool = True,
) -> dict[str, StagedDay] | StagingArea:
    """Stage the extraction's batches into one folder per requested day.

    ``days`` must be consecutive; the window is [first day 00:00, last day + 1 00:00) UTC.
    Returns the staged days by partition key. Raises SourceError for unreadable batches and
    ValidationError for events of an unknown event type (naming job, partition and values).
    Existing staged folders of these days are replaced only after staging succeeded.

    ``watch`` (a :class:`StagingWatch`) is handed the staged hours of each (day, event type) in
    groups of at least ``rows_per_group`` staged rows as soon as the source has moved past them,
    and the rest when staging finished. ``publish=False`` returns a :class:`StagingArea` (days
    still in the temporary folder, e.g. while their exports are prepared there) instead of moving
    the days into place.
    """
    days = sorted(days)
    if not days:
        raise ValueError("no days to stage")
    window_start, _ = day_window(days[0])
    _, window_end = day_window(days[-1])
    wanted = {d.isoformat() for d in days}
    excluded = sorted(set(exclude_columns))
    schema = staged_arrow_schema(excluded)
    threads = stage_threads()  # a bad setting is refused before anything is written
    root = Path(root)
    tmp_root = root / sync_job / temp_name(".staging")
    tmp_root.mkdir(parents=True, exist_ok=True)
    # Staged files keep polars' large_string (no cast per batch); read back they are the same frame.
    writers = _BucketWriters(tmp_root, _large_strings(schema))
    sealer = _Sealer(writers, tmp_root, watch, rows_per_group) if watch is not None else None
    received: Counter = Counter()
    by_type: dict[str, Counter] = {d: Counter() for d in wanted}
    outside = 0
    unknown_columns: set[str] = set()
    computed_ids = 0
    errors: dict[str, str] = {}
    label = days[0].isoformat() if len(days) == 1 else f"{days[0].isoformat()}..{days[-1].isoformat()}"
    in_window = (pl.col("inserted_at") >= window_start) & (pl.col("inserted_at") < window_end)
    known = pl.col("event_type").is_in(list(EVENT_TYPES))

    def normalized(data: pa.RecordBatch | pa.Table, where: str) -> tuple[pl.DataFrame, NormalizeReport]:
        try:
            return normalize_arrow(data, where=f"sync job {sync_job!r}, partition {label}, {where}")
        except SourceError:
            raise
        except Exception as exc:  # polars/arrow errors on odd input
            raise SourceError(
                f"sync job {sync_job!r}, partition {label}, {where}: cannot read records ({exc})"
            ) from None

    def bucketed(item: list[tuple[pl.DataFrame, NormalizeReport, str]]) -> _Bucketed:
        """One normalised group (``item``'s one ``(frame, report, where)``, taken out so that each
        copy is freed as soon as the next exists) split per (day, event type, hour), nothing
        written: runs on the staging threads (no shared state is touched here)."""
        frame, report, where = item.pop()
        out = _Bucketed(report=report, rows=frame.height)
        if not frame.select(in_window.all(ignore_nulls=False)).item():
            frame = frame.filter(in_window)
        out.outside = out.rows - frame.height
        if not frame.height:
            return out
        out.oldest = frame.get_column("inserted_at").min() if sealer is not None else None
        bad_types = frame.filter(~known) if frame.select((~known).any()).item() else None
        if bad_types is not None:
            for day_value, bad in bad_types.group_by(pl.col("inserted_at").dt.date().alias("_d"), maintain_order=True):
                key = day_value[0].isoformat()
                sample = bad.get_column("event_type").unique(maintain_order=True).head(5).to_list()
                out.errors.append((key, (
                    f"sync job {sync_job!r}, partition {key}: column 'event_type' has {bad.height} "
                    f"value(s) outside the Userpilot Event Schema, e.g. {sample!r} ({where}); "
                    f"known event types are {', '.join(EVENT_TYPES)}. Nothing was exported for this partition."
                )))
                if len(days) == 1:
                    return out  # raised when the group's turn comes; nothing of it is staged
            frame = frame.filter(known)
        frame = frame.drop(excluded).with_columns(
            pl.col("inserted_at").dt.date().alias("_day"), pl.col("inserted_at").dt.hour().alias("_hour")
        )
        split = frame.partition_by(["_day", "event_type", "_hour"], as_dict=True, maintain_order=True)
        del frame
        for day, event_type, hour in list(split):  # each part freed once it is Arrow: one copy at a time
            part = split.pop((day, event_type, hour)).drop("_day", "_hour")
            out.parts.append((day, event_type, hour, part.to_arrow().cast(writers.schema)))
            del part
        return out

    def stage(group: _Bucketed) -> None:
        """Count one bucketed group and append its parts to the staged files (in source order)."""
        nonlocal outside, unknown_columns, computed_ids
        unknown_columns |= group.report.unknown_columns
        computed_ids += group.report.computed_ids
        outside += group.outside
        for key, message in group.errors:
            if len(days) == 1:
                raise ValidationError(message)
            errors.setdefault(key, message)
        if not group.rows - group.outside:
            return
        group.parts.reverse()
        while group.parts:  # each part freed once written, not when the next group arrives
            day, event_type, hour, table = group.parts.pop()
            key = day.isoformat()
            received[key] += table.num_rows
            by_type[key][event_type] += table.num_rows
            writers.write(day, event_type, hour, table)
            del table
        if sealer is not None:
            sealer.staged(group.oldest)
        pause_point("extracting", scope=sync_job)  # fault-injection suite only: a no-op otherwise

    def normalized_and_bucketed(holder: list[list[SourceBatch]]) -> list[_Bucketed | BaseException]:
        """A coalesced group of source batches (``holder``'s one item, taken out so that the batches
        are freed once normalised), normalised and bucketed: one result, or one per batch."""
        group = holder.pop()
        if len(group) > 1:
            # Small batches are normalised and bucketed together (same rows, same order, far less
            # per-batch overhead). Any error or unknown event type: redo batch by batch, so
            # messages and counts name the batch exactly as without coalescing.
            try:
                frame, report = normalize_arrow(_concat(group), where=group[0].where)
                clean = not frame.select((in_window & ~known).any()).item()
            except Exception:
                clean = False
            if clean:
                item = [(frame, report, group[0].where)]
                del frame, group
                return [bucketed(item)]
        out: list[_Bucketed | BaseException] = []
        for batch in group:
            # batch by batch as without coalescing: an error is handed on as a result, after the
            # batches before it, so that what they would raise first (an unknown event type in a
            # one-day extraction) still comes first; nothing after a failing batch is read
            try:
                item = [(*normalized(batch.data, batch.where), batch.where)]
            except Exception as exc:
                out.append(exc)
                break
            out.append(bucketed(item))
            if out[-1].errors and len(days) == 1:
                break  # this batch refuses the day: the batches after it would not be looked at
        return out

    # A pipeline: the source is read (decoded) one batch ahead on a thread of its own; the next
    # groups are normalised and split per (day, event type, hour) on STAGE_THREADS threads while
    # this thread appends the groups' parts to the staged files strictly in source order (the same
    # files, byte for byte, as one thread); errors surface here in the source's order.
    source_batches = _prefetched(extraction.batches)
    frames = _ordered_map(normalized_and_bucketed, ([group] for group in _coalesced(source_batches)),
                          threads=threads)
    try:
        for groups in frames:
            for group in groups:
                if isinstance(group, BaseException):
                    raise group  # a batch that failed after the group's earlier batches (in source order)
                stage(group)
        writers.close()
        if sealer is not None:
            sealer.finish()
    except BaseException as exc:
        frames.close()  # stops the normalising thread, then the reading thread, now (not when the
        source_batches.close()  # traceback is freed)
        writers.close()
        shutil.rmtree(tmp_root, ignore_errors=True)
        if isinstance(exc, SourceError) and "sync job " not in str(exc):
            # chunk readers name the file; the sync job and the partition(s) are added here
            raise SourceError(f"sync job {sync_job!r}, partition {label}: {exc}") from None
        raise

    staged: dict[str, StagedDay] = {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        for day in days:
            key = day.isoformat()
            tmp_day = tmp_root / key
            tmp_day.mkdir(parents=True, exist_ok=True)
            record = StagedDay(
                sync_job=sync_job,
                partition=key,
                path=str(tmp_day),
                rows_received=received[key],
                rows_outside_window=outside,
                rows_by_event_type={et: by_type[key].get(et, 0) for et in EVENT_TYPES},
                unknown_columns=sorted(unknown_columns),
                computed_ids=computed_ids,
                exclude_columns=excluded,
                source=dict(extraction.facts, window_from=window_start.isoformat(), window_to=window_end.isoformat()),
                staged_at=now,
                error=errors.get(key),
                batches={et: writers.index[(day, et)] for et in EVENT_TYPES if (day, et) in writers.index},
            )
            (tmp_day / STAGED_RECORD).write_text(replace(record, path="").to_json())
            staged[key] = record
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    area = StagingArea(root=root, sync_job=sync_job, tmp_root=tmp_root, days=staged)
    return area.publish() if publish else area


def remove_staged(root: Path, sync_job: str, partition: str) -> bool:
    """Delete one staged partition (after its manifest is written). Returns True if removed."""
    folder = partition_dir(root, sync_job, partition)
    if folder.exists():
        shutil.rmtree(folder)
        return True
    return False


# ---------------------------------------------------------------------------------- leftovers
#: Temporary folders under ``<root>/<sync job>/``: ``<prefix>-<pid>-<uuid>`` (the pid tells a
#: crashed run's leftovers from a live run's work in progress).
TEMP_PREFIXES = (".staging", ".work")


def temp_name(prefix: str) -> str:
    """A temporary folder name owned by this process: ``<prefix>-<pid>-<uuid hex>``."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Leftover:
    """A staging folder a crashed run left behind and that was removed: path, age (s), size (bytes)."""

    path: str
    age_s: float
    bytes: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_leftovers(root: Path, sync_job: str, *, pid_alive, day_free) -> list[Leftover]:
    """Remove what crashed runs of ``sync_job`` left in staging (raw events are personal data).

    * temporary folders (``.staging-<pid>-…``, ``.work-<pid>-…``) whose process is gone
      (``pid_alive(pid)`` False; folders of an older naming without a pid are left alone);
    * staged days (``<YYYY-MM-DD>/``) that no run holds: ``day_free(day)`` must take the day's
      lock without waiting and keep it until it returns (so no run can start staging it meanwhile).

    Returns what was removed. Never touches the destination.
    """
    import time

    job_dir = Path(root) / sync_job
    removed: list[Leftover] = []
    if not job_dir.is_dir():
        return removed
    now = time.time()
    for folder in sorted(job_dir.iterdir()):
        if not folder.is_dir():
            continue
        name = folder.name
        stale = False
        if name.startswith(TEMP_PREFIXES):
            parts = name.split("-")
            stale = len(parts) >= 3 and parts[1].isdigit() and not pid_alive(int(parts[1]))
        elif len(name) == 10 and name[4] == "-" and name[7] == "-":
            stale = day_free(name)
        if stale:
            leftover = Leftover(str(folder), now - folder.stat().st_mtime, _size(folder))
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(leftover)
    return removed
