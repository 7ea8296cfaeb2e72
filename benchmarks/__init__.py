"""Reproducible benchmarks of userpilot_sync (``make bench`` = ``python -m benchmarks.run``).

Not part of ``make test``: nothing here asserts timings. See docs/performance.md.
"""
