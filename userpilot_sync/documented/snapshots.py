"""``all_users`` and ``all_companies``: the latest state and all properties of every user/company.

Userpilot Data Sync documents both files in every date folder ("full snapshots: latest state and
all properties of every user/company"); their columns are not documented, so these are project
decisions (docs/schema.md):

``all_users`` (sorted by ``user_id``)

==================== ======================= ========= ==============================================
column               Arrow type              nullable  meaning
==================== ======================= ========= ==============================================
user_id              string                  no        a user with at least one ``identify_user`` event
company_id           string                  yes       latest non-empty ``company_id`` of their identify_user events
first_identified_at  timestamp[us, UTC]      no        their first ``identify_user`` event
last_identified_at   timestamp[us, UTC]      no        their latest ``identify_user`` event
last_event_at        timestamp[us, UTC]      no        their latest event of any extracted type
properties           string (JSON object)    no        key-by-key merge of every identify event's ``metadata``
==================== ======================= ========= ==============================================

``all_companies``: the same with ``company_id`` first (``identify_company`` events), no user
column. ``last_event_at`` of a company is the latest event of any type carrying its
``company_id``.

Rules: a day D's snapshot covers every identify event from the snapshot's history start (the
sync job's first exported day) to the end of D. ``properties`` takes each key from the latest
event that carries it — latest by (``inserted_at``, ``internal_event_id``), the export order —
and a key whose latest value is null stays, as null. Written as the canonical JSON text of the
``metadata`` column (sorted keys, ``,``/``:`` separators, ASCII escapes). ``last_event_at``
counts the events the sync job extracts (its event types plus those the documented files need),
before event-name filters; user and company id filters apply everywhere.

Computation: ``snapshot(D) = merge(snapshot(previous exported day), delta(D))``, where the
*delta* of a day is the same table over that day's events alone (users with any event on the
day; identify columns null when not identified that day). Deltas are small (the day's active
users); the merge is a sorted outer join. Memory: one full snapshot plus one delta, as Arrow/
polars tables (a few hundred bytes per user; measured in ``make bench``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import pandera.errors
import pandera.polars as pa_pl
import polars as pl
import pyarrow as pa

from userpilot_sync.errors import ValidationError
from userpilot_sync.schema.events import PROJECT_DECISION, TIMESTAMP_TYPE

USERS = "all_users"
COMPANIES = "all_companies"
#: The id column of each snapshot.
ID_COLUMN = {USERS: "user_id", COMPANIES: "company_id"}
#: The identify event type behind each snapshot.
IDENTIFY_EVENT_TYPE = {USERS: "identify_user", COMPANIES: "identify_company"}

#: The one place each snapshot column is described (shown in docs/schema.md's generated reference):
#: file -> column -> (description, source). Userpilot documents the files, not their columns.
COLUMN_DOCS: dict[str, dict[str, tuple[str, str]]] = {
    USERS: {
        "user_id": ("The user: at least one `identify_user` event from the history start to the end of the "
                    "day. Rows are sorted by it.", PROJECT_DECISION),
        "company_id": ("Latest non-empty `company_id` of the user's `identify_user` events (null: none).",
                       PROJECT_DECISION),
        "first_identified_at": ("The user's first `identify_user` event.", PROJECT_DECISION),
        "last_identified_at": ("The user's latest `identify_user` event.", PROJECT_DECISION),
        "last_event_at": ("The user's latest event of any type the sync job extracts (before event-type and "
                          "event-name filters). After a lost state store was rebuilt from the source, earlier "
                          "days count identify events only.", PROJECT_DECISION),
        "properties": ("Key-by-key merge of the `metadata` of every `identify_user` event: each key from the "
                       "latest event carrying it, by (`inserted_at`, `internal_event_id`); a key whose latest "
                       "value is null stays, as null; `{}` when no event carried an object. Canonical JSON "
                       "text like `metadata` (an object in NDJSON); absent when the sync job excludes "
                       "`metadata`.", PROJECT_DECISION),
    },
    COMPANIES: {
        "company_id": ("The company: at least one `identify_company` event from the history start to the end "
                       "of the day. Rows are sorted by it.", PROJECT_DECISION),
        "first_identified_at": ("The company's first `identify_company` event.", PROJECT_DECISION),
        "last_identified_at": ("The company's latest `identify_company` event.", PROJECT_DECISION),
        "last_event_at": ("The latest event of any type the sync job extracts that carries the company's id "
                          "(before event-type and event-name filters).", PROJECT_DECISION),
        "properties": ("Key-by-key merge of the `metadata` of every `identify_company` event, as for "
                       "`all_users`; `{}` when none; absent when the sync job excludes `metadata`.",
                       PROJECT_DECISION),
    },
}


def snapshot_schema(name: str, with_properties: bool = True) -> pa.Schema:
    """Arrow schema of ``all_users``/``all_companies`` (``properties`` left out when the sync job
    excludes the ``metadata`` column: excluded columns never appear anywhere)."""
    fields = [pa.field(ID_COLUMN[name], pa.string(), nullable=False)]
    if name == USERS:
        fields.append(pa.field("company_id", pa.string(), nullable=True))
    fields += [
        pa.field("first_identified_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("last_identified_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("last_event_at", TIMESTAMP_TYPE, nullable=False),
    ]
    if with_properties:
        fields.append(pa.field("properties", pa.string(), nullable=False))
    return pa.schema(fields)


def _delta_polars_schema(name: str) -> dict[str, pl.DataType]:
    out: dict[str, pl.DataType] = {ID_COLUMN[name]: pl.String}
    if name == USERS:
        out["company_id"] = pl.String
    ts = pl.Datetime("us", "UTC")
    out.update(first_identified_at=ts, last_identified_at=ts, last_event_at=ts, properties=pl.String)
    return out


def empty_state(name: str) -> pl.DataFrame:
    """A snapshot with no rows (the state before the history start), all columns."""
    return pl.DataFrame(schema=_delta_polars_schema(name))


def canonical_json(value: dict) -> str:
    """The canonical JSON text of the ``metadata`` column: sorted keys, compact, ASCII escapes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _merge_properties(texts: Iterable[str | None]) -> str | None:
    """Merge JSON objects in order, later keys winning (nulls kept). None when no object was given."""
    merged: dict | None = None
    for text in texts:
        if text is None:
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue  # not JSON (the schema allows any text): carries no properties
        if not isinstance(value, dict):
            continue
        if merged is None:
            merged = {}
        merged.update(value)
    return None if merged is None else canonical_json(merged)


@dataclass
class DayEvents:
    """The inputs of one day's delta.

    ``identify``: the day's identify events of the snapshot's type (de-duplicated, in export
    order, id filters applied), columns at least ``user_id``/``company_id``, ``inserted_at``,
    ``internal_event_id`` and ``metadata`` (absent when excluded). ``activity``: one row per id
    with its latest event of the day (``id``, ``last_event_at``), over every extracted event type.
    """

    identify: pl.DataFrame
    activity: pl.DataFrame


def day_delta(name: str, events: DayEvents) -> pl.DataFrame:
    """The delta of one day for snapshot ``name``: one row per id with any event on the day.

    Columns as the snapshot (``properties`` null when the id had no identify event with an object
    ``metadata`` that day; identify columns null when not identified that day), sorted by id.
    """
    id_col = ID_COLUMN[name]
    ident = events.identify.filter(pl.col(id_col).is_not_null() & (pl.col(id_col) != ""))
    ident = ident.sort(["inserted_at", "internal_event_id"], maintain_order=True)
    aggs = [pl.col("inserted_at").min().alias("first_identified_at"),
            pl.col("inserted_at").max().alias("last_identified_at")]
    if name == USERS:
        company = pl.when(pl.col("company_id") != "").then(pl.col("company_id"))
        aggs.append(company.drop_nulls().last().alias("company_id"))
    has_metadata = "metadata" in ident.columns
    if has_metadata:
        aggs.append(pl.col("metadata").alias("_metadata"))
    grouped = ident.group_by(id_col, maintain_order=True).agg(aggs)
    if has_metadata:
        props = [_merge_properties(texts) for texts in grouped.get_column("_metadata").to_list()]
        grouped = grouped.drop("_metadata").with_columns(pl.Series("properties", props, dtype=pl.String))
    else:
        grouped = grouped.with_columns(pl.lit(None, dtype=pl.String).alias("properties"))
    activity = events.activity.rename({"id": id_col}) if "id" in events.activity.columns else events.activity
    activity = activity.filter(pl.col(id_col).is_not_null() & (pl.col(id_col) != ""))
    delta = activity.join(grouped, on=id_col, how="full", coalesce=True)
    # an identify event is an event: last_event_at >= last_identified_at even if activity missed it
    delta = delta.with_columns(pl.max_horizontal("last_event_at", "last_identified_at").alias("last_event_at"))
    schema = _delta_polars_schema(name)
    return delta.select([pl.col(c).cast(t) for c, t in schema.items()]).sort(id_col)


def merge_delta(name: str, state: pl.DataFrame, delta: pl.DataFrame, *, keep_unidentified: bool = False) -> pl.DataFrame:
    """``snapshot(D)`` from ``snapshot(previous day)`` and ``delta(D)`` (both as above), sorted by id.

    Ids that were never identified (activity only) are dropped; ``properties`` of ids in both
    are merged key by key (the delta's values win); ``company_id`` takes the delta's non-empty
    value; ``first_identified_at`` keeps the earliest. ``keep_unidentified`` keeps activity-only
    ids: merging two deltas gives the delta of both days (the merge is associative, so replaying
    N days is one merge of the state with the combined delta).
    """
    id_col = ID_COLUMN[name]
    # properties of ids in both: merged in Python, for those ids only (a day's identified users)
    touched = delta.lazy().filter(pl.col("properties").is_not_null()).select(
        id_col, pl.col("properties").alias("properties_new"))
    both = (state.lazy().filter(pl.col("properties").is_not_null()).select(id_col, "properties")
            .join(touched, on=id_col, how="inner").collect(engine="streaming"))
    patch = pl.DataFrame({id_col: both.get_column(id_col),
                          "_merged": [_merge_properties(pair) for pair in both.select("properties", "properties_new").iter_rows()]},
                         schema={id_col: pl.String, "_merged": pl.String})
    cols = [
        pl.min_horizontal("first_identified_at", "first_identified_at_new").alias("first_identified_at"),
        pl.max_horizontal("last_identified_at", "last_identified_at_new").alias("last_identified_at"),
        pl.max_horizontal("last_event_at", "last_event_at_new").alias("last_event_at"),
        pl.coalesce("_merged", "properties_new", "properties").alias("properties"),
    ]
    if name == USERS:
        cols.append(pl.coalesce("company_id_new", "company_id").alias("company_id"))
    # one lazy query: the join, the new columns and the filter are not materialised one by one
    query = (state.lazy().join(delta.lazy(), on=id_col, how="full", coalesce=True, suffix="_new")
             .join(patch.lazy(), on=id_col, how="left").with_columns(cols))
    if not keep_unidentified:
        query = query.filter(pl.col("first_identified_at").is_not_null())
    schema = _delta_polars_schema(name)
    return query.select([pl.col(c).cast(t) for c, t in schema.items()]).sort(id_col).collect(engine="streaming")


def snapshot_table(name: str, state: pl.DataFrame, *, with_properties: bool = True) -> pa.Table:
    """The ``all_users``/``all_companies`` file content of a state: ``properties`` null -> ``{}``."""
    frame = state.with_columns(pl.col("properties").fill_null("{}"))
    schema = snapshot_schema(name, with_properties)
    return frame.select(schema.names).to_arrow().cast(schema)


def _pandera_schema(name: str, with_properties: bool) -> pa_pl.DataFrameSchema:
    id_col = ID_COLUMN[name]
    ts = pl.Datetime("us", "UTC")
    columns = {id_col: pa_pl.Column(pl.String, nullable=False, unique=True,
                                    checks=pa_pl.Check.str_length(min_value=1))}
    if name == USERS:
        columns["company_id"] = pa_pl.Column(pl.String, nullable=True)
    columns.update(
        first_identified_at=pa_pl.Column(ts, nullable=False),
        last_identified_at=pa_pl.Column(ts, nullable=False),
        last_event_at=pa_pl.Column(ts, nullable=False),
    )
    if with_properties:
        columns["properties"] = pa_pl.Column(pl.String, nullable=False,
                                             checks=pa_pl.Check.str_startswith("{"))
    return pa_pl.DataFrameSchema(
        columns, strict=True, ordered=True, name=name,
        checks=[
            pa_pl.Check(lambda d: d.lazyframe.select(
                pl.col("first_identified_at") <= pl.col("last_identified_at")), error="first_identified_at > last_identified_at"),
            pa_pl.Check(lambda d: d.lazyframe.select(
                pl.col("last_identified_at") <= pl.col("last_event_at")), error="last_identified_at > last_event_at"),
        ],
    )


def validate_snapshot(name: str, table: pa.Table, *, sync_job: str, partition: str, day_end) -> pa.Table:
    """Validate one snapshot file (pandera): dtypes, ids unique and non-empty, time order, no time
    after the end of the day (``day_end``, exclusive). Raises ValidationError naming the sync job,
    partition and file."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    schema = _pandera_schema(name, "properties" in table.column_names)
    try:
        schema.validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases.head(5)
        raise ValidationError(
            f"sync job {sync_job!r}, partition {partition}, file {name}: the snapshot breaks its schema "
            f"({cases.select('column', 'check', 'failure_case').rows()}); this is a bug or corrupt state: "
            f"delete the sync job's state store folder to rebuild it. Nothing of the day was written.") from None
    if frame.height and frame.get_column("last_event_at").max() >= day_end:
        raise ValidationError(
            f"sync job {sync_job!r}, partition {partition}, file {name}: last_event_at after the end of the day; "
            f"the state store holds a later day's state. Delete the state store folder to rebuild it. Nothing of "
            f"the day was written.")
    return table
