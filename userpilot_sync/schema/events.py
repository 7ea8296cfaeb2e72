"""Columns of the Userpilot Event Schema and the Arrow schemas exports are written with.

Source of the facts: Userpilot Data Sync documentation, "Event Schema" (every event carries the
same columns; ``event_type`` is one of seven values). Decisions where the docs are silent are
marked "project decision" and documented in ``docs/schema.md``.

Internal (staged) shape of one event: :data:`EVENT_COLUMNS`, in file order, each with its Arrow
type, nullability, description and source — the one place columns are described (the Dagster UI
shows them; ``python -m userpilot_sync.schema.reference`` renders them into docs/schema.md).

``interaction`` exports add three parsed columns (project decision), taken from
``event_name = {entity_type}:{entity_id}:{STATUS}``: ``entity_type``, ``entity_id``,
``interaction_status`` (all string, not null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa

#: Version of the exported column set; bump when columns are added, removed or change type.
SCHEMA_VERSION = 1

#: The closed set of event types (Userpilot Event Schema); one export asset each.
EVENT_TYPES: tuple[str, ...] = (
    "identify_user",
    "identify_company",
    "interaction",
    "track",
    "track_feature",
    "page_view",
    "session_start",
)

#: Event types whose ``event_name`` is documented as empty.
EMPTY_NAME_EVENT_TYPES = frozenset({"identify_user", "identify_company", "page_view", "session_start"})

#: ``source`` values the docs list. The set is open: other well-formed values are reported, not
#: rejected (see docs/schema.md).
KNOWN_SOURCES: tuple[str, ...] = (
    "web-client",
    "backend-http",
    "backend-http-import",
    "backend-hubspot",
    "backend-salesforce",
    "backend-segment",
)

#: Interaction statuses seen in Userpilot's APIs. Open set: others are reported, not rejected.
KNOWN_INTERACTION_STATUSES: tuple[str, ...] = (
    "SEEN",
    "STARTED",
    "COMPLETED",
    "DISMISSED",
    "SKIPPED",
    "SUBMITTED",
)

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

#: Where a column's meaning comes from (shown in docs/schema.md's generated reference).
EVENT_SCHEMA_DOC = "Userpilot Event Schema"
PROJECT_DECISION = "project decision"
#: A documented column whose encoding or rule the project decides.
EVENT_SCHEMA_AND_DECISION = f"{EVENT_SCHEMA_DOC}; {PROJECT_DECISION}"


@dataclass(frozen=True)
class Column:
    """One column of the Event Schema: name, Arrow type, nullability, a description (the one
    place it is written: the Dagster UI and docs/schema.md's generated reference show it) and
    the source of the description's facts (:data:`EVENT_SCHEMA_DOC` or :data:`PROJECT_DECISION`)."""

    name: str
    arrow_type: pa.DataType
    nullable: bool
    description: str
    source: str = EVENT_SCHEMA_DOC


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("app_token", pa.string(), False,
           "Userpilot environment (app token, e.g. `NX-1a2b3c4d`) the event belongs to; always the sync "
           "job's app token."),
    Column("event_type", pa.string(), False,
           "One of the seven event types (a closed set); always the export's own event type."),
    Column(
        "event_name",
        pa.string(),
        False,
        "Empty (`\"\"`) for identify_user, identify_company, page_view and session_start; the custom "
        "event name for track; the feature-tag id for track_feature; `{entity_type}:{entity_id}:{STATUS}` "
        "for interaction (e.g. `checklist:2:SEEN`, `experience:448:DISMISSED`).",
    ),
    Column("user_id", pa.string(), True, "The user (empty for identify_company events)."),
    Column("company_id", pa.string(), True, "The company, when known."),
    Column("source", pa.string(), True,
           "Where the event came from: web-client, backend-http, backend-http-import, backend-hubspot, "
           "backend-salesforce, backend-segment. The set is open (project decision): any single token "
           "passes; values outside that list are reported by the `known_values` warning check, not "
           "rejected.",
           EVENT_SCHEMA_AND_DECISION),
    Column("inserted_at", TIMESTAMP_TYPE, False,
           "When the event happened: UTC, microsecond precision; inside the partition's UTC day "
           "[00:00, 24:00). Exports are ordered by (`inserted_at`, `internal_event_id`)."),
    Column("internal_event_id", pa.string(), False,
           "The de-duplication key: xxHash64 of (app_token, event_type, event_name, user_id, company_id, "
           "inserted_at). Passed through when the source has it, else computed (the project's recipe: "
           "docs/schema.md, \"internal_event_id\"). Rows with the same id and content are exact duplicates (dropped "
           "and counted); the same id with different content fails the day. Uniqueness is checked per "
           "hour (rows sharing an id meet there: the id hashes `inserted_at`) and per validated group "
           "of hours.",
           EVENT_SCHEMA_AND_DECISION),
    Column("hostname", pa.string(), True, "Host of the page where the event happened (web-client)."),
    Column("pathname", pa.string(), True, "Path of the page where the event happened (web-client)."),
    Column("screen_width", pa.int32(), True, "Screen width in pixels (>= 0)."),
    Column("screen_height", pa.int32(), True, "Screen height in pixels (>= 0)."),
    Column("device_type", pa.string(), True, "Auto-captured device type."),
    Column("user_agent", pa.string(), True, "Auto-captured user agent."),
    Column("operating_system", pa.string(), True, "Auto-captured operating system."),
    Column("browser", pa.string(), True, "Auto-captured browser."),
    Column("browser_language", pa.string(), True, "Auto-captured browser language."),
    Column("session", pa.string(), True, "Session number, as text."),
    Column("country_code", pa.string(), True, "ISO 3166-1 alpha-2 country code (two upper-case letters)."),
    Column("metadata", pa.string(), True,
           "Per-type properties as one JSON object: user/company properties for identify_*, event "
           "properties for track, answers for survey and NPS interactions. Encoding (project decision): "
           "canonical JSON text (sorted keys, no spaces) in Parquet, CSV and Avro; a JSON object in "
           "NDJSON.",
           EVENT_SCHEMA_AND_DECISION),
)

#: Parsed columns added to interaction exports (project decision).
INTERACTION_COLUMNS: tuple[Column, ...] = (
    Column("entity_type", pa.string(), False,
           "Parsed from `event_name`: the interaction's entity — `experience` (flows), `checklist`, "
           "`nps`, `survey`; spotlights, banners and the resource center have their own entity types.",
           PROJECT_DECISION),
    Column("entity_id", pa.string(), False,
           "Parsed from `event_name`: the entity's id; with `entity_type` it joins a lookup table's "
           "`entity_type` + `id`.",
           PROJECT_DECISION),
    Column("interaction_status", pa.string(), False,
           "Parsed from `event_name`: SEEN, STARTED, COMPLETED, DISMISSED, SKIPPED, SUBMITTED, ... (open "
           "set: other statuses are reported by the `known_values` warning check, not rejected).",
           PROJECT_DECISION),
)

#: Columns that cannot be excluded: the six fields hashed into internal_event_id, and the id.
REQUIRED_COLUMNS: frozenset[str] = frozenset(
    {"app_token", "event_type", "event_name", "user_id", "company_id", "inserted_at", "internal_event_id"}
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS)
_BY_NAME = {c.name: c for c in EVENT_COLUMNS + INTERACTION_COLUMNS}


def column(name: str) -> Column:
    """The :class:`Column` called ``name``; raises KeyError for unknown names."""
    return _BY_NAME[name]


def _schema(columns: Iterable[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in columns])


def staged_arrow_schema(exclude_columns: Iterable[str] = ()) -> pa.Schema:
    """Arrow schema of staged raw events (all event types), minus excluded columns."""
    excluded = set(exclude_columns)
    return _schema(c for c in EVENT_COLUMNS if c.name not in excluded)


def export_columns(event_type: str, exclude_columns: Iterable[str] = ()) -> tuple[Column, ...]:
    """Columns of one event type's export, in file order (interaction gets parsed columns)."""
    excluded = set(exclude_columns)
    cols = [c for c in EVENT_COLUMNS if c.name not in excluded]
    if event_type == "interaction":
        cols.extend(INTERACTION_COLUMNS)
    return tuple(cols)


def export_arrow_schema(event_type: str, exclude_columns: Iterable[str] = ()) -> pa.Schema:
    """Arrow schema every format of ``event_type``'s export is written with."""
    return _schema(export_columns(event_type, exclude_columns))
