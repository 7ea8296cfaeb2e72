"""Lenient normalisation of export chunk records to the internal event shape.

The record shape of Bulk Data Export chunks is not documented, so reading is lenient
(reference: "What the docs leave open"):

* ``inserted_at``: ISO-8601 text (``Z``, an offset, or no zone meaning UTC; up to µs), or a
  timestamp of any unit and zone (naive means UTC) -> ``timestamp[us, UTC]``;
* ``metadata``: a JSON object/struct (NDJSON) or JSON text (CSV, Parquet, Avro) -> JSON text;
* optional string columns: ``""`` and null are one value (null); ``event_name`` null -> ``""``;
* screen sizes as numbers or numeric text -> int32;
* missing optional columns -> null; missing ``internal_event_id`` (or null) -> computed with the
  documented recipe;
* columns the Event Schema does not know are dropped and reported (never exported until the
  schema version says so);
* text must be valid UTF-8: string and binary columns (any chunk format) are checked with
  Arrow's full validation before polars sees them; ``binary`` columns become text.

Errors (:class:`~userpilot_sync.errors.SourceError`) name the column and sample values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from userpilot_sync.errors import SourceError
from userpilot_sync.schema.events import COLUMN_NAMES, EVENT_COLUMNS
from userpilot_sync.schema.internal_event_id import internal_event_ids

_NOT_NULL_STRINGS = {"app_token", "event_type", "internal_event_id"}
_INT_COLUMNS = {"screen_width", "screen_height"}
_OFFSET = r"([+-]\d{2}:?\d{2})$"


@dataclass
class NormalizeReport:
    """What normalisation noticed in a batch: unknown columns and computed ids."""

    unknown_columns: set[str] = field(default_factory=set)
    computed_ids: int = 0


def _timestamp_expr(dtype: pl.DataType, where: str = "source chunk") -> pl.Expr:
    col = pl.col("inserted_at")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            col = col.dt.replace_time_zone("UTC")
        else:
            col = col.dt.convert_time_zone("UTC")
        return col.dt.cast_time_unit("us")
    if dtype == pl.Utf8:
        text = col.str.strip_chars().str.replace(r"Z$", "+00:00").str.replace(" ", "T", literal=True)
        text = pl.when(text.str.contains(_OFFSET)).then(text).otherwise(text + "+00:00")
        return text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", strict=False).dt.convert_time_zone("UTC")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    raise SourceError(
        f"{where}: column 'inserted_at' has type {dtype}; expected ISO-8601 text or a timestamp (UTC when no zone)"
    )


def _canonical_json(value) -> str | None:
    """JSON text of an object with sorted keys and without null members (struct/map rows)."""
    if value is None:
        return None
    if isinstance(value, list):  # a map column: [{"key": ..., "value": ...}, ...]
        value = {item["key"]: item["value"] for item in value}
    return json.dumps({k: v for k, v in value.items() if v is not None}, sort_keys=True, separators=(",", ":"),
                      default=str)


def _metadata_expr(dtype: pl.DataType) -> pl.Expr:
    col = pl.col("metadata")
    if dtype == pl.Utf8:
        return pl.when(col.str.strip_chars() == "").then(None).otherwise(col)
    if dtype == pl.Null:
        return col.cast(pl.Utf8)
    # Structs (Parquet/Avro records) and maps: the same text an NDJSON object gives, so one event
    # delivered in two chunk formats is the same event (sorted keys, no null members).
    return col.map_elements(_canonical_json, return_dtype=pl.Utf8, skip_nulls=True)


def _require_columns(columns: list[str], where: str) -> None:
    """Raise SourceError naming ``where`` and the columns when a column every event needs is missing."""
    for required in ("event_type", "inserted_at"):
        if required not in columns:
            raise SourceError(f"{where}: column {required!r} is missing; columns are {sorted(columns)}")


def normalize_frame(frame: pl.DataFrame, where: str = "source chunk") -> tuple[pl.DataFrame, NormalizeReport]:
    """Normalise one chunk batch to the staged shape (all Event Schema columns, in order).

    ``where`` names the chunk file (or batch) in errors. Raises SourceError for values that
    cannot be read (unparseable timestamps or screen sizes, missing required columns).
    """
    report = NormalizeReport(unknown_columns=set(frame.columns) - set(COLUMN_NAMES))
    _require_columns(frame.columns, where)
    exprs: list[pl.Expr] = []
    for col in EVENT_COLUMNS:
        name = col.name
        if name not in frame.columns:
            exprs.append(pl.lit(None, dtype=pl.Int32 if name in _INT_COLUMNS else pl.Utf8).alias(name))
            continue
        dtype = frame.schema[name]
        if name == "inserted_at":
            exprs.append(_timestamp_expr(dtype, where).alias(name))
        elif name == "metadata":
            exprs.append(_metadata_expr(dtype).alias(name))
        elif name in _INT_COLUMNS:
            src = pl.col(name)
            if dtype == pl.Utf8:
                src = pl.when(src.str.strip_chars() == "").then(None).otherwise(src.str.strip_chars())
            exprs.append(src.cast(pl.Float64, strict=False).cast(pl.Int32, strict=False).alias(name))
        else:
            src = pl.col(name).cast(pl.Utf8)
            if name == "event_name":
                exprs.append(src.fill_null("").alias(name))
            elif name in _NOT_NULL_STRINGS:
                exprs.append(src.alias(name))
            else:
                exprs.append(pl.when(src == "").then(None).otherwise(src).alias(name))
    out = frame.select(exprs)

    # Values that were present but could not be converted are errors, not silent nulls.
    for name in ["inserted_at", *sorted(_INT_COLUMNS & set(frame.columns))]:
        bad = out.get_column(name).is_null() & frame.get_column(name).is_not_null()
        if name != "inserted_at" and frame.schema[name] == pl.Utf8:
            bad = bad & (frame.get_column(name).str.strip_chars() != "")
        if bad.any():
            sample = frame.get_column(name).filter(bad).head(5).cast(pl.Utf8).to_list()
            raise SourceError(
                f"{where}: column {name!r} has {int(bad.sum())} unreadable value(s), e.g. {sample!r}"
            )
    if frame.schema.get("metadata") == pl.Utf8:
        text = out.get_column("metadata").str.strip_chars()
        bad = text.is_not_null() & ~(text.str.starts_with("{") & text.str.ends_with("}"))
        if bad.any():
            sample = out.get_column("metadata").filter(bad).head(3).to_list()
            raise SourceError(
                f"{where}: column 'metadata' has {int(bad.sum())} value(s) that are not a JSON object, e.g. {sample!r}"
            )
    if out.get_column("inserted_at").null_count():
        raise SourceError(
            f"{where}: column 'inserted_at' is empty in {out.get_column('inserted_at').null_count()} row(s); "
            "every event needs a timestamp to be assigned to a partition"
        )
    missing_id = out.get_column("internal_event_id").is_null() | (out.get_column("internal_event_id") == "")
    if missing_id.any():
        report.computed_ids = int(missing_id.sum())
        computed = internal_event_ids(out)
        out = out.with_columns(
            pl.when(missing_id).then(computed).otherwise(pl.col("internal_event_id")).alias("internal_event_id")
        )
    return out, report


def _has_text(t: pa.DataType) -> bool:
    """True when values of type ``t`` hold text or bytes (at any nesting level)."""
    if pa.types.is_dictionary(t):
        return _has_text(t.value_type)
    if pa.types.is_nested(t):
        return any(_has_text(t.field(i).type) for i in range(t.num_fields))
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_string_view(t) or pa.types.is_binary_view(t))


def _bad_bytes(scalar: pa.Scalar) -> bytes | None:
    """The bytes that fail to decode in one (nested, dictionary, view) value, or None if it is valid."""
    try:
        scalar.as_py()
    except UnicodeDecodeError as exc:
        return exc.object if isinstance(exc.object, bytes) else b""
    return None


def _not_utf8(column: pa.ChunkedArray) -> tuple[int, bytes | None]:
    """How many values of ``column`` are not valid UTF-8, and the first of them (its bytes)."""
    t = column.type
    bad: list[bytes] = []
    for chunk in column.chunks:
        if pa.types.is_string(t) or pa.types.is_large_string(t):  # a view: no copy, no validation
            chunk = chunk.view(pa.large_binary() if pa.types.is_large_string(t) else pa.binary())
        if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type) or pa.types.is_fixed_size_binary(chunk.type):
            for value in chunk.to_pylist():
                try:
                    if value is not None:
                        value.decode("utf-8")
                except UnicodeDecodeError:
                    bad.append(value)
        else:  # nested, dictionary or view types: value by value (error path only)
            bad.extend(b for b in (_bad_bytes(chunk[i]) for i in range(len(chunk))) if b is not None)
    return len(bad), (bad[0] if bad else None)


def _utf8_columns(table: pa.Table, where: str) -> pa.Table:
    """``table`` with binary columns as text, after checking every text value is valid UTF-8.

    Raises SourceError naming ``where``, the column, how many values are not UTF-8 and one of them.
    """
    for index, field in enumerate(table.schema):
        if not _has_text(field.type):
            continue
        column = table.column(index)
        t = field.type
        try:
            if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t):
                table = table.set_column(index, field.name, column.cast(pa.string()))
            elif pa.types.is_large_binary(t):
                table = table.set_column(index, field.name, column.cast(pa.large_string()))
            else:
                column.validate(full=True)
        except pa.ArrowInvalid:
            count, sample = _not_utf8(column)
            shown = f", e.g. {sample[:48]!r}" if sample else ""
            raise SourceError(
                f"{where}: column {field.name!r} has {max(count, 1)} value(s) that are not valid UTF-8 text{shown}. "
                "The chunk is corrupt or was not written as UTF-8; nothing was exported for this partition. "
                "Fix or re-create the chunk (Export API: re-run the partition; if it repeats, report the chunk "
                "to Userpilot), then export the partition again."
            ) from None
    return table


def normalize_arrow(batch: pa.RecordBatch | pa.Table, where: str = "source chunk") -> tuple[pl.DataFrame, NormalizeReport]:
    """:func:`normalize_frame` for an Arrow record batch or table.

    Columns of the Event Schema holding text are validated as UTF-8 first (Arrow's full
    validation; ``binary`` columns are cast to text); columns it does not know are reported and
    dropped before polars reads the batch. Raises SourceError naming ``where`` and the column
    for text that is not UTF-8, and everything :func:`normalize_frame` raises.
    """
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    _require_columns(table.column_names, where)
    unknown = set(table.column_names) - set(COLUMN_NAMES)
    if unknown:
        table = table.drop_columns(sorted(unknown))
    table = _utf8_columns(table, where)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    out, report = normalize_frame(frame, where)
    report.unknown_columns |= unknown
    return out, report
