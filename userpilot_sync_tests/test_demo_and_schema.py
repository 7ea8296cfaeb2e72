"""The demo generator and the Event Schema (pandera) on their own."""

from __future__ import annotations

from datetime import date, datetime, timezone

import polars as pl
import pytest

from userpilot_sync.errors import ValidationError
from userpilot_sync.partitions import day_window
from userpilot_sync.schema.events import EVENT_TYPES, export_arrow_schema
from userpilot_sync.schema.internal_event_id import compute_internal_event_id, internal_event_ids
from userpilot_sync.schema.validation import validate_export_frame
from userpilot_sync.source.demo import DemoSource

DAY = date(2026, 3, 9)


def test_internal_event_id_recipe_is_documented_value():
    ts = datetime(2026, 3, 10, 14, 5, 9, 123, tzinfo=timezone.utc)
    # "\x1f"-joined fields, null -> "", timestamp with 6 fractional digits and Z, xxh64 hex
    assert compute_internal_event_id("NX-1", "track", "x", "u", None, ts) == "ca91e9b3763b93a5"
    frame = pl.DataFrame(
        {"app_token": ["NX-1"], "event_type": ["track"], "event_name": ["x"], "user_id": ["u"],
         "company_id": [None], "inserted_at": [ts]},
        schema_overrides={"company_id": pl.Utf8, "inserted_at": pl.Datetime("us", "UTC")},
    )
    assert internal_event_ids(frame).to_list() == ["ca91e9b3763b93a5"]


def test_demo_is_deterministic_and_covers_every_event_type():
    a = DemoSource("NX-demo0001", events_per_day=2000, seed=3)
    b = DemoSource("NX-demo0001", events_per_day=2000, seed=3)
    assert a.block_events(DAY, 10).equals(b.block_events(DAY, 10))
    counts = a.expected_counts(DAY)
    assert sum(counts.values()) == 2000
    assert set(counts) == set(EVENT_TYPES)
    assert a.expected_counts(DAY) == counts
    assert DemoSource("NX-demo0001", 2000, seed=4).expected_counts(DAY) != counts


def test_demo_events_are_realistic():
    start, end = day_window(DAY)
    frame = pl.concat([pl.from_arrow(t) for t in DemoSource("NX-demo0001", 3000, 1).iter_blocks(start, end)])
    inter = frame.filter(pl.col("event_type") == "interaction").get_column("event_name")
    entities = {name.split(":")[0] for name in inter.to_list()}
    assert {"experience", "checklist", "nps", "survey"} <= entities
    nps = frame.filter(pl.col("event_name").str.starts_with("nps:") & pl.col("event_name").str.ends_with(":SUBMITTED"))
    assert nps.height and all('"score"' in m for m in nps.get_column("metadata").to_list())
    assert frame.filter(pl.col("event_type") == "identify_company").get_column("user_id").null_count() == \
        frame.filter(pl.col("event_type") == "identify_company").height
    assert frame.get_column("internal_event_id").n_unique() == frame.height
    assert frame.get_column("inserted_at").min() >= start and frame.get_column("inserted_at").max() < end


def _track_frame(**overrides) -> pl.DataFrame:
    start, _ = day_window(DAY)
    row = {
        "app_token": "NX-demo0001", "event_type": "track", "event_name": "Signed Up", "user_id": "u1",
        "company_id": "c1", "source": "web-client", "inserted_at": start, "internal_event_id": "abc",
        "hostname": None, "pathname": None, "screen_width": 100, "screen_height": 100, "device_type": None,
        "user_agent": None, "operating_system": None, "browser": None, "browser_language": None,
        "session": "1", "country_code": "US", "metadata": None,
    }
    row.update(overrides)
    schema = export_arrow_schema("track")
    return pl.from_arrow(__import__("pyarrow").Table.from_pylist([row], schema=schema))


def _validate(frame, event_type="track"):
    start, end = day_window(DAY)
    return validate_export_frame(frame, sync_job="demo", partition=DAY.isoformat(), event_type=event_type,
                                 app_token="NX-demo0001", day_start=start, day_end=end)


def test_valid_row_passes():
    assert _validate(_track_frame()).height == 1


@pytest.mark.parametrize(
    "overrides, column",
    [
        ({"event_name": ""}, "event_name"),
        ({"country_code": "usa"}, "country_code"),
        ({"screen_width": -1}, "screen_width"),
        ({"source": "Web Client!"}, "source"),
        ({"app_token": "NX-other"}, "app_token"),
        ({"inserted_at": datetime(2026, 3, 10, 0, 0, tzinfo=timezone.utc)}, "inserted_at"),
    ],
)
def test_invalid_values_name_the_column_and_values(overrides, column):
    with pytest.raises(ValidationError) as err:
        _validate(_track_frame(**overrides))
    text = str(err.value)
    assert "sync job 'demo'" in text and "partition 2026-03-09" in text and "event type 'track'" in text
    assert f"column '{column}'" in text


def test_unknown_source_value_with_good_shape_is_not_an_error():
    assert _validate(_track_frame(source="backend-mixpanel")).height == 1


def test_empty_event_name_rule_for_identify_types():
    frame = _track_frame(event_type="page_view", event_name="not empty")
    with pytest.raises(ValidationError, match="column 'event_name'"):
        _validate(frame, event_type="page_view")
