"""The process-wide library settings ``userpilot_sync/__init__.py`` makes (docs/configuration.md):
Arrow's jemalloc pool and polars' in-memory engine for lazy queries, whichever of pyarrow, polars
and this package is imported first, and never over a value the user set in the environment.

Each case runs in a fresh interpreter: these settings are read once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
for name in sys.argv[1].split(","):
    __import__(name)
import polars as pl
import pyarrow as pa
from polars.lazyframe.engine_config import _select_engine
print(json.dumps({
    "pool": pa.default_memory_pool().backend_name,
    "engine": type(_select_engine("auto")).__name__,
    "pool_env": os.environ.get("ARROW_DEFAULT_MEMORY_POOL"),
}))
"""


def _probe(order: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "POLARS_ENGINE_AFFINITY")}
    out = subprocess.run([sys.executable, "-c", PROBE, order], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["userpilot_sync", "pyarrow,polars,userpilot_sync", "dagster_aws,userpilot_sync"])
def test_jemalloc_pool_and_in_memory_engine_whatever_is_imported_first(order):
    got = _probe(order)
    assert got["pool"] == "jemalloc", got
    assert got["engine"] == "InMemoryEngine", got
    # child processes (run workers, the benchmark's children) inherit the choice
    assert got["pool_env"] == "jemalloc"


def test_values_set_in_the_environment_win():
    got = _probe("pyarrow,userpilot_sync", ARROW_DEFAULT_MEMORY_POOL="system", POLARS_ENGINE_AFFINITY="streaming")
    assert got["pool"] == "system", got
    assert got["engine"] == "StreamingEngine", got


def test_lazy_queries_over_staged_files_ask_for_streaming_themselves():
    """The package's own lazy queries (documented files over staged/prepared Arrow files) keep
    polars' streaming engine whatever the process default is."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "userpilot_sync"
    for path in root.rglob("*.py"):
        text = path.read_text()
        if "scan_ipc(" in text or ".lazy()" in text:
            assert ".collect()" not in text, f"{path.relative_to(root.parent)}: pass engine=... to collect()"
