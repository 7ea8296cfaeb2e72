"""userpilot_sync: export Userpilot's raw product-analytics events into your own data lake.

The package is split in two halves:

* a plain-Python core (``config``, ``schema``, ``source``, ``staging``, ``export``,
  ``destination``) that knows nothing about Dagster and can be used and tested alone;
* Dagster wiring (``defs`` and ``definitions``) that turns each configured sync job into
  daily-partitioned assets, IO managers, checks and schedules.
"""

__version__ = "0.1.0"
