"""userpilot_sync: export Userpilot's raw product-analytics events into your own data lake.

The package is split in two halves:

* a plain-Python core (``config``, ``schema``, ``source``, ``staging``, ``export``,
  ``destination``) that knows nothing about Dagster and can be used and tested alone;
* Dagster wiring (``defs`` and ``definitions``) that turns each configured sync job into
  daily-partitioned assets, IO managers, checks and schedules.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

#: polars' allocator (jemalloc) returns freed memory to the OS at once instead of after ~10 s, so
#: the exporter's peak memory (RSS) follows what it holds (docs/performance.md). Only effective when
#: this package is imported before polars; a value set in the environment wins.
POLARS_ALLOCATOR_ENV = "_RJEM_MALLOC_CONF"
_os.environ.setdefault(POLARS_ALLOCATOR_ENV, "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")

#: polars' default engine for lazy queries ("auto") is its streaming engine, which costs ~1-2 ms of
#: set-up per ``collect()``. pandera's polars backend collects one small query per column and check
#: (~50 per validated group), so validating a day of 20,000 events spent most of its time setting
#: up streaming queries: "in-memory" makes each validation 2.5-4x cheaper (docs/performance.md).
#: Eager polars operations always run in memory; this package's own lazy queries pass
#: ``engine="streaming"`` explicitly. It applies to every lazy query of the process (and of the
#: processes it starts). An engine set in the environment, or set in code before this package is
#: imported (``pl.Config.set_engine_affinity``), wins.
POLARS_ENGINE_ENV = "POLARS_ENGINE_AFFINITY"


def _default_polars_engine() -> None:
    if POLARS_ENGINE_ENV in _os.environ:
        return
    polars = _sys.modules.get("polars")
    if polars is not None:  # imported before this package: an engine object chosen in code stays
        try:
            from polars.lazyframe.engine_config import get_engine_affinity_override
        except ImportError:  # another polars layout: nothing to respect
            pass
        else:
            if get_engine_affinity_override() is not None:
                return
    _os.environ[POLARS_ENGINE_ENV] = "in-memory"
    if polars is not None:  # it read the environment already
        polars.Config.set_engine_affinity("in-memory")


_default_polars_engine()

#: Arrow's memory pool: jemalloc (Arrow's default is mimalloc), which returns freed memory to the OS
#: at once. The same 5M-event export peaked at 567-598 MB with it against 704-705 MB with mimalloc
#: and 916-932 MB with the system allocator, at the same CPU (docs/performance.md). Linux only (its
#: pyarrow wheels ship jemalloc; elsewhere Arrow would warn about an unknown pool on every start).
#: A value set in the environment wins. Arrow reads the variable once: if pyarrow was imported
#: before this package, only pyarrow's default pool (what its Python API allocates from) changes.
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
if ARROW_POOL_ENV not in _os.environ and _sys.platform.startswith("linux"):
    _os.environ[ARROW_POOL_ENV] = "jemalloc"
    if "pyarrow" in _sys.modules:
        try:
            _sys.modules["pyarrow"].set_memory_pool(_sys.modules["pyarrow"].jemalloc_memory_pool())
        except NotImplementedError:  # a pyarrow built without jemalloc keeps its default pool
            pass

#: Arrow's jemalloc keeps freed pages for ~1 s before returning them to the OS (its built-in
#: ``dirty_decay_ms:1000,muzzy_decay_ms:1000``, read from ``JE_ARROW_MALLOC_CONF`` on top). Pages
#: freed by one source group or prepared slice and not yet returned count in the peak memory: the
#: 10M-event export peaked at 589-624 MB with Arrow's 1 s against 558-568 MB with 100 ms, and the
#: 5M one at 594-596 against 538-540 MB, for 2-5 % more time (docs/performance.md). A value set
#: in the environment wins.
ARROW_JEMALLOC_ENV = "JE_ARROW_MALLOC_CONF"
ARROW_DECAY_MS = 100
if ARROW_JEMALLOC_ENV not in _os.environ and _sys.platform.startswith("linux"):
    _os.environ[ARROW_JEMALLOC_ENV] = f"dirty_decay_ms:{ARROW_DECAY_MS},muzzy_decay_ms:{ARROW_DECAY_MS}"
    # pyarrow imported first: its jemalloc may have read the environment already. Arrow's setter
    # applies to arenas created from now on (Arrow's own docs); arenas made before keep Arrow's 1 s.
    if "pyarrow" in _sys.modules:
        try:
            _sys.modules["pyarrow"].jemalloc_set_decay_ms(ARROW_DECAY_MS)
        except NotImplementedError:  # a pyarrow built without jemalloc
            pass
