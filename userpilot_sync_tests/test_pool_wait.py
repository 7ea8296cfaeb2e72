"""A run waiting for its app token's pool slot sleeps (userpilot_sync/defs/pool_wait.py).

Dagster 1.13's in-process executor never sleeps while a step waits for a pool slot; with the
project's code loaded it does, and it still takes the slot once it is free.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

import userpilot_sync.defs  # noqa: F401  (applies the fix, as loading the code location does)
from userpilot_sync.defs import pool_wait

POOL = "userpilot_export_NX_pooltest"


def _context(pending: dict[str, float]) -> InstanceConcurrencyContext:
    probe = object.__new__(InstanceConcurrencyContext)
    probe._pending_claims = set(pending)
    probe._pending_timeouts = dict(pending)
    return probe


def test_the_fix_is_installed_and_idempotent():
    assert not pool_wait.busy_waits()
    assert pool_wait.apply() is False  # already installed by importing userpilot_sync.defs


def test_the_interval_is_the_time_to_the_next_pending_claim_check():
    now = time.time()
    assert 4.5 < _context({"a": now + 5.0, "b": now + 9.0}).interval_to_next_pending_claim_check() <= 5.0
    assert _context({"a": now - 3.0}).interval_to_next_pending_claim_check() == 0.0  # overdue: poll now
    assert _context({}).interval_to_next_pending_claim_check() == 0.0
    # a pending claim without a timeout yet (between two polls): no sleep
    probe = _context({})
    probe._pending_claims = {"a"}
    assert probe.interval_to_next_pending_claim_check() == 0.0


def test_a_run_blocked_on_its_pool_sleeps_and_takes_the_slot_when_it_is_freed():
    @dg.asset(pool=POOL)
    def export_day() -> int:
        return 1

    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default(POOL)
        assert storage.claim_concurrency_slot(POOL, "other-run", "other-step").is_claimed
        result: dict = {}

        def run():
            result["success"] = dg.materialize([export_day], instance=instance).success

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while not storage.get_concurrency_info(POOL).pending_step_count:  # the step asked for the slot
            assert time.monotonic() < deadline, "the run never asked for the pool's slot"
            time.sleep(0.1)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(3.0)
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - wall_before
        assert worker.is_alive(), "the run finished although the slot was taken"
        # Dagster's own loop spins: ~1 CPU second per second waited; sleeping, a few polls
        assert cpu < 0.3 * wall, f"the waiting run used {cpu:.2f} CPU s in {wall:.1f} s"

        storage.free_concurrency_slots_for_run("other-run")
        worker.join(timeout=60)  # the next poll is at most ~2 s after 3 s of waiting
        assert not worker.is_alive(), "the run did not take the freed slot"
        assert result == {"success": True}
