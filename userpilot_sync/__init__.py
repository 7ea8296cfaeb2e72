"""userpilot_sync: export Userpilot's raw product-analytics events into your own data lake.

The package is split in two halves:

* a plain-Python core (``config``, ``schema``, ``source``, ``staging``, ``export``,
  ``destination``) that knows nothing about Dagster and can be used and tested alone;
* Dagster wiring (``defs`` and ``definitions``) that turns each configured sync job into
  daily-partitioned assets, IO managers, checks and schedules.
"""

__version__ = "0.1.0"

import os as _os

#: polars' allocator (jemalloc) returns freed memory to the OS at once instead of after ~10 s, so
#: the exporter's peak memory (RSS) follows what it holds (docs/performance.md). Only effective when
#: this package is imported before polars; a value set in the environment wins.
POLARS_ALLOCATOR_ENV = "_RJEM_MALLOC_CONF"
_os.environ.setdefault(POLARS_ALLOCATOR_ENV, "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")
