"""docs/schema.md's generated column reference equals a fresh render of the code's schemas.

Fast: no servers. When the first test fails, run ``make schema-doc`` (``python -m
userpilot_sync.schema.reference``) and commit docs/schema.md.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from userpilot_sync.destination import manifest
from userpilot_sync.documented import feature_tags, snapshots
from userpilot_sync.schema import events, reference, validation
from userpilot_sync.source import lookups

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"


@pytest.fixture(scope="module")
def fresh() -> str:
    return reference.render()


def test_committed_doc_equals_a_fresh_render():
    summary = reference.check(DOC)
    assert summary == "", (
        "docs/schema.md's generated section is stale: run `make schema-doc` "
        f"(python -m userpilot_sync.schema.reference)\n{summary}")
    assert reference.main(["--check", "--path", str(DOC)]) == 0


def test_changed_event_column_description_fails_the_check(monkeypatch, capsys):
    changed = tuple(dataclasses.replace(c, description="Changed in the code, not rendered.")
                    if c.name == "country_code" else c for c in events.EVENT_COLUMNS)
    monkeypatch.setattr(events, "EVENT_COLUMNS", changed)
    summary = reference.check(DOC)
    assert "Changed in the code, not rendered." in summary
    assert reference.main(["--check", "--path", str(DOC)]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "make schema-doc" in err and "country_code" in err


def test_changed_documented_and_lookup_descriptions_fail_the_check(monkeypatch):
    monkeypatch.setitem(snapshots.COLUMN_DOCS[snapshots.USERS], "last_event_at", ("Changed.", "project decision"))
    assert "Changed." in reference.check(DOC)
    monkeypatch.undo()
    monkeypatch.setitem(lookups.LOOKUP_COLUMN_DOCS, "questions", ("Changed too.", "project decision"))
    assert "Changed too." in reference.check(DOC)
    monkeypatch.undo()
    monkeypatch.setitem(manifest.FILE_RECORD_DOCS, "sha256", "Changed as well.")
    assert "Changed as well." in reference.check(DOC)


def test_a_column_without_description_cannot_be_rendered(monkeypatch):
    monkeypatch.delitem(feature_tags.COLUMN_DOCS[feature_tags.BREAKDOWN_FILE], "unique_users")
    with pytest.raises(reference.ReferenceError, match="unique_users.*no description"):
        reference.render()


def test_render_is_deterministic_and_portable(fresh):
    assert reference.render() == fresh
    assert fresh.startswith(reference.BEGIN) and fresh.rstrip("\n").endswith(reference.END)
    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in fresh and str(Path.home()) not in fresh and "/tmp" not in fresh
    assert tempfile.gettempdir() not in fresh  # the suite's temporary folders may live elsewhere (conftest.py)
    today = datetime.now(timezone.utc).date().isoformat()
    assert today not in fresh


def test_every_file_and_check_of_the_code_is_rendered(fresh):
    for event_type in events.EVENT_TYPES:
        assert f"#### `{event_type}`" in fresh
    for name in ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions",
                 *lookups.LOOKUP_KINDS):
        assert f"#### `{name}`" in fresh
    # column order of interaction = the Arrow schema's
    section = fresh.split("#### `interaction`")[1].split("#### ")[0]
    rendered = re.findall(r"^\| \d+ \| `([a-z_]+)` \|", section, flags=re.M)
    assert rendered == events.export_arrow_schema("interaction").names
    for pattern in (validation.COUNTRY_CODE_PATTERN, validation.SOURCE_PATTERN, validation.INTERACTION_NAME_PATTERN):
        assert f"matches `{pattern}`" in fresh
    assert re.search(r"\| `internal_event_id` \| `string` \| no \| unique; length >= 1 \|", fresh)
    assert "custom `at_most_events`" in fresh  # a custom check of the breakdown
    # how each format writes a timestamp, measured with the writers
    assert "`\"2026-03-09T14:05:09.000123Z\"`" in fresh and "timestamp-micros" in fresh


def test_write_keeps_the_prose_around_the_section(tmp_path, fresh):
    doc = tmp_path / "schema.md"
    doc.write_text(f"# Title\n\nprose before\n\n{reference.BEGIN}\nold\n{reference.END}\n\nprose after\n")
    assert reference.main(["--check", "--path", str(doc)]) == 1
    assert reference.write(doc) is True
    text = doc.read_text()
    assert text == f"# Title\n\nprose before\n\n{fresh}\nprose after\n"
    assert reference.write(doc) is False and reference.check(doc) == ""
    # without markers the section is appended; a BEGIN without END is refused
    bare = tmp_path / "bare.md"
    bare.write_text("# Only prose\n")
    reference.write(bare)
    assert bare.read_text() == f"# Only prose\n\n{fresh}"
    broken = tmp_path / "broken.md"
    broken.write_text(f"x\n{reference.BEGIN}\nno end\n")
    with pytest.raises(reference.ReferenceError, match="no"):
        reference.write(broken)
