"""Feature tags and labeled events: ``feature_tags_breakdown``, ``feature_tags_definitions``,
``track_feature_<ID>`` and ``track_labeled_<ID>``.

Facts (Userpilot Data Sync documentation): every date folder holds

* ``feature_tags_breakdown`` — per-day counts per feature tag;
* ``feature_tags_definitions`` — the feature tags' id, name, description and category;
* ``track_feature_<ID>`` — one file per feature tag: the day's ``track_feature`` events of that tag;
* ``track_labeled_<ID>`` — one file per labeled event: the day's events of that labeled event.

In the Event Schema a ``track_feature`` event's ``event_name`` is the feature-tag id. The lookup
table ``features_events`` (``source/lookups.py``: ``id, name, type, category, description,
attributes``) has ``type`` ``feature_tag`` (``id`` = the feature-tag id), ``labeled_event`` or
``tracked_event`` (``id`` = the event name).

ASSUMPTION (project decision; Userpilot does not document the raw column that marks labeled
events): a ``track`` event is a labeled event when its ``event_name`` equals the ``id`` of a
``features_events`` row of type ``labeled_event`` (:func:`labeled_event_ids`).

Shapes (project decisions where the docs give no columns):

``feature_tags_breakdown`` (:data:`BREAKDOWN_SCHEMA`, one row per feature tag with at least one
event on the day, sorted by ``feature_tag_id`` in plain string order = UTF-8 byte order)

================= ======= ========= ===========================================================
column            type    nullable  meaning
================= ======= ========= ===========================================================
feature_tag_id    string  no        the tag (``track_feature``'s ``event_name``), unique, not empty
name              string  yes       the tag's name from ``features_events``; null when unknown
events            int64   no        number of ``track_feature`` events (rows) of the tag, >= 1
unique_users      int64   no        distinct non-null, non-empty ``user_id`` values, 0..events
unique_companies  int64   no        distinct non-null, non-empty ``company_id`` values, 0..events
================= ======= ========= ===========================================================

``feature_tags_definitions`` (:data:`DEFINITIONS_SCHEMA`, the ``features_events`` rows of type
``feature_tag``, sorted by ``id``): ``id`` string not null (unique, not empty), ``name``,
``description``, ``category`` (string, nullable).

File names: an id becomes a file-name part through :func:`escape_id` (``track_feature_`` +
``escape_id(id)``), since ids are free text (``../x``, ``a/b``, unicode, very long).

Memory: :func:`breakdown_table` aggregates batch by batch (counts and distinct (tag, id) pairs,
never the day's rows); :func:`split_by_id` rewrites the rows into an uncompressed work file read
memory-mapped, then holds one index array and one id's rows (see its docstring).

Errors: validation failures raise :class:`~userpilot_sync.errors.ValidationError` naming the
sync job, the partition, the file and the failing column, and saying what to do. Pure core: no
Dagster.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pandera.errors
import pandera.polars as pa_pl
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from userpilot_sync.errors import ValidationError
from userpilot_sync.schema.events import PROJECT_DECISION

if TYPE_CHECKING:  # pragma: no cover
    from userpilot_sync.export import PreparedExport

#: File names of the day's documented feature-tag files (Userpilot Data Sync documentation).
BREAKDOWN_FILE = "feature_tags_breakdown"
DEFINITIONS_FILE = "feature_tags_definitions"
#: Prefixes of the per-id files; the id part is :func:`escape_id` of the id.
TRACK_FEATURE_PREFIX = "track_feature_"
TRACK_LABELED_PREFIX = "track_labeled_"

#: ``features_events.type`` values (source/lookups.py).
FEATURE_TAG = "feature_tag"
LABELED_EVENT = "labeled_event"

BREAKDOWN_SCHEMA: pa.Schema = pa.schema([
    pa.field("feature_tag_id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=True),
    pa.field("events", pa.int64(), nullable=False),
    pa.field("unique_users", pa.int64(), nullable=False),
    pa.field("unique_companies", pa.int64(), nullable=False),
])

DEFINITIONS_SCHEMA: pa.Schema = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=True),
    pa.field("description", pa.string(), nullable=True),
    pa.field("category", pa.string(), nullable=True),
])

#: The one place each column of the two files is described (docs/schema.md's generated reference):
#: file -> column -> (description, source). Userpilot documents the files (and the definitions'
#: four fields), not their types.
COLUMN_DOCS: dict[str, dict[str, tuple[str, str]]] = {
    BREAKDOWN_FILE: {
        "feature_tag_id": ("The feature tag (`track_feature`'s `event_name`); one row per tag with events on "
                           "the day, sorted by it (UTF-8 byte order).", PROJECT_DECISION),
        "name": ("The tag's name from the `features_events` lookup; null when unknown or the source has no "
                 "lookups.", PROJECT_DECISION),
        "events": ("The tag's `track_feature` events (rows) on the day: a `GROUP BY event_name` over the "
                   "day's `track_feature` export.", PROJECT_DECISION),
        "unique_users": ("Distinct non-null, non-empty `user_id` values among those events.", PROJECT_DECISION),
        "unique_companies": ("Distinct non-null, non-empty `company_id` values among those events.",
                             PROJECT_DECISION),
    },
    DEFINITIONS_FILE: {
        "id": ("The feature-tag id (as in `track_feature`'s `event_name`): the `features_events` lookup rows "
               "of type `feature_tag`, sorted by it. Written only when the source has lookups.",
               "Userpilot Data Sync docs (fields); project decision"),
        "name": ("The tag's name.", "Userpilot Data Sync docs"),
        "description": ("The tag's description.", "Userpilot Data Sync docs"),
        "category": ("The tag's category.", "Userpilot Data Sync docs"),
    },
}

# ------------------------------------------------------------------------------ file names
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED = tuple(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in range(256))
#: Longest escaped id kept whole; longer ones are cut to ESCAPE_KEEP bytes + "~" + 16 hex digits.
ESCAPE_MAX = 120
ESCAPE_KEEP = 100
ESCAPE_HASH_DIGITS = 16


def escape_id(value: str) -> str:
    """A safe, deterministic file-name part for an id (project decision).

    Every byte of the UTF-8 encoding outside ``[A-Za-z0-9-]`` (so also ``_``, ``.``, ``%``,
    ``~``, ``/``) becomes ``%XX`` (upper-case hex): ``abc-123`` stays, ``a_b`` -> ``a%5Fb``,
    ``../x`` -> ``%2E%2E%2Fx``, ``é`` -> ``%C3%A9``. When the escaped text is longer than
    :data:`ESCAPE_MAX` (120) bytes it becomes its first :data:`ESCAPE_KEEP` (100) bytes + ``~`` +
    the first 16 hex digits of ``sha256(UTF-8 of the whole original id)`` (117 bytes).

    The result matches ``^[A-Za-z0-9%~-]+$`` and is at most 120 bytes. Distinct ids give distinct
    names: escaping is injective, an escaped text never contains ``~`` while a shortened one always
    does, and two shortened ones differ unless 64 bits of sha256 collide.

    Raises TypeError for a non-string, ValueError for the empty string (no file name part).
    """
    if not isinstance(value, str):
        raise TypeError(f"escape_id expects a string id, got {type(value).__name__}")
    if value == "":
        raise ValueError("escape_id: an empty id has no file name; ids must not be empty")
    raw = value.encode("utf-8")
    escaped = "".join(_ESCAPED[b] for b in raw)
    if len(escaped) > ESCAPE_MAX:
        digest = hashlib.sha256(raw).hexdigest()[:ESCAPE_HASH_DIGITS]
        escaped = f"{escaped[:ESCAPE_KEEP]}~{digest}"
    return escaped


# ------------------------------------------------------------------------------ lookups
def _ids_of_type(features_events: pa.Table, kind: str, columns: tuple[str, ...]) -> pl.DataFrame:
    missing = [c for c in ("id", "type", *columns) if c not in features_events.column_names]
    if missing:
        raise ValueError(
            f"features_events lookup table lacks column(s) {missing!r}; expected the columns of "
            f"source/lookups.py (id, name, type, category, description, attributes)"
        )
    frame = pl.from_arrow(features_events.select(["id", "type", *columns]))
    assert isinstance(frame, pl.DataFrame)
    return frame.filter((pl.col("type") == kind) & pl.col("id").is_not_null()).drop("type")


def feature_tag_names(features_events: pa.Table | None) -> dict[str, str | None]:
    """Feature-tag id -> name (``None`` when the definition has no name) from the
    ``features_events`` lookup table (rows of type ``feature_tag``); ``{}`` for ``None`` (a source
    without lookups). Raises ValueError when the table lacks ``id``/``type``/``name``."""
    if features_events is None:
        return {}
    frame = _ids_of_type(features_events, FEATURE_TAG, ("name",))
    return dict(zip(frame.get_column("id").to_list(), frame.get_column("name").to_list()))


def labeled_event_ids(features_events: pa.Table | None) -> set[str]:
    """Event names of labeled events: ids of the ``features_events`` rows of type
    ``labeled_event`` (the ASSUMPTION in the module docstring); empty for ``None``. Raises
    ValueError when the table lacks ``id``/``type``."""
    if features_events is None:
        return set()
    return set(_ids_of_type(features_events, LABELED_EVENT, ()).get_column("id").to_list())


# ------------------------------------------------------------------------------ validation
def _at_most_events(data) -> pl.LazyFrame:
    return data.lazyframe.select(pl.col(data.key) <= pl.col("events"))


_ID_CHECKS = [pa_pl.Check.str_length(min_value=1, error="str_length(min 1): id must not be empty")]
_AT_MOST_EVENTS = pa_pl.Check(_at_most_events, name="at_most_events", error="less_than_or_equal_to(events)")

BREAKDOWN_PANDERA = pa_pl.DataFrameSchema(
    {
        "feature_tag_id": pa_pl.Column(pl.Utf8, checks=_ID_CHECKS, nullable=False, unique=True),
        "name": pa_pl.Column(pl.Utf8, nullable=True),
        "events": pa_pl.Column(pl.Int64, checks=[pa_pl.Check.ge(1)], nullable=False),
        "unique_users": pa_pl.Column(pl.Int64, checks=[pa_pl.Check.ge(0), _AT_MOST_EVENTS], nullable=False),
        "unique_companies": pa_pl.Column(pl.Int64, checks=[pa_pl.Check.ge(0), _AT_MOST_EVENTS], nullable=False),
    },
    strict=True,
    ordered=True,
    name="userpilot_feature_tags_breakdown",
)

DEFINITIONS_PANDERA = pa_pl.DataFrameSchema(
    {
        "id": pa_pl.Column(pl.Utf8, checks=_ID_CHECKS, nullable=False, unique=True),
        "name": pa_pl.Column(pl.Utf8, nullable=True),
        "description": pa_pl.Column(pl.Utf8, nullable=True),
        "category": pa_pl.Column(pl.Utf8, nullable=True),
    },
    strict=True,
    ordered=True,
    name="userpilot_feature_tags_definitions",
)

_ADVICE = {
    BREAKDOWN_FILE: (
        "The breakdown is computed from the day's track_feature export: fix the source data "
        "(every track_feature event needs a non-empty event_name, its feature-tag id) and "
        "re-materialize the partition. Nothing was written for this file."
    ),
    DEFINITIONS_FILE: (
        "The definitions come from the features_events lookup: every feature_tag definition needs "
        "a unique, non-empty id; fix the definitions in Userpilot, refresh the lookups and "
        "re-materialize the partition. Nothing was written for this file."
    ),
}


def _where(sync_job: str, partition: str, file: str) -> str:
    return f"sync job {sync_job!r}, partition {partition}, file {file}"


def _validate(frame: pl.DataFrame, schema: pa_pl.DataFrameSchema, arrow_schema: pa.Schema, *,
              sync_job: str, partition: str, file: str, sample_size: int = 5) -> pa.Table:
    """Validate ``frame`` with pandera (data level, lazy) and return it as an Arrow table of
    ``arrow_schema``. Raises ValidationError, one line per failing column and check."""
    try:
        schema.validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases.with_columns(pl.col("failure_case").cast(pl.Utf8, strict=False))
        lines = []
        for (col, check), group in cases.group_by(["column", "check"], maintain_order=True):
            sample = group.get_column("failure_case").head(sample_size).to_list()
            what = f"column {col!r}" if col != schema.name else "the table"
            lines.append(f"{_where(sync_job, partition, file)}: {what} failed {check}: "
                         f"{group.height} value(s), e.g. {sample!r}")
        lines.append(_ADVICE[file])
        raise ValidationError("\n".join(lines)) from None
    return frame.to_arrow().cast(arrow_schema)


# ------------------------------------------------------------------------------ definitions
def definitions_table(features_events: pa.Table, *, sync_job: str, partition: str) -> pa.Table:
    """``feature_tags_definitions``: the ``feature_tag`` rows of the ``features_events`` lookup
    table, columns ``id, name, description, category`` (:data:`DEFINITIONS_SCHEMA`), sorted by
    ``id`` (plain string order), validated with pandera (``id`` not null, not empty, unique).

    Raises ValidationError naming the sync job, partition and file (``feature_tags_definitions``)
    when the table lacks a column or a definition breaks the schema.
    """
    needed = ("id", "name", "type", "description", "category")
    missing = [c for c in needed if c not in features_events.column_names]
    if missing:
        raise ValidationError(
            f"{_where(sync_job, partition, DEFINITIONS_FILE)}: the features_events lookup table lacks "
            f"column(s) {missing!r}. {_ADVICE[DEFINITIONS_FILE]}"
        )
    frame = pl.from_arrow(features_events.select(list(needed)))
    assert isinstance(frame, pl.DataFrame)
    frame = (
        frame.filter(pl.col("type") == FEATURE_TAG)
        .select([pl.col(c).cast(pl.Utf8) for c in DEFINITIONS_SCHEMA.names])
        .sort("id", nulls_last=True, maintain_order=True)
    )
    return _validate(frame, DEFINITIONS_PANDERA, DEFINITIONS_SCHEMA,
                     sync_job=sync_job, partition=partition, file=DEFINITIONS_FILE)


# ------------------------------------------------------------------------------ breakdown
class _DistinctPairs:
    """Distinct (event_name, value) pairs of one id column, kept as a compact polars frame.

    Each batch's distinct pairs are appended; the pending pieces are merged (``unique``) once they
    outgrow the merged frame, so memory stays ~ 2x the distinct pairs and work stays ~ linear.
    """

    MIN_PENDING = 65_536

    def __init__(self, column: str):
        self.column = column
        self.merged = pl.DataFrame(schema={"event_name": pl.Utf8, column: pl.Utf8})
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0

    def add(self, frame: pl.DataFrame) -> None:
        col = pl.col(self.column)
        pairs = frame.select("event_name", col).filter(col.is_not_null() & (col != "")).unique()
        if pairs.height:
            self.pending.append(pairs)
            self.pending_rows += pairs.height
        if self.pending_rows > max(self.merged.height, self.MIN_PENDING):
            self._merge()

    def _merge(self) -> None:
        if self.pending:
            self.merged = pl.concat([self.merged, *self.pending], how="vertical").unique()
            self.pending, self.pending_rows = [], 0

    def counts(self, alias: str) -> pl.DataFrame:
        self._merge()
        return self.merged.group_by("event_name").agg(pl.len().cast(pl.Int64).alias(alias))


def breakdown_table(batches: Iterable[pa.RecordBatch], names: dict[str, str | None], *,
                    sync_job: str, partition: str) -> pa.Table:
    """``feature_tags_breakdown`` of one day from the day's ``track_feature`` export rows.

    ``batches``: record batches (or tables) with at least ``event_name``, ``user_id`` and
    ``company_id`` (Event Schema; e.g. ``PreparedExport.iter_batches()``). ``names``: feature-tag
    id -> name (:func:`feature_tag_names`). Returns :data:`BREAKDOWN_SCHEMA`: one row per
    ``event_name`` with events on the day — ``events`` (rows), ``unique_users`` /
    ``unique_companies`` (distinct non-null, non-empty ids), ``name`` (null when the id is not in
    ``names``) — sorted by ``feature_tag_id`` (UTF-8 byte order), validated with pandera.

    Memory: batch by batch; holds the per-batch counts and the distinct (tag, user) and (tag,
    company) pairs, never the day's rows.

    Raises ValidationError naming the sync job, partition and file (``feature_tags_breakdown``):
    a batch lacks a column, carries another ``event_type`` than ``track_feature``, or the result
    breaks the schema (e.g. an empty or null ``event_name``).
    """
    needed = ["event_name", "user_id", "company_id"]
    where = _where(sync_job, partition, BREAKDOWN_FILE)
    counts: list[pl.DataFrame] = []
    users, companies = _DistinctPairs("user_id"), _DistinctPairs("company_id")
    for batch in batches:
        columns = batch.schema.names
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValidationError(
                f"{where}: the track_feature rows lack column(s) {missing!r} (Event Schema columns "
                f"that cannot be excluded). {_ADVICE[BREAKDOWN_FILE]}"
            )
        if "event_type" in columns:
            other = pc.sum(pc.not_equal(batch.column(columns.index("event_type")), "track_feature")).as_py() or 0
            if other:
                raise ValidationError(
                    f"{where}: column 'event_type' has {other} row(s) other than 'track_feature'; "
                    f"the breakdown counts track_feature events only. Pass the day's track_feature "
                    f"export. Nothing was written for this file."
                )
        frame = pl.from_arrow(batch.select(needed))
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_columns([pl.col(c).cast(pl.Utf8) for c in needed])
        if frame.height == 0:
            continue
        counts.append(frame.group_by("event_name").agg(pl.len().cast(pl.Int64).alias("events")))
        users.add(frame)
        companies.add(frame)
    if counts:
        totals = pl.concat(counts, how="vertical").group_by("event_name").agg(pl.col("events").sum())
    else:
        totals = pl.DataFrame(schema={"event_name": pl.Utf8, "events": pl.Int64})
    name_frame = pl.DataFrame(
        {"event_name": list(names.keys()), "name": list(names.values())},
        schema={"event_name": pl.Utf8, "name": pl.Utf8},
    )
    frame = (
        totals.join(name_frame, on="event_name", how="left")
        .join(users.counts("unique_users"), on="event_name", how="left")
        .join(companies.counts("unique_companies"), on="event_name", how="left")
        .with_columns(pl.col("unique_users").fill_null(0), pl.col("unique_companies").fill_null(0))
        .rename({"event_name": "feature_tag_id"})
        .select(BREAKDOWN_SCHEMA.names)
        .sort("feature_tag_id", nulls_last=True, maintain_order=True)
    )
    return _validate(frame, BREAKDOWN_PANDERA, BREAKDOWN_SCHEMA,
                     sync_job=sync_job, partition=partition, file=BREAKDOWN_FILE)


# ------------------------------------------------------------------------------ per-id files
def _spill(prepared: "PreparedExport", schema: pa.Schema, ids: set[str] | None, path: Path) -> int:
    """Rewrite the export's rows (only those whose ``event_name`` is in ``ids``, when given) into
    one uncompressed Arrow IPC file at ``path``, in order; one record batch decoded at a time.
    Returns the rows written."""
    wanted = None if ids is None else pa.array(sorted(ids), type=pa.string())
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(
        sink, schema, options=pa.ipc.IpcWriteOptions(compression=None)
    ) as writer:
        for file in prepared.files:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_file(source)
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)
                    if batch.schema != schema:
                        batch = batch.cast(schema)
                    if wanted is not None:
                        batch = batch.filter(pc.is_in(batch.column("event_name"), value_set=wanted))
                    if batch.num_rows:
                        writer.write_batch(batch)
                        rows += batch.num_rows
                    del batch
    return rows


def split_by_id(prepared: "PreparedExport", ids: set[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """Split an export by ``event_name``: the rows of ``track_feature_<ID>`` / ``track_labeled_<ID>``.

    ``prepared``: a :class:`~userpilot_sync.export.PreparedExport` (ordered Arrow IPC files).
    Yields ``(event_name, table)`` for every distinct ``event_name`` (or only those in ``ids``;
    ids without rows are skipped), in sorted ``event_name`` order (UTF-8 byte order); ``table``
    holds that event name's rows in their original (export) order, with
    ``prepared.arrow_schema``. With ``ids=None`` the yielded tables together are exactly the
    export's rows.

    Memory (project decision): prepared files are LZ4-compressed (``staging.py``), and a memory map
    of a compressed file decodes every buffer into process memory. So the rows (only those in
    ``ids``, when given) are first rewritten, one record batch at a time, into one *uncompressed*
    Arrow IPC work file beside the prepared files (``.split-<pid>-<random>.arrow`` in the
    prepared export's folder, i.e. inside the staged day, removed when the generator finishes or
    is closed, and with the staged day otherwise). That file is read memory-mapped (zero copy:
    its pages are the OS page cache, not the process heap); row indices are sorted stably on
    ``event_name`` (``pyarrow.compute.sort_indices``: each id's indices stay in row order), and
    each id's rows are materialised by ``take`` (record batch by record batch, since
    ``Table.take`` concatenates string columns first) only when yielded. Peak process memory: one
    record batch while rewriting, then the index array plus one id's rows. Disk: the selected
    rows, uncompressed, while the generator runs.

    Raises ValidationError when ``event_name`` has nulls (never in a validated export).
    """
    schema = prepared.arrow_schema
    if not prepared.files or (ids is not None and not ids):
        return
    folder = Path(prepared.files[0]).parent
    work = folder / f".split-{os.getpid()}-{uuid.uuid4().hex[:12]}.arrow"
    try:
        if _spill(prepared, schema, ids, work) == 0:
            return
        with pa.memory_map(str(work)) as source:
            table = pa.ipc.open_file(source).read_all()  # zero copy: views of the mapped file
            names = table.column("event_name")
            if names.null_count:
                raise ValidationError(
                    f"sync job {prepared.sync_job!r}, partition {prepared.partition}, event type "
                    f"{prepared.event_type!r}: column 'event_name' has {names.null_count} null value(s); "
                    f"prepare the export again (prepared exports are validated). Nothing was written."
                )
            order = pc.sort_indices(names)  # stable: ties keep their row order
            counts = pc.value_counts(names)
            # Arrow sorts strings by their UTF-8 bytes; Python's str order (code points) is the same.
            runs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
            batches = table.to_batches()  # zero copy; taking per batch never concatenates a column
            offsets = np.cumsum([0] + [b.num_rows for b in batches], dtype=np.uint64)
            positions = order.to_numpy(zero_copy_only=True)
            start = 0
            for value, count in runs:
                part = _take(batches, offsets, order.slice(start, count), positions[start:start + count], schema)
                first, last = part.column("event_name")[0].as_py(), part.column("event_name")[-1].as_py()
                if first != value or last != value:
                    raise RuntimeError(f"split_by_id: the sort order of event_name disagrees at {value!r}")
                yield value, part
                del part
                start += count
            del table, names, batches, order
    finally:
        work.unlink(missing_ok=True)


def _take(batches: list[pa.RecordBatch], offsets: np.ndarray, rows: pa.Array, positions: np.ndarray,
          schema: pa.Schema) -> pa.Table:
    """The rows at ascending global row numbers ``rows`` (``positions``: the same, as numpy),
    taken batch by batch (``Table.take`` would first concatenate the chunks of string columns)."""
    cuts = np.searchsorted(positions, offsets)
    pieces = []
    for i in np.flatnonzero(np.diff(cuts)):
        a, z = int(cuts[i]), int(cuts[i + 1])
        local = pc.subtract(rows.slice(a, z - a), pa.scalar(int(offsets[i]), pa.uint64()))
        pieces.append(batches[i].take(local))
    return pa.Table.from_batches(pieces, schema=schema)
