"""Fixtures for the Bulk Data Export API source: the emulator (real loopback HTTP), a fake clock,
sync jobs whose source is the emulator, and helpers shared by the API tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.emulator import ExportApiEmulator
from userpilot_sync.source.export_api import ExportApiSource
from userpilot_sync_tests.fixtures_core import PARTITION, make_job

#: The API key the emulator accepts; distinctive, so a leak is easy to find in any text.
API_KEY = "upk_live_TESTKEY_7f3c9a1e5b2d4c6e8a0b"
API_KEY_ENV = "USERPILOT_API_KEY_TEST"
APP_TOKEN = "NX-demo0001"
#: Small days keep the suite fast; the demo job of the comparison uses the same volume and seed.
EVENTS_PER_DAY = 600
SEED = 7


class FakeClock:
    """Monotonic seconds that only move when the client sleeps; records every sleep."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def demo_job_for_api_test(tmp_path: Path, **overrides) -> SyncJob:
    """The demo sync job with the emulator's volume/seed, writing to ``tmp_path/exports-demo``."""
    data = {
        "source": {"kind": "demo", "events_per_day": EVENTS_PER_DAY, "seed": SEED},
        "destination": {"kind": "local", "path": str(tmp_path / "exports-demo"), "prefix": "userpilot_events"},
    }
    data.update(overrides)
    return make_job(tmp_path, **data)


def make_api_job(tmp_path: Path, emulator: ExportApiEmulator, source: dict | None = None, **overrides) -> SyncJob:
    """A sync job reading from ``emulator`` (tiny poll/backoff intervals), writing to ``exports-api``."""
    src = {
        "kind": "export_api",
        "base_url": emulator.base_url,
        "api_key_env": API_KEY_ENV,
        "chunk_format": "parquet",
        "poll_interval_s": 0.01,
        "poll_backoff": 2.0,
        "poll_max_interval_s": 0.05,
        "max_wait_s": 5.0,
        "conflict_wait_s": 0.5,
        "max_retries": 4,
        "retry_base_s": 0.01,
        "retry_max_s": 0.1,
        "request_timeout_s": 10.0,
    }
    src.update(source or {})
    data = {
        "source": src,
        "destination": {"kind": "local", "path": str(tmp_path / "exports-api"), "prefix": "userpilot_events"},
    }
    data.update(overrides)
    return make_job(tmp_path, **data)


def api_source(job: SyncJob, clock: FakeClock, **kwargs) -> ExportApiSource:
    """The job's ExportApiSource on the fake clock, with a fixed jitter of 0.5."""
    return ExportApiSource.from_config(job, sleep=clock.sleep, clock=clock.monotonic, jitter=lambda: 0.5, **kwargs)


def manifest_file(job: SyncJob, partition: str = PARTITION) -> Path:
    """Local path of a partition's manifest in a job's local destination."""
    layout = layout_for(job)
    return Path(job.destination.path) / layout.key(layout.manifest_path(partition))


def read_manifest(job: SyncJob, partition: str = PARTITION) -> dict:
    return json.loads(manifest_file(job, partition).read_text())


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[ExportApiEmulator]:
    """A running emulator serving the demo app (APP_TOKEN, EVENTS_PER_DAY, SEED), 3 chunks/job."""
    emu = ExportApiEmulator(api_key=API_KEY, app_token=APP_TOKEN, events_per_day=EVENTS_PER_DAY, seed=SEED,
                            chunks=3, polls_to_complete=2, page_size=4, work_dir=tmp_path / "emulator")
    with emu:
        yield emu


@pytest.fixture
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Puts API_KEY into the environment variable API_KEY_ENV; returns the variable's name."""
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    return API_KEY_ENV


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
