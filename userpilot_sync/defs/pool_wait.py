"""Make a run that waits for its app token's pool slot sleep instead of spinning a core.

Why: every sync job's day step is in the pool ``userpilot_export_<app token>`` (limit 1), and with
``concurrency.pools.op_granularity_run_buffer: 1`` (``deploy/dagster.yaml``) the next run of a
backfill starts while the current one exports and waits *in its step* for the slot. Dagster 1.13's
in-process executor waits in ``ActiveExecution.sleep_til_ready``, which sleeps for
``InstanceConcurrencyContext.interval_to_next_pending_claim_check()``; that method returns
``min([0, *time_until_each_pending_claim_check])`` — never more than 0 — so the waiting run never
sleeps: its main thread loops through ``get_steps_to_execute`` and ``claim`` at 100 % of one core
for as long as the other run holds the slot (measured with py-spy on a 365-day backfill: the
waiting run's process used 86 % of a core for minutes). On a 2-core machine that is the core the
exporting run needs. The same happens to a daily run that waits behind a backfill's run. The
slot itself is still polled on Dagster's schedule (1 s, growing ×1.1 per attempt up to 15 s); only
the sleep between polls is missing. Dagster's own fix (dagster-io/dagster pull request 20367,
"fix pending claim check sleep intervals") was closed unmerged; the code is unchanged in the
newest release.

:func:`apply` replaces that one method, in the processes that load this code location (run
workers, the CLI), by one that returns the time until the next pending claim check (≥ 0 s). It
first checks that the installed Dagster still has the bug (a pending claim 5 s ahead must give
a positive interval) and leaves a fixed Dagster alone. Nothing else of the pool changes: which
run gets the slot, when it is polled, priorities, freeing it.
"""

from __future__ import annotations

import time

#: Marker on the replacement, so :func:`apply` is idempotent.
_FIXED = "_userpilot_sync_sleeps"


def _interval_to_next_pending_claim_check(self) -> float:
    """Seconds until the next pending claim of this run may be retried (≥ 0; 0 without one)."""
    if not self._pending_claims:
        return 0.0
    now = time.time()
    waits = [self._pending_timeouts[key] - now for key in self._pending_claims if key in self._pending_timeouts]
    return max(0.0, min(waits)) if waits else 0.0


setattr(_interval_to_next_pending_claim_check, _FIXED, True)


def busy_waits(cls=None) -> bool:
    """True when ``cls`` (Dagster's ``InstanceConcurrencyContext`` by default) returns no positive
    wait for a claim that may only be retried 5 s from now."""
    if cls is None:
        from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext as cls
    probe = object.__new__(cls)
    probe._pending_claims = {"step"}
    probe._pending_timeouts = {"step": time.time() + 5.0}
    return not cls.interval_to_next_pending_claim_check(probe) > 0


def replace_method(cls, name: str, replacement, marker: str, needed) -> bool:
    """Set ``cls.<name>`` to ``replacement`` (which carries the attribute ``marker``) unless it
    already is, or ``needed(cls)`` is false or fails (a Dagster whose code is not the one replaced).
    Returns True when replaced by this call. Shared by the modules of ``defs/`` that replace one
    method of Dagster's."""
    current = getattr(cls, name, None)
    if current is None or getattr(current, marker, False):
        return False  # a Dagster without the method: nothing to replace
    try:
        if not needed(cls):
            return False
    except Exception:  # pragma: no cover - attributes renamed: not the code this replaces
        return False
    setattr(cls, name, replacement)
    return True


def apply() -> bool:
    """Install the sleeping wait if the installed Dagster busy-waits. Returns True when it was
    installed by this call; False when it already was, or Dagster does not need it (or moved the
    class: then nothing is changed)."""
    try:
        from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
    except ImportError:  # pragma: no cover - a Dagster that reorganised its executor
        return False
    return replace_method(InstanceConcurrencyContext, "interval_to_next_pending_claim_check",
                          _interval_to_next_pending_claim_check, _FIXED, busy_waits)
