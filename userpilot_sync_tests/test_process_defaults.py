"""The process-wide library settings ``userpilot_sync/__init__.py`` makes (docs/configuration.md):
Arrow's jemalloc pool (returning freed memory within 100 ms) and polars' in-memory engine for lazy queries, whether pyarrow and polars
are imported before or after this package, and never over a choice the user made.

Each case runs in a fresh interpreter: these settings are read once per process. Which engine ran
is observed, not looked up: with ``POLARS_VERBOSE`` polars' streaming engine logs ``polars-stream``
lines on stderr, the in-memory engine does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

PROBE = """
import json, os, sys
before, after = sys.argv[1], sys.argv[2]
for name in filter(None, before.split(",")):
    __import__(name)
decays = []
if "pyarrow" in sys.modules:  # record what the package asks of Arrow's jemalloc when imported after it
    _set_decay = sys.modules["pyarrow"].jemalloc_set_decay_ms
    sys.modules["pyarrow"].jemalloc_set_decay_ms = lambda ms: (decays.append(ms), _set_decay(ms))
if after == "engine-object":
    import polars as pl
    pl.Config.set_engine_affinity(pl.StreamingEngine())
import userpilot_sync
import polars as pl
import pyarrow as pa
pl.Config.set_verbose(True)
pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum()).collect()
pl.Config.set_verbose(False)
print(json.dumps({"pool": pa.default_memory_pool().backend_name,
                  "pool_env": os.environ.get("ARROW_DEFAULT_MEMORY_POOL"),
                  "jemalloc_env": os.environ.get("JE_ARROW_MALLOC_CONF"), "decays": decays}))
"""

jemalloc = pytest.mark.skipif("jemalloc" not in pa.supported_memory_backends() or not sys.platform.startswith("linux"),
                              reason="the package picks Arrow's jemalloc pool on Linux builds that have it")


def _probe(before: str, after: str = "", **env: str) -> tuple[dict, bool]:
    """(what the probe printed, whether polars' streaming engine ran its query)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ARROW_DEFAULT_MEMORY_POOL", "JE_ARROW_MALLOC_CONF", "POLARS_ENGINE_AFFINITY",
                          "POLARS_VERBOSE")}
    out = subprocess.run([sys.executable, "-c", PROBE, before, after], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]), "polars-stream" in out.stderr


@pytest.mark.parametrize("before", ["", "pyarrow,polars"], ids=["package first", "libraries first"])
def test_lazy_queries_run_in_memory_whatever_is_imported_first(before):
    _, streamed = _probe(before)
    assert not streamed


@jemalloc
@pytest.mark.parametrize("before", ["", "pyarrow,polars"], ids=["package first", "libraries first"])
def test_arrow_pool_is_jemalloc_whatever_is_imported_first(before):
    got, _ = _probe(before)
    assert got["pool"] == "jemalloc", got
    # processes started from this one (run workers, the benchmark's children) get the same pool
    assert got["pool_env"] == "jemalloc"


@jemalloc
@pytest.mark.parametrize("before", ["", "pyarrow,polars"], ids=["package first", "libraries first"])
def test_arrow_jemalloc_returns_freed_memory_within_100_ms_whatever_is_imported_first(before):
    got, _ = _probe(before)
    # read by Arrow's jemalloc when it starts, in this process and the processes it starts
    assert got["jemalloc_env"] == "dirty_decay_ms:100,muzzy_decay_ms:100", got
    # pyarrow imported first: its jemalloc may have started already, so the package also asks it
    assert got["decays"] == ([100] if before else []), got
    mine, _ = _probe("pyarrow", JE_ARROW_MALLOC_CONF="dirty_decay_ms:5000")
    assert mine["jemalloc_env"] == "dirty_decay_ms:5000" and mine["decays"] == [], mine


def test_the_probe_sees_the_streaming_engine_when_it_runs():
    """Without this package's default (a value set in the environment) polars streams: the probe can
    tell the two engines apart."""
    _, streamed = _probe("", POLARS_ENGINE_AFFINITY="streaming")
    assert streamed


def test_choices_of_the_user_win():
    got, streamed = _probe("pyarrow", ARROW_DEFAULT_MEMORY_POOL="system", POLARS_ENGINE_AFFINITY="streaming")
    assert got["pool"] == "system", got
    assert streamed
    # an engine chosen in code before the package is imported stays too
    _, streamed = _probe("polars", "engine-object")
    assert streamed


def test_the_package_lazy_queries_name_their_engine():
    """A lint: the package's own lazy queries (the documented files' scans of staged and prepared
    files, the snapshot merges) say which engine runs them, so the process default above does not
    change them."""
    root = Path(__file__).resolve().parent.parent / "userpilot_sync"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for bare in (".collect()", "collect_all("):
            assert bare not in text, f"{path.relative_to(root.parent)}: pass engine=... to the lazy query's collect"
