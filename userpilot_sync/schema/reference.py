"""The generated column reference in docs/schema.md, rendered from the code's schemas.

``python -m userpilot_sync.schema.reference`` (``make schema-doc``) rewrites the part of
docs/schema.md between :data:`BEGIN` and :data:`END` (appended at the end when the markers are
missing); the hand-written prose around it is kept. ``--check`` writes nothing and exits 1 with a
diff summary when the committed section differs from a fresh render (0 when equal).

What is rendered, per file the project writes: columns in file order, Arrow type, nullability,
the pandera checks (allowed values, ranges, regexes, uniqueness, table-level checks), the column's
description and the source of its facts. The descriptions live in the code, one place each:

* event exports: :data:`userpilot_sync.schema.events.EVENT_COLUMNS` and ``INTERACTION_COLUMNS``
  (``Column.description``, ``Column.source``); checks from
  :func:`userpilot_sync.schema.validation.export_schema`;
* ``all_users``/``all_companies``: ``documented.snapshots.COLUMN_DOCS``;
* ``feature_tags_breakdown``/``feature_tags_definitions``: ``documented.feature_tags.COLUMN_DOCS``;
* lookup files: ``source.lookups.LOOKUP_COLUMN_DOCS``;
* the manifest's ``files`` entries: ``destination.manifest.FILE_RECORD_DOCS``.

How each export format writes each Arrow type is measured, not restated: one sample value per
type is written with the project's own writers (``destination.formats.write_parts``) and read
back. The render is deterministic: no dates, no machine paths, fixed ordering. A column without a
description, or a pandera schema whose columns differ from the Arrow schema's, raises
:class:`ReferenceError` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa

BEGIN = "<!-- BEGIN GENERATED: python -m userpilot_sync.schema.reference (make schema-doc); do not edit by hand -->"
END = "<!-- END GENERATED -->"
#: docs/schema.md of this checkout (the command's default target).
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "schema.md"

# Stand-ins for the values a real validation binds (shown as words, not as code values).
_APP_TOKEN = "<the sync job's app_token>"
_DAY_START = "<the partition's day, 00:00 UTC>"
_DAY_END = "<the next day, 00:00 UTC>"
_SENTINELS = {_APP_TOKEN, _DAY_START, _DAY_END}


class ReferenceError(Exception):
    """The schemas in the code cannot be rendered consistently (a column without a description,
    pandera and Arrow columns that differ)."""


@dataclass(frozen=True)
class ColumnRef:
    """One rendered column: name, Arrow type text, nullability (pandera's, and the Arrow field's),
    checks (rendered text), description and source."""

    name: str
    arrow_type: str
    nullable: bool
    arrow_nullable: bool
    checks: tuple[str, ...]
    description: str
    source: str


@dataclass(frozen=True)
class TableRef:
    """One rendered file: title, a sentence about it, its columns and table-level checks."""

    title: str
    intro: str
    columns: tuple[ColumnRef, ...]
    table_checks: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ checks
def _value(value: object) -> str:
    if isinstance(value, str) and value in _SENTINELS:
        return value.strip("<>")
    if value == "":
        return '`""` (empty)'
    return f"`{value}`"


def render_check(check) -> str:
    """One pandera check as short text (``matches `^[A-Z]{2}$```, ``>= `0```, ...)."""
    name, stats = check.name, dict(check.statistics or {})
    if name == "equal_to":
        return f"= {_value(stats['value'])}"
    if name == "not_equal_to":
        return f"!= {_value(stats['value'])}"
    if name == "greater_than_or_equal_to":
        return f">= {_value(stats['min_value'])}"
    if name == "greater_than":
        return f"> {_value(stats['min_value'])}"
    if name == "less_than":
        return f"< {_value(stats['max_value'])}"
    if name == "less_than_or_equal_to":
        return f"<= {_value(stats['max_value'])}"
    if name == "in_range":
        return f"in [{_value(stats['min_value'])}, {_value(stats['max_value'])}]"
    if name == "isin":
        return "one of " + ", ".join(_value(v) for v in sorted(stats["allowed_values"], key=str))
    if name == "notin":
        return "none of " + ", ".join(_value(v) for v in sorted(stats["forbidden_values"], key=str))
    if name == "str_matches":
        return f"matches `{stats['pattern']}`"
    if name == "str_contains":
        return f"contains `{stats['pattern']}`"
    if name == "str_startswith":
        return f"starts with `{stats['string']}`"
    if name == "str_endswith":
        return f"ends with `{stats['string']}`"
    if name == "str_length":
        if stats.get("exact_value") is not None:
            return f"length = {stats['exact_value']}"
        parts = []
        if stats.get("min_value") is not None:
            parts.append(f"length >= {stats['min_value']}")
        if stats.get("max_value") is not None:
            parts.append(f"length <= {stats['max_value']}")
        return ", ".join(parts) or "str_length"
    # a custom check: its name (when it has one) and the error it reports
    label = f"custom `{name}`" if name and not name.startswith("<") else "custom"
    return f"{label} (error: `{check.error}`)" if check.error else label


def _column_refs(arrow_schema: pa.Schema, pandera_schema, docs: dict[str, tuple[str, str]], where: str,
                 extra_checks: dict[str, Sequence[str]] | None = None) -> tuple[ColumnRef, ...]:
    """Join an Arrow schema (order, types), its pandera schema (nullability, checks) and the
    descriptions. Raises ReferenceError when they disagree on the columns or a description is
    missing."""
    names = list(arrow_schema.names)
    checked = list(pandera_schema.columns) if pandera_schema is not None else names
    if checked != names:
        raise ReferenceError(f"{where}: pandera columns {checked} differ from the Arrow schema's {names}")
    refs = []
    for field in arrow_schema:
        if field.name not in docs or not docs[field.name][0].strip():
            raise ReferenceError(f"{where}: column {field.name!r} has no description in the code")
        description, source = docs[field.name]
        checks: list[str] = []
        nullable = field.nullable
        if pandera_schema is not None:
            col = pandera_schema.columns[field.name]
            nullable = bool(col.nullable)
            if col.unique:
                checks.append("unique")
            checks.extend(render_check(c) for c in col.checks)
        checks.extend((extra_checks or {}).get(field.name, ()))
        refs.append(ColumnRef(field.name, str(field.type), nullable, field.nullable, tuple(checks),
                              description, source))
    return tuple(refs)


def _table_checks(pandera_schema) -> tuple[str, ...]:
    return tuple(render_check(c) for c in pandera_schema.checks)


# ------------------------------------------------------------------------------ the files
def event_tables() -> list[TableRef]:
    """One table per event type export (all columns, none excluded), in EVENT_TYPES order."""
    from userpilot_sync.schema import events, validation

    known = {
        "source": events.KNOWN_SOURCES,
        "interaction_status": events.KNOWN_INTERACTION_STATUSES,
    }
    out = []
    for event_type in events.EVENT_TYPES:
        columns = events.export_columns(event_type)
        docs = {c.name: (c.description, c.source) for c in columns}
        schema = validation.export_schema(event_type, (), _APP_TOKEN, _DAY_START, _DAY_END)  # type: ignore[arg-type]
        extra = {name: [f"warning `known_values`: values other than {', '.join(values)} are reported"]
                 for name, values in known.items()}
        refs = _column_refs(events.export_arrow_schema(event_type), schema, docs, f"export {event_type}", extra)
        out.append(TableRef(
            event_type,
            f"`{event_type}.<ext>` (one per day; parts when split). pandera schema `{schema.name}`: strict, "
            f"ordered. Columns listed in `filters.exclude_columns` are absent.",
            refs))
    return out


def documented_tables() -> list[TableRef]:
    """``all_users``, ``all_companies``, ``feature_tags_breakdown``, ``feature_tags_definitions``."""
    from userpilot_sync.documented import feature_tags, snapshots

    out = []
    for name in (snapshots.USERS, snapshots.COMPANIES):
        pandera_schema = snapshots._pandera_schema(name, True)
        refs = _column_refs(snapshots.snapshot_schema(name, True), pandera_schema, snapshots.COLUMN_DOCS[name],
                            f"documented file {name}")
        out.append(TableRef(
            name,
            f"`{name}.<ext>`, one row per {snapshots.ID_COLUMN[name].removesuffix('_id')} identified by "
            f"`{snapshots.IDENTIFY_EVENT_TYPE[name]}` events, sorted by `{snapshots.ID_COLUMN[name]}`. "
            f"pandera schema `{pandera_schema.name}`: strict, ordered; besides, no time after the end of the day.",
            refs, _table_checks(pandera_schema)))
    for name, arrow_schema, pandera_schema in (
        (feature_tags.BREAKDOWN_FILE, feature_tags.BREAKDOWN_SCHEMA, feature_tags.BREAKDOWN_PANDERA),
        (feature_tags.DEFINITIONS_FILE, feature_tags.DEFINITIONS_SCHEMA, feature_tags.DEFINITIONS_PANDERA),
    ):
        refs = _column_refs(arrow_schema, pandera_schema, feature_tags.COLUMN_DOCS[name], f"documented file {name}")
        out.append(TableRef(name, f"`{name}.<ext>`. pandera schema `{pandera_schema.name}`: strict, ordered.",
                            refs, _table_checks(pandera_schema)))
    return out


def lookup_tables() -> list[TableRef]:
    """One table per lookup kind (``lookups/<kind>.parquet``), in LOOKUP_KINDS order."""
    from userpilot_sync.source import lookups

    out = []
    for kind in lookups.LOOKUP_KINDS:
        pandera_schema = lookups.lookup_schema(kind)
        refs = _column_refs(lookups.lookup_arrow_schema(kind), pandera_schema, lookups.LOOKUP_COLUMN_DOCS,
                            f"lookup {kind}")
        out.append(TableRef(kind, f"`lookups/{kind}.parquet`. pandera schema `{pandera_schema.name}`: strict, "
                                  f"ordered.", refs))
    return out


def file_record_rows() -> list[tuple[str, str, str, str]]:
    """The manifest's ``files`` entries: (field, JSON type, when null, description), in field order."""
    from userpilot_sync.destination import manifest

    json_types = {"str": "string", "int": "number"}
    probe = manifest.FileRecord(**{f.name: None for f in dataclasses.fields(manifest.FileRecord)}).to_dict()
    rows = []
    for field in dataclasses.fields(manifest.FileRecord):
        description = manifest.FILE_RECORD_DOCS.get(field.name, "").strip()
        if not description:
            raise ReferenceError(f"manifest files entry: field {field.name!r} has no description in the code")
        annotation = str(field.type).replace(" ", "")
        optional = annotation.endswith("|None")
        base = json_types.get(annotation.removesuffix("|None"), annotation)
        null = ("absent when not set" if field.name not in probe else "null when not set") if optional else "never"
        rows.append((field.name, base, null, description))
    return rows


# ------------------------------------------------------------------------------ formats
_SAMPLE_TIME = datetime(2026, 3, 9, 14, 5, 9, 123, tzinfo=timezone.utc)


def _sample(arrow_type: pa.DataType, json_text: bool):
    if json_text:
        return '{"plan":"pro"}'
    if pa.types.is_timestamp(arrow_type):
        return _SAMPLE_TIME
    if pa.types.is_integer(arrow_type):
        return 7
    return "web-client"


def format_rows(kinds: Iterable[tuple[str, bool]]) -> list[tuple[str, ...]]:
    """How each format writes each (Arrow type, JSON-text) kind: written with the project's
    writers and read back. Returns rows (Arrow type, Parquet, Avro, NDJSON, CSV)."""
    import fastavro
    import pyarrow.parquet as pq

    from userpilot_sync.config.model import FormatSpec
    from userpilot_sync.destination import formats

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (type_text, json_text) in enumerate(kinds):
            arrow_type = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64()}.get(type_text)
            if arrow_type is None:
                arrow_type = pa.timestamp("us", tz="UTC") if type_text == "timestamp[us, tz=UTC]" else None
            if arrow_type is None:
                raise ReferenceError(f"no sample value for Arrow type {type_text}")
            name = formats.JSON_TEXT_COLUMNS[0] if json_text else "value"
            cells = [f"`{type_text}`" + (" (JSON object text)" if json_text else "")]
            written = {}
            for fmt in ("parquet", "avro", "ndjson", "csv"):
                schema = pa.schema([pa.field(name, arrow_type, nullable=False),
                                    pa.field("maybe", arrow_type, nullable=True)])
                table = pa.table({name: pa.array([_sample(arrow_type, json_text)], arrow_type),
                                  "maybe": pa.array([None], arrow_type)}, schema=schema)
                work = Path(tmp) / f"{i}-{fmt}"
                work.mkdir()
                parts = formats.write_parts(table.to_batches(), schema, FormatSpec(format=fmt), work, "sample")
                written[fmt] = parts[0].path
            meta = pq.read_metadata(written["parquet"]).schema.column(0)
            logical = json.loads(meta.logical_type.to_json()) if meta.logical_type.type != "NONE" else {}
            detail = ", ".join(f"{k}={v}" for k, v in logical.items() if k in ("isAdjustedToUTC", "timeUnit"))
            cells.append(f"{meta.physical_type}" + (f" / {logical['Type']}" if logical else "")
                         + (f" ({detail})" if detail else ""))
            with open(written["avro"], "rb") as fh:
                fields = fastavro.reader(fh).writer_schema["fields"]
            cells.append(f"`{json.dumps(fields[0]['type'], separators=(',', ':'))}`; nullable: "
                         f"`{json.dumps(fields[1]['type'], separators=(',', ':'))}`")
            line = json.loads(written["ndjson"].read_text(encoding="utf-8").splitlines()[0])
            cells.append(f"`{json.dumps(line[name], separators=(',', ':'))}`; null: "
                         f"`{json.dumps(line['maybe'])}`")
            csv_row = written["csv"].read_text(encoding="utf-8").splitlines()[1]
            value, _, missing = csv_row.rpartition(",")
            cells.append(f"`{value}`; null: " + (f"`{missing}`" if missing else "empty field"))
            rows.append(tuple(cells))
    return rows


# ------------------------------------------------------------------------------ markdown
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _nullable_text(col: ColumnRef) -> str:
    text = "yes" if col.nullable else "no"
    if col.nullable != col.arrow_nullable:
        text += f" (Arrow field: {'nullable' if col.arrow_nullable else 'not null'})"
    return text


def _table_markdown(table: TableRef, level: str = "####") -> list[str]:
    lines = [f"{level} `{table.title}`", "", table.intro, "",
             "| # | column | Arrow type | nullable | checks | description | source |",
             "|---|---|---|---|---|---|---|"]
    for i, col in enumerate(table.columns, 1):
        checks = "; ".join(col.checks) if col.checks else ""
        lines.append(f"| {i} | `{col.name}` | `{col.arrow_type}` | {_nullable_text(col)} | {_cell(checks)} | "
                     f"{_cell(col.description)} | {_cell(col.source)} |")
    if table.table_checks:
        lines += ["", "Table checks: " + "; ".join(table.table_checks) + "."]
    lines.append("")
    return lines


def render() -> str:
    """The generated section, markers included, ending with a newline. Deterministic.

    Raises ReferenceError when the schemas cannot be rendered consistently.
    """
    from userpilot_sync.schema import events

    event_refs = event_tables()
    documented = documented_tables()
    lookups = lookup_tables()
    from userpilot_sync.destination.formats import JSON_TEXT_COLUMNS

    kinds = sorted({(c.arrow_type, c.name in JSON_TEXT_COLUMNS)
                    for t in event_refs + documented for c in t.columns})
    lines = [
        BEGIN,
        "",
        "*Rendered from the schemas in the code by `python -m userpilot_sync.schema.reference` (`make "
        "schema-doc`). Edit the descriptions in the code (`schema/events.py`, `documented/snapshots.py`, "
        "`documented/feature_tags.py`, `source/lookups.py`, `destination/manifest.py`), never here; a test "
        "fails when this section differs from a fresh render.*",
        "",
        f"Schema version (`schema_version` in the manifest): {events.SCHEMA_VERSION}. Nullable \"yes\" "
        "means nulls pass validation; \"checks\" are the pandera (polars) checks every file passes before "
        "anything of its day is uploaded (a failure fails the day), plus the `known_values` warning asset "
        "check (reports unknown values, never rejects them).",
        "",
        "### Types per format",
        "",
        "Written with the project's writers and read back (one sample value; the second value of each cell "
        "is how a null is written). Parquet and Avro files carry the Arrow types; NDJSON and CSV are text.",
        "",
        "| Arrow type | Parquet (physical / logical) | Avro | NDJSON | CSV |",
        "|---|---|---|---|---|",
    ]
    for row in format_rows(kinds):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines += ["", "### Event exports", "",
              "One table per event type; every event type has the same columns, `interaction` adds three "
              "parsed ones.", ""]
    for table in event_refs:
        lines += _table_markdown(table)
    lines += ["### Userpilot's documented files", "",
              "Written in every format of the sync job. `track_feature_<ID>` and `track_labeled_<ID>` "
              "have the columns and checks of the `track_feature` and `track` exports above.", ""]
    for table in documented:
        lines += _table_markdown(table)
    lines += ["### Lookup files", "",
              "Parquet (zstd) only, at `<sync folder>/lookups/<kind>.parquet`, one row per definition.", ""]
    for table in lookups:
        lines += _table_markdown(table)
    lines += ["### Manifest `files` entries", "",
              "Each entry of a manifest's `files` list (`destination/manifest.py: FileRecord`).", "",
              "| # | field | JSON type | null | description |", "|---|---|---|---|---|"]
    for i, (name, json_type, null, description) in enumerate(file_record_rows(), 1):
        lines.append(f"| {i} | `{name}` | {json_type} | {null} | {_cell(description)} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the document
def splice(document: str, section: str) -> str:
    """``document`` with its generated section replaced by ``section`` (appended after a blank
    line when the markers are missing). Raises ReferenceError for a BEGIN without END."""
    start = document.find(BEGIN)
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section
    end = document.find(END, start)
    if end < 0:
        raise ReferenceError(f"the document has {BEGIN!r} but no {END!r} after it")
    tail = document[end + len(END):]
    return document[:start] + section.rstrip("\n") + (tail if tail else "\n")


def diff_summary(committed: str, fresh: str, context_lines: int = 40) -> str:
    """A short unified diff (committed -> fresh render); "" when equal."""
    if committed == fresh:
        return ""
    diff = list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(), "committed", "fresh render",
                                     n=0, lineterm=""))
    changed = sum(1 for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---")))
    shown = diff[:context_lines]
    more = f"\n... {len(diff) - len(shown)} more diff lines" if len(diff) > len(shown) else ""
    return f"{changed} line(s) differ:\n" + "\n".join(shown) + more


def check(path: Path = DEFAULT_PATH) -> str:
    """The diff summary between ``path`` and a fresh render ("" when up to date; a missing file or
    missing markers count as a difference)."""
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    return diff_summary(committed, splice(committed, render()))


def write(path: Path = DEFAULT_PATH) -> bool:
    """Render into ``path`` (creating it when missing); True when the file changed."""
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    fresh = splice(committed, render())
    if fresh == committed:
        return False
    path.write_text(fresh, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the section (exit 0), or ``--check`` (exit 1 with a diff summary when stale)."""
    parser = argparse.ArgumentParser(prog="python -m userpilot_sync.schema.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the document is stale")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the document (default: docs/schema.md)")
    args = parser.parse_args(argv)
    if args.check:
        summary = check(args.path)
        if summary:
            print(f"{args.path.name} is stale: run `python -m userpilot_sync.schema.reference` "
                  f"(make schema-doc).\n{summary}", file=sys.stderr)
            return 1
        print(f"{args.path.name} is up to date")
        return 0
    changed = write(args.path)
    print(f"{args.path.name} {'written' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
