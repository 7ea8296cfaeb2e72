"""Pause points for the fault-injection suite (``userpilot_sync_tests/test_faults.py``).

A test that must kill a run at an exact moment (while staging, between two uploads, before the
complete manifest) sets ``USERPILOT_SYNC_PAUSE_AT`` to a comma-separated list of point names and
``USERPILOT_SYNC_PAUSE_DIR`` to a folder. The first process that reaches a listed point creates
``<dir>/<point>`` (holding its pid) and sleeps until it is killed; any later process — the re-run —
sees the file and passes on. Without the two variables (every real deployment) a pause point is
one dictionary lookup and does nothing.

An entry ``<point>@<sync job>`` limits a point to one sync job (the cluster suite arms every
worker, and only its crash sync jobs stop): a point reached for another sync job passes.

Points (names are part of the test contract):

* ``run_start``: a Celery worker's child took a run and opened its database session, Dagster has
  not started the run yet (``userpilot_sync/cluster/worker.py``);
* ``extracting``: the first records of an extraction are staged, the rest not yet received;
* ``prepared_early``: a group of staged hours was prepared (encoded to local part files) while the
  extraction is still being staged (``pipeline.stage_and_prepare``);
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
POINTS = ("run_start", "extracting", "prepared_early", "staged", "uploading", "multipart", "before_manifest")


def pause_point(name: str, scope: str | None = None) -> None:
    """Sleep until killed if ``name`` is listed in ``USERPILOT_SYNC_PAUSE_AT`` (as ``name``, or as
    ``name@<scope>`` with ``scope`` the sync job) and no process paused there before (see the module
    docstring); otherwise return at once."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted:
        return
    for entry in wanted.split(","):
        point, _, only = entry.partition("@")
        if point == name and (not only or only == scope):
            break
    else:
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
