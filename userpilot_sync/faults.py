"""Pause points for the fault-injection suite (``userpilot_sync_tests/test_faults.py``).

A test that must kill a run at an exact moment (while staging, between two uploads, before the
complete manifest) sets ``USERPILOT_SYNC_PAUSE_AT`` to a comma-separated list of point names and
``USERPILOT_SYNC_PAUSE_DIR`` to a folder. The first process that reaches a listed point creates
``<dir>/<point>`` (holding its pid) and sleeps until it is killed; any later process — the re-run —
sees the file and passes on. Without the two variables (every real deployment) a pause point is
one dictionary lookup and does nothing.

Points (names are part of the test contract):

* ``staged``: a run's days are staged on local disk, nothing has been written to the destination;
* ``uploading``: the first data file of a day has been uploaded, the others not yet;
* ``multipart``: an S3 multipart upload has its first part stored, not yet completed;
* ``before_manifest``: every data file of a day is written, its complete manifest not yet.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT_ENV = "USERPILOT_SYNC_PAUSE_AT"
PAUSE_DIR_ENV = "USERPILOT_SYNC_PAUSE_DIR"
POINTS = ("staged", "uploading", "multipart", "before_manifest")


def pause_point(name: str) -> None:
    """Sleep until killed if ``name`` is listed in ``USERPILOT_SYNC_PAUSE_AT`` and no process paused
    there before (see the module docstring); otherwise return at once."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted or name not in wanted.split(","):
        return
    folder = os.environ.get(PAUSE_DIR_ENV)
    if not folder:
        return
    marker = Path(folder) / name
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # a process paused here before: this is the re-run
    with os.fdopen(fd, "w") as out:
        out.write(str(os.getpid()))
    while True:  # until kill -9
        time.sleep(3600)
