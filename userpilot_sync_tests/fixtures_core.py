"""Core fixtures: a sync job built from the demo YAML, temporary folders, a fixed clock."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from userpilot_sync.config.model import SyncJob

#: A fixed "now" used by tests: the partition DAY is inside the 365-day window.
NOW = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc)
DAY = date(2026, 3, 9)
PARTITION = DAY.isoformat()


def make_job(tmp_path: Path, **overrides) -> SyncJob:
    """A demo sync job writing to ``tmp_path/exports`` (small volume, fast)."""
    data = {
        "name": "demo",
        "sync_id": "10001",
        "title": "Demo",
        "app_token": "NX-demo0001",
        "source": {"kind": "demo", "events_per_day": 3000, "seed": 7},
        "destination": {"kind": "local", "path": str(tmp_path / "exports"), "prefix": "userpilot_events"},
    }
    data.update(overrides)
    return SyncJob.model_validate(data)


@pytest.fixture
def demo_job(tmp_path: Path) -> SyncJob:
    return make_job(tmp_path)


@pytest.fixture
def staging_root(tmp_path: Path) -> Path:
    return tmp_path / "staging"
