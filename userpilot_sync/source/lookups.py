"""Lookups: the names behind the IDs in ``event_name`` and ``entity_id``.

The Bulk Data Export API serves them under ``/api/v1/analytics/exports/lookups/<kind>`` with
cursor pagination (``limit``, ``after`` -> ``metadata.cursor.after``, ``metadata.total_count``).
Their record shapes are not documented, so each record is read leniently into a fixed table
per kind (one row per definition, sorted by ``id``):

===================== ===============================================================
kind                  columns (after ``id``, ``name``; every table ends with ``attributes``)
===================== ===============================================================
flows                 entity_type, status, created_at, updated_at
checklists            entity_type, status, created_at, updated_at
surveys               entity_type, survey_type, status, created_at, updated_at, questions
spotlights            entity_type, status, created_at, updated_at
banners               entity_type, status, created_at, updated_at
embeds                entity_type, status, created_at, updated_at
resource_center_modules  entity_type, status, created_at, updated_at
segments              description, created_at, updated_at
user_properties       display_name, data_type, description
company_properties    display_name, data_type, description
features_events       type, category, description
events_properties     event_name, display_name, data_type
===================== ===============================================================

Column types: every column is ``string`` except ``created_at``/``updated_at``
(``timestamp[us, UTC]``). ``id`` is text and never empty (numbers are written as text, so
``"448"`` joins ``experience:448:SEEN``). ``entity_type`` is the interaction entity type used in
``event_name`` (``experience`` for flows, ``nps`` or ``survey`` for surveys, ...), so
``entity_type`` + ``id`` join an interaction export's ``entity_type`` + ``entity_id``.
``questions`` is JSON text (a list of ``{id, title, type}``), ``attributes`` the complete
record as the API sent it (JSON text, keys sorted), so nothing the API adds is lost.
``features_events.type`` is ``feature_tag`` (id = the feature-tag id in ``track_feature``'s
``event_name``), ``labeled_event`` or ``tracked_event`` (id = the event name).

Every table is validated with a pandera (polars) schema: dtypes, ``id`` unique and not empty,
``entity_type`` lower-case. :func:`demo_lookup_records` gives the demo app's definitions
(matching the ids the demo generator and the emulator use); the destination's
:func:`~userpilot_sync.destination.lookups.write_lookups` writes the tables.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import pandera.errors
import pandera.polars as pa_pl
import polars as pl
import pyarrow as pa

from userpilot_sync.errors import ValidationError
from userpilot_sync.schema.events import PROJECT_DECISION
from userpilot_sync.source.demo import FEATURE_TAGS, INTERACTION_ENTITIES, TRACK_EVENTS

if TYPE_CHECKING:  # pragma: no cover
    from userpilot_sync.config.model import SyncJob
    from userpilot_sync.source.export_api import ExportApiSource

_TS = pa.timestamp("us", tz="UTC")
_CONTENT = ("entity_type", "status", "created_at", "updated_at")

#: Columns of each lookup kind after ``id`` and ``name`` (``attributes`` is appended to all).
LOOKUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "flows": _CONTENT,
    "checklists": _CONTENT,
    "surveys": ("entity_type", "survey_type", "status", "created_at", "updated_at", "questions"),
    "spotlights": _CONTENT,
    "banners": _CONTENT,
    "embeds": _CONTENT,
    "resource_center_modules": _CONTENT,
    "segments": ("description", "created_at", "updated_at"),
    "user_properties": ("display_name", "data_type", "description"),
    "company_properties": ("display_name", "data_type", "description"),
    "features_events": ("type", "category", "description"),
    "events_properties": ("event_name", "display_name", "data_type"),
}
#: The lookup kinds, in the order they are fetched.
LOOKUP_KINDS: tuple[str, ...] = tuple(LOOKUP_COLUMNS)
#: Interaction entity type of each content kind (when the record does not say otherwise).
DEFAULT_ENTITY_TYPES = {
    "flows": "experience",
    "checklists": "checklist",
    "surveys": "survey",
    "spotlights": "spotlight",
    "banners": "banner",
    "embeds": "embed",
    "resource_center_modules": "resource_center",
}
#: The one place each lookup column is described (docs/schema.md's generated reference): column ->
#: (description, source); one meaning in every kind that has the column. The API documents the
#: lookups, not their record shapes, so the columns are project decisions.
LOOKUP_COLUMN_DOCS: dict[str, tuple[str, str]] = {
    "id": ("The definition's id, as text, never empty (numbers become text, so `\"448\"` joins "
           "`experience:448:SEEN`); rows are sorted by it.", PROJECT_DECISION),
    "name": ("The definition's name (API keys `name`, `title`, `label` or `key`).", PROJECT_DECISION),
    "entity_type": ("The interaction entity type used in `event_name` (`experience` for flows, `nps` or "
                    "`survey` for surveys, ...): `entity_type` + `id` join an interaction export's "
                    "`entity_type` + `entity_id`.", PROJECT_DECISION),
    "survey_type": ("The survey's type as the API gives it.", PROJECT_DECISION),
    "status": ("The definition's status as the API gives it (e.g. published, draft).", PROJECT_DECISION),
    "created_at": ("When the definition was created (UTC).", PROJECT_DECISION),
    "updated_at": ("When the definition was last updated (UTC).", PROJECT_DECISION),
    "questions": ("The survey's questions: JSON text, a list of `{id, title, type}`.", PROJECT_DECISION),
    "description": ("The definition's description.", PROJECT_DECISION),
    "display_name": ("The property's display name.", PROJECT_DECISION),
    "data_type": ("The property's data type as the API gives it.", PROJECT_DECISION),
    "type": ("`feature_tag` (id = the feature-tag id in `track_feature`'s `event_name`), `labeled_event` or "
             "`tracked_event` (id = the event name).", PROJECT_DECISION),
    "category": ("The feature or event's category.", PROJECT_DECISION),
    "event_name": ("The event the property belongs to.", PROJECT_DECISION),
    "attributes": ("The complete record as the API sent it (JSON text, keys sorted), so nothing the API "
                   "adds is lost.", PROJECT_DECISION),
}
#: Alternative keys an API record may use for a column (first present wins).
_ALIASES = {
    "id": ("id", "key", "_id", "uuid"),
    "name": ("name", "title", "label", "key"),
    "entity_type": ("entity_type",),
    "survey_type": ("survey_type", "type"),
    "status": ("status", "state"),
    "created_at": ("created_at", "createdAt", "inserted_at"),
    "updated_at": ("updated_at", "updatedAt"),
    "questions": ("questions",),
    "description": ("description",),
    "display_name": ("display_name", "displayName", "label", "title"),
    "data_type": ("data_type", "type", "dataType"),
    "type": ("type", "kind"),
    "category": ("category",),
    "event_name": ("event_name", "event", "eventName"),
}


def lookup_arrow_schema(kind: str) -> pa.Schema:
    """The Arrow schema of one lookup kind's table (see the module docstring)."""
    if kind not in LOOKUP_COLUMNS:
        raise ValueError(f"unknown lookup kind {kind!r}; known: {', '.join(LOOKUP_KINDS)}")
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("name", pa.string())]
    for col in LOOKUP_COLUMNS[kind]:
        fields.append(pa.field(col, _TS if col in ("created_at", "updated_at") else pa.string()))
    fields.append(pa.field("attributes", pa.string()))
    return pa.schema(fields)


def lookup_schema(kind: str) -> pa_pl.DataFrameSchema:
    """The pandera (polars) schema a lookup table must satisfy (strict, ordered)."""
    columns: dict[str, pa_pl.Column] = {
        "id": pa_pl.Column(pl.Utf8, checks=[pa_pl.Check.str_length(min_value=1)], nullable=False, unique=True),
        "name": pa_pl.Column(pl.Utf8, nullable=True),
    }
    for col in LOOKUP_COLUMNS[kind]:
        if col in ("created_at", "updated_at"):
            columns[col] = pa_pl.Column(pl.Datetime("us", "UTC"), nullable=True)
        elif col == "entity_type":
            columns[col] = pa_pl.Column(pl.Utf8, checks=[pa_pl.Check.str_matches(r"^[a-z][a-z0-9_]*$")], nullable=False)
        else:
            columns[col] = pa_pl.Column(pl.Utf8, nullable=True)
    columns["attributes"] = pa_pl.Column(pl.Utf8, nullable=False)
    return pa_pl.DataFrameSchema(columns, strict=True, ordered=True, name=f"userpilot_lookup_{kind}")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _pick(record: Mapping[str, Any], column: str) -> Any:
    for key in _ALIASES.get(column, (column,)):
        value = record.get(key)
        if value is not None and value != "":
            return value
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return _dumps(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _timestamp(value: Any, kind: str, column: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):  # epoch seconds or milliseconds
        seconds = value / 1000 if value > 10_000_000_000 else value
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    try:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"lookup {kind!r}: column {column!r} has an unreadable timestamp {value!r}") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def records_to_table(kind: str, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Convert API lookup records of ``kind`` into its validated table (sorted by ``id``).

    Raises ValidationError (unreadable timestamps, missing/duplicate ids, schema failures).
    """
    schema = lookup_arrow_schema(kind)
    rows: list[dict[str, Any]] = []
    for record in records:
        if not isinstance(record, Mapping):
            raise ValidationError(f"lookup {kind!r}: a record is not a JSON object: {record!r:.80}")
        row: dict[str, Any] = {"id": _text(_pick(record, "id")), "name": _text(_pick(record, "name"))}
        for col in LOOKUP_COLUMNS[kind]:
            value = _pick(record, col)
            if col in ("created_at", "updated_at"):
                row[col] = _timestamp(value, kind, col)
            elif col == "entity_type":
                entity = value or DEFAULT_ENTITY_TYPES[kind]
                if kind == "surveys" and not record.get("entity_type") and str(_pick(record, "survey_type") or "").lower() == "nps":
                    entity = "nps"
                row[col] = str(entity).lower()
            elif col == "questions":
                row[col] = None if value is None else _dumps(value)
            else:
                row[col] = _text(value)
        row["attributes"] = _dumps(dict(record))
        rows.append(row)
    if any(r["id"] is None for r in rows):
        raise ValidationError(f"lookup {kind!r}: {sum(r['id'] is None for r in rows)} record(s) have no id")
    rows.sort(key=lambda r: (len(r["id"]), r["id"]) if r["id"].isdigit() else (1 << 30, r["id"]))
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    validate_lookup_table(kind, table)
    return table


def validate_lookup_table(kind: str, table: pa.Table) -> pa.Table:
    """Validate a lookup table with pandera (polars, data level). Raises ValidationError."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    try:
        lookup_schema(kind).validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases.with_columns(pl.col("failure_case").cast(pl.Utf8, strict=False))
        lines = [f"lookup {kind!r}: definitions break their schema"]
        for (col, check), group in cases.group_by(["column", "check"], maintain_order=True):
            lines.append(f"  column {col!r} failed {check}: {group.height} value(s), e.g. "
                         f"{group.get_column('failure_case').head(5).to_list()!r}")
        raise ValidationError("\n".join(lines)) from None
    return table


# ---------------------------------------------------------------------------------- demo
_DEMO_CREATED = "2025-01-15T09:00:00Z"
_DEMO_UPDATED = "2025-06-01T12:30:00Z"
_DEMO_NAMES = {
    ("experience", "448"): "Onboarding tour",
    ("experience", "449"): "New report walkthrough",
    ("experience", "450"): "Billing upgrade announcement",
    ("checklist", "2"): "Getting started checklist",
    ("checklist", "3"): "Admin setup checklist",
    ("nps", "71"): "Quarterly NPS",
    ("survey", "305"): "Report builder feedback",
    ("survey", "306"): "Onboarding satisfaction",
    ("spotlight", "812"): "New export button hotspot",
    ("banner", "9001"): "Scheduled maintenance banner",
    ("resource_center", "1"): "Help center",
}
_ENTITY_KIND = {
    "experience": "flows", "checklist": "checklists", "nps": "surveys", "survey": "surveys",
    "spotlight": "spotlights", "banner": "banners", "resource_center": "resource_center_modules",
}
_USER_PROPERTIES = (("email", "Email", "string"), ("name", "Name", "string"), ("plan", "Plan", "string"),
                    ("role", "Role", "string"), ("signed_up_at", "Signed up at", "date"))
_COMPANY_PROPERTIES = (("name", "Company name", "string"), ("industry", "Industry", "string"),
                       ("employees", "Employees", "numeric"), ("plan", "Plan", "string"))


#: Track events the demo app defines as labeled events (features_events type labeled_event).
DEMO_LABELED_EVENTS = ("Signed Up", "Upgraded Plan")


def demo_lookup_records(kind: str) -> list[dict[str, Any]]:
    """The demo app's definitions of ``kind`` as API records (ids match ``source/demo.py``)."""
    if kind not in LOOKUP_COLUMNS:
        raise ValueError(f"unknown lookup kind {kind!r}; known: {', '.join(LOOKUP_KINDS)}")
    stamps = {"created_at": _DEMO_CREATED, "updated_at": _DEMO_UPDATED}
    if kind in DEFAULT_ENTITY_TYPES:
        out = []
        for entity, (ids, _statuses) in INTERACTION_ENTITIES.items():
            if _ENTITY_KIND.get(entity) != kind:
                continue
            for entity_id in ids:
                rec: dict[str, Any] = {"id": int(entity_id), "name": _DEMO_NAMES[(entity, entity_id)],
                                       "status": "published", **stamps}
                if kind == "surveys":
                    rec["type"] = "nps" if entity == "nps" else "survey"
                    rec["questions"] = (
                        [{"id": "score", "title": "How likely are you to recommend Demo SaaS?", "type": "nps"},
                         {"id": "comment", "title": "What is the main reason for your score?", "type": "text"}]
                        if entity == "nps" else
                        [{"id": f"q{n}", "title": f"Question {n}", "type": "single_choice"} for n in (1, 2, 3)]
                    )
                out.append(rec)
        if kind == "embeds":
            out.append({"id": 1501, "name": "Dashboard help embed", "status": "published", **stamps})
        return out
    if kind == "segments":
        return [
            {"id": 1, "name": "All users", "description": "Everyone", **stamps},
            {"id": 2, "name": "Trial accounts", "description": "Companies on the free plan", **stamps},
            {"id": 3, "name": "Enterprise admins", "description": "Admins of enterprise companies", **stamps},
        ]
    if kind == "user_properties":
        return [{"key": k, "display_name": d, "type": t, "description": None} for k, d, t in _USER_PROPERTIES]
    if kind == "company_properties":
        return [{"key": k, "display_name": d, "type": t, "description": None} for k, d, t in _COMPANY_PROPERTIES]
    if kind == "features_events":
        out = [{"id": fid, "name": name, "type": "feature_tag", "category": "Product", "description": None}
               for fid, name in FEATURE_TAGS.items()]
        # two of the demo's track events are labeled events (exported per label as track_labeled_<ID>)
        out += [{"id": name, "name": name, "type": "labeled_event" if name in DEMO_LABELED_EVENTS else "tracked_event",
                 "category": "Custom events", "description": None}
                for name in TRACK_EVENTS]
        return out
    # events_properties: the properties the demo's track events carry
    return [
        {"id": f"{event}.{prop}", "event_name": event, "name": prop, "display_name": prop.title(), "data_type": dtype}
        for event in TRACK_EVENTS
        for prop, dtype in (("plan", "string"), ("value", "numeric"))
    ]


def demo_lookup_table(kind: str) -> pa.Table:
    """The demo app's validated definitions table of ``kind``."""
    return records_to_table(kind, demo_lookup_records(kind))


# ---------------------------------------------------------------------------------- fetching
def fetch_lookup(source: "ExportApiSource", kind: str, *, page_size: int | None = None) -> pa.Table:
    """Fetch one lookup endpoint (every page) into its validated table.

    Raises ExportApiError (HTTP failures, after retries) or ValidationError.
    """
    with source.client() as client:
        return _fetch(client, kind, page_size)


def _fetch(client, kind: str, page_size: int | None) -> pa.Table:
    records: list[dict] = []
    for page in client.iter_lookup_pages(kind, page_size):
        records.extend(page)
    return records_to_table(kind, records)


def fetch_lookups(source: "ExportApiSource", kinds: Iterable[str] = LOOKUP_KINDS, *,
                  page_size: int | None = None) -> dict[str, pa.Table]:
    """Fetch several lookup kinds over one session. Returns tables by kind."""
    with source.client() as client:
        return {kind: _fetch(client, kind, page_size) for kind in kinds}


def lookups_for_job(job: "SyncJob", kinds: Iterable[str] = LOOKUP_KINDS, *, source=None) -> dict[str, pa.Table]:
    """Lookup tables of a sync job's app: demo -> the demo tables, export_api -> fetched from the API.

    A ``files`` source has no lookups (returns ``{}``). ``source`` overrides the job's source
    (an :class:`~userpilot_sync.source.export_api.ExportApiSource` with test clocks, say).
    """
    kinds = tuple(kinds)
    kind = job.source.kind
    if kind == "demo":
        return {k: demo_lookup_table(k) for k in kinds}
    if kind == "export_api":
        if source is None:
            from userpilot_sync.source.export_api import ExportApiSource

            source = ExportApiSource.from_config(job)
        return fetch_lookups(source, kinds)
    return {}
