"""Columns of the Userpilot Event Schema and the Arrow schemas exports are written with.

Source of the facts: Userpilot Data Sync documentation, "Event Schema" (every event carries the
same columns; ``event_type`` is one of seven values). Decisions where the docs are silent are
marked "project decision" and documented in ``docs/schema.md``.

Internal (staged) shape of one event, in this column order:

================== ======================== ========= ==========================================
column             Arrow type               nullable  notes
================== ======================== ========= ==========================================
app_token          string                   no        Userpilot environment, e.g. ``NX-1a2b3c4d``
event_type         string                   no        one of :data:`EVENT_TYPES`
event_name         string                   no        ``""`` when the docs say "empty"
user_id            string                   yes
company_id         string                   yes
source             string                   yes       open set, see :data:`KNOWN_SOURCES`
inserted_at        timestamp[us, tz=UTC]    no        when the event happened
internal_event_id  string                   no        xxHash64 (see ``internal_event_id.py``)
hostname           string                   yes
pathname           string                   yes
screen_width       int32                    yes       pixels, >= 0
screen_height      int32                    yes       pixels, >= 0
device_type        string                   yes
user_agent         string                   yes
operating_system   string                   yes
browser            string                   yes
browser_language   string                   yes
session            string                   yes       session number, as text
country_code       string                   yes       ISO 3166-1 alpha-2, upper case
metadata           string (JSON object)     yes       project decision: JSON text, keys sorted
================== ======================== ========= ==========================================

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


@dataclass(frozen=True)
class Column:
    """One column of the Event Schema: name, Arrow type, nullability and a description."""

    name: str
    arrow_type: pa.DataType
    nullable: bool
    description: str


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("app_token", pa.string(), False, "Userpilot environment (app token)."),
    Column("event_type", pa.string(), False, "One of the seven event types."),
    Column(
        "event_name",
        pa.string(),
        False,
        "Empty for identify_*, page_view, session_start; custom name for track; feature-tag id "
        "for track_feature; '{entity_type}:{entity_id}:{STATUS}' for interaction.",
    ),
    Column("user_id", pa.string(), True, "The user (empty for identify_company)."),
    Column("company_id", pa.string(), True, "The company, when known."),
    Column("source", pa.string(), True, "Where the event came from, e.g. web-client."),
    Column("inserted_at", TIMESTAMP_TYPE, False, "When the event happened (UTC, microseconds)."),
    Column("internal_event_id", pa.string(), False, "xxHash64 de-duplication key."),
    Column("hostname", pa.string(), True, "Host of the page (web-client)."),
    Column("pathname", pa.string(), True, "Path of the page (web-client)."),
    Column("screen_width", pa.int32(), True, "Screen width in pixels."),
    Column("screen_height", pa.int32(), True, "Screen height in pixels."),
    Column("device_type", pa.string(), True, "Auto-captured device type."),
    Column("user_agent", pa.string(), True, "Auto-captured user agent."),
    Column("operating_system", pa.string(), True, "Auto-captured operating system."),
    Column("browser", pa.string(), True, "Auto-captured browser."),
    Column("browser_language", pa.string(), True, "Auto-captured browser language."),
    Column("session", pa.string(), True, "Session number."),
    Column("country_code", pa.string(), True, "ISO 3166-1 alpha-2 country code."),
    Column("metadata", pa.string(), True, "Per-type properties as a JSON object (text)."),
)

#: Parsed columns added to interaction exports (project decision).
INTERACTION_COLUMNS: tuple[Column, ...] = (
    Column("entity_type", pa.string(), False, "Entity of the interaction: experience, checklist, nps, survey, ..."),
    Column("entity_id", pa.string(), False, "Id of the entity (join to the lookups)."),
    Column("interaction_status", pa.string(), False, "SEEN, STARTED, COMPLETED, DISMISSED, SKIPPED, SUBMITTED, ..."),
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
