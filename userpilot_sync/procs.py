"""Process identity: is the process that wrote a record still running?

A pid alone is not an identity (pids are reused), so records that name their writer keep the
pid *and* the process start time (Linux ``/proc/<pid>/stat``, clock ticks since boot). Used by the
run recovery (``defs/recovery.py``), staging cleanup and the upload journal
(``destination/journal.py``). No Dagster here.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat``), if known."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """True when ``pid`` is a live process on this host (a zombie, or another process that reuses
    the pid — its start time differs from ``start_time`` — counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    if fields[0] == "Z":
        return False
    return not start_time or fields[19] == start_time
