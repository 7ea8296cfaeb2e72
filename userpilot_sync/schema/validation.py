"""pandera (polars backend) schemas of each event type's export, built from the Event Schema.

Each schema checks, at the data level, every documented column (dtype, nullability) and the
value rules the Userpilot docs imply:

* ``app_token`` equals the sync job's app token; ``event_type`` equals the export's event type;
* ``event_name`` is ``""`` for identify_user, identify_company, page_view and session_start, not
  empty for track and track_feature, and ``{entity_type}:{entity_id}:{STATUS}`` for interaction;
* ``source`` is one token (letters, digits, ``-``, ``_``, ``.``, ``:``); values outside
  :data:`~userpilot_sync.schema.events.KNOWN_SOURCES` are reported, not rejected (open set);
* ``country_code`` is two upper-case letters; screen sizes are >= 0 pixels;
* ``inserted_at`` lies inside the partition's UTC day [00:00, 24:00);
* ``internal_event_id`` is present, not empty and unique within each validated frame (a group of
  hours of ~65k rows, ``export.VALIDATION_ROWS``, or one slice of a larger group, whose ids were
  first found distinct across the group); an id seen twice with different content is also caught
  per hour, where two rows with one id always meet (the id hashes ``inserted_at``), see
  ``export.py``.

:func:`validate_export_frame` raises :class:`~userpilot_sync.errors.ValidationError` naming the
sync job, partition, event type, column and a sample of failing values.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Iterable

import pandera.errors
import pandera.polars as pa
import polars as pl

from userpilot_sync.errors import ValidationError
from userpilot_sync.schema.events import EMPTY_NAME_EVENT_TYPES, export_columns

INTERACTION_NAME_PATTERN = r"^[a-z][a-z0-9_]*:[^:]+:[A-Z][A-Z_]*$"
# open set (decision 12): any single token is accepted, unknown values are reported, not rejected
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
COUNTRY_CODE_PATTERN = r"^[A-Z]{2}$"

_POLARS_TYPES = {
    "string": pl.Utf8,
    "int32": pl.Int32,
    "timestamp[us, tz=UTC]": pl.Datetime("us", "UTC"),
}


def _checks_for(column: str, event_type: str, app_token: str | None, day_start, day_end) -> list[pa.Check]:
    if column == "app_token":
        return [pa.Check.eq(app_token)] if app_token else [pa.Check.str_length(min_value=1)]
    if column == "event_type":
        return [pa.Check.eq(event_type)]
    if column == "event_name":
        if event_type in EMPTY_NAME_EVENT_TYPES:
            return [pa.Check.eq("", error="event_name must be empty for this event type")]
        if event_type == "interaction":
            return [pa.Check.str_matches(INTERACTION_NAME_PATTERN)]
        return [pa.Check.str_length(min_value=1, error="event_name must not be empty")]
    if column == "source":
        return [pa.Check.str_matches(SOURCE_PATTERN)]
    if column == "country_code":
        return [pa.Check.str_matches(COUNTRY_CODE_PATTERN)]
    if column in ("screen_width", "screen_height"):
        return [pa.Check.ge(0)]
    if column == "inserted_at" and day_start is not None:
        return [pa.Check.ge(day_start), pa.Check.lt(day_end)]
    if column == "internal_event_id":
        return [pa.Check.str_length(min_value=1)]
    if column in ("entity_type",):
        return [pa.Check.str_matches(r"^[a-z][a-z0-9_]*$")]
    if column == "interaction_status":
        return [pa.Check.str_matches(r"^[A-Z][A-Z_]*$")]
    return []


@lru_cache(maxsize=256)
def export_schema(
    event_type: str,
    exclude_columns: tuple[str, ...] = (),
    app_token: str | None = None,
    day_start: datetime | None = None,
    day_end: datetime | None = None,
) -> pa.DataFrameSchema:
    """The pandera schema of one export (columns in file order, strict, ordered).

    ``day_start``/``day_end`` (tz-aware UTC) bound ``inserted_at``; pass both or neither.
    """
    columns = {}
    for col in export_columns(event_type, exclude_columns):
        columns[col.name] = pa.Column(
            _POLARS_TYPES[str(col.arrow_type)],
            checks=_checks_for(col.name, event_type, app_token, day_start, day_end),
            nullable=col.nullable,
            unique=col.name == "internal_event_id",
        )
    return pa.DataFrameSchema(columns, strict=True, ordered=True, name=f"userpilot_{event_type}")


def validate_export_frame(
    frame: pl.DataFrame,
    *,
    sync_job: str,
    partition: str,
    event_type: str,
    exclude_columns: Iterable[str] = (),
    app_token: str | None = None,
    day_start: datetime | None = None,
    day_end: datetime | None = None,
    sample_size: int = 5,
) -> pl.DataFrame:
    """Validate an eager frame of one export at the data level; returns it unchanged.

    Raises ValidationError listing, per failing column and check, up to ``sample_size`` failing
    values.
    """
    schema = export_schema(event_type, tuple(sorted(exclude_columns)), app_token, day_start, day_end)
    try:
        return schema.validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        raise ValidationError(
            describe_failures(exc.failure_cases, sync_job, partition, event_type, sample_size)
        ) from None
    except pandera.errors.SchemaError as exc:  # pragma: no cover - lazy=True collects errors
        raise ValidationError(
            f"sync job {sync_job!r}, partition {partition}, event type {event_type!r}: {exc}"
        ) from None


def describe_failures(failure_cases: pl.DataFrame, sync_job: str, partition: str, event_type: str, sample_size: int = 5) -> str:
    """Human-readable summary of pandera's failure cases, one line per column and check."""
    lines = [
        f"sync job {sync_job!r}, partition {partition}, event type {event_type!r}: "
        f"events break the Userpilot Event Schema; fix the source data (or the sync job's "
        f"filters) and re-materialize the partition. Nothing was exported for this partition."
    ]
    cases = failure_cases
    if not isinstance(cases, pl.DataFrame):  # pragma: no cover - defensive
        cases = pl.from_pandas(cases)
    cases = cases.with_columns(pl.col("failure_case").cast(pl.Utf8, strict=False))
    for (col, check), group in cases.group_by(["column", "check"], maintain_order=True):
        sample = group.get_column("failure_case").head(sample_size).to_list()
        lines.append(
            f"  column {col!r} failed {check}: {group.height} value(s), e.g. {sample!r}"
        )
    return "\n".join(lines)
