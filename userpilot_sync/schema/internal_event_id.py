"""The ``internal_event_id`` recipe (used only when a source does not deliver the id).

Userpilot Event Schema: ``internal_event_id`` is the xxHash64 of (app_token, event_type,
event_name, user_id, company_id, inserted_at). How those six fields become bytes is not
documented; this project's recipe (documented in docs/schema.md):

1. each field as text; null becomes ``""``;
2. ``inserted_at`` as ISO-8601 UTC with exactly six fractional digits and ``Z``
   (``2026-03-10T14:05:09.000123Z``);
3. the six texts joined with the ASCII unit separator ``\\x1f`` and encoded as UTF-8;
4. xxHash64 with seed 0, written as 16 lower-case hexadecimal digits.

When a source delivers ``internal_event_id`` it is passed through unchanged.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

import polars as pl
import xxhash

SEPARATOR = "\x1f"
TIMESTAMP_TEXT_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_POLARS_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.6fZ"
HASHED_FIELDS = ("app_token", "event_type", "event_name", "user_id", "company_id", "inserted_at")


def timestamp_text(ts: datetime) -> str:
    """ISO-8601 UTC text of ``ts`` with microseconds, as hashed (naive means UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).strftime(TIMESTAMP_TEXT_FORMAT)


def compute_internal_event_id(
    app_token: str | None,
    event_type: str | None,
    event_name: str | None,
    user_id: str | None,
    company_id: str | None,
    inserted_at: datetime,
) -> str:
    """The 16-hex-digit xxHash64 id of one event (see the module docstring)."""
    parts = (app_token, event_type, event_name, user_id, company_id, timestamp_text(inserted_at))
    text = SEPARATOR.join("" if p is None else p for p in parts)
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def internal_event_ids(frame: pl.DataFrame) -> pl.Series:
    """Compute ids for every row of a frame that has the six hashed columns.

    ``inserted_at`` must be ``Datetime(us, UTC)``. Returns a Utf8 series named
    ``internal_event_id``.
    """
    keys = frame.select(
        [pl.col(c).fill_null("") for c in HASHED_FIELDS[:5]]
        + [pl.col("inserted_at").dt.strftime(_POLARS_TIMESTAMP_FORMAT)]
    )
    joined: Sequence[str] = keys.select(
        pl.concat_str(pl.all(), separator=SEPARATOR)
    ).to_series().to_list()
    hexdigest = xxhash.xxh64_hexdigest
    return pl.Series("internal_event_id", [hexdigest(t.encode("utf-8")) for t in joined], dtype=pl.Utf8)
