"""Shared fixtures. Server fixtures (S3, GCS, Export API emulator) live in their own modules.

Parallel runs (``make test``: pytest-xdist, ``-n 2 --dist loadfile``): every worker is a process of
its own with its own base temp folder (``<basetemp>/popen-gw<N>``), so ``tmp_path`` and
``tmp_path_factory`` never collide, and each test module runs whole on one worker, so its
module-scoped fixtures (``dagster dev`` in test_ui.py and test_faults.py, fake-gcs-server, the
fault suite's background cases) start once. :func:`_worker_environment` gives each worker (and a
serial run) its own ``DAGSTER_HOME`` and default staging root there, so no test writes into the
project's ``.dagster_home/`` or ``.staging/`` (which ``make run``/``make ui`` use), and it clears the
pause points of ``userpilot_sync/faults.py`` from the environment, so only a test that arms one
itself (in a folder of its own) ever pauses a process. :func:`pytest_collection_modifyitems`
queues the slowest modules first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

pytest_plugins = [  # fixtures_storage first: fixtures_core imports it (pytest rewrites the asserts of both)
    "userpilot_sync_tests.fixtures_storage",
    "userpilot_sync_tests.fixtures_core",
    "userpilot_sync_tests.fixtures_api",
]

REPO = Path(__file__).resolve().parents[1]

#: The slowest modules (about two thirds of the suite's time), queued first in this order (longest
#: first) so that neither worker is left with a long module at the end; every other module follows
#: in file order. Measured with ``--durations`` / ``--junitxml`` on 2 cores: test_faults.py alone
#: takes about a fifth of the suite's time.
SLOW_MODULES = (
    "test_faults.py",
    "test_cluster.py",
    "test_reexports.py",
    "test_ui.py",
    "test_browser.py",
    "test_reading_spark.py",
    "test_preview.py",
    "test_delta.py",
    "test_definitions.py",
    "test_per_day_records.py",
    "test_manifest_v2.py",
    "test_instance_init.py",
    "test_guards.py",
    "test_move_history.py",
)

#: xdist modes that keep a module whole on one worker. ``load``/``worksteal`` (what ``-n 2`` alone
#: means) spread a module's tests over the workers: each worker would start its own ``dagster dev``,
#: and test_faults.py's module fixture starts the daemon cases of every selected test of the module
#: on each worker that runs one of them. ``loadgroup`` is no better here: with pytest 9.2 and
#: pytest-xdist 3.8 it ignores ``xdist_group`` marks (pytest-dev/pytest-xdist#1386) and spreads
#: every test like ``load``.
_WHOLE_MODULE_MODES = ("loadfile", "loadscope", "each", "no")

#: Environment variables a worker must not inherit (the pause points of the fault-injection suite).
_CLEARED_ENV = ("USERPILOT_SYNC_PAUSE_AT", "USERPILOT_SYNC_PAUSE_DIR")


@pytest.fixture(scope="session", autouse=True)
def _worker_environment(tmp_path_factory):
    """This worker's own ``DAGSTER_HOME`` (``deploy/dagster.yaml``) and default staging root, under
    its base temp folder; the pause-point variables cleared. Tests that need a fresh instance still
    make their own (``dg.instance_for_test``, ``cli_env``, ``dagster_home``)."""
    root = tmp_path_factory.mktemp("worker_env")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    patch = pytest.MonkeyPatch()
    patch.setenv("DAGSTER_HOME", str(home))
    patch.setenv("USERPILOT_SYNC_STAGING_DIR", str(root / "staging"))
    for name in _CLEARED_ENV:
        patch.delenv(name, raising=False)
    try:
        yield root
    finally:
        patch.undo()


def pytest_configure(config):
    """Refuse an xdist mode that splits a test module over workers (see :data:`_WHOLE_MODULE_MODES`);
    put the temporary folders in memory (:func:`_temp_in_memory`)."""
    dist = getattr(config.option, "dist", "no")
    if not hasattr(config, "workerinput") and getattr(config.option, "tx", None) and dist not in _WHOLE_MODULE_MODES:
        raise pytest.UsageError(f"--dist {dist} splits test modules over the workers; the suite needs each module "
                                f"on one worker: use --dist loadfile (as make test does)")
    _temp_in_memory(config)


#: A memory-backed folder (Linux tmpfs) for the suite's temporary folders, when it has room.
_MEMORY_TEMP = Path("/dev/shm")
_MEMORY_TEMP_MIN_FREE = 4 << 30


def _temp_in_memory(config) -> None:
    """Point ``TMPDIR`` at :data:`_MEMORY_TEMP` unless ``TMPDIR`` or ``--basetemp`` is given.

    Every Dagster instance of the suite (``tmp_path``, ``dg.instance_for_test()``, ``dagster dev``, the
    CLI's) keeps its runs and event logs in SQLite, which commits with an fsync: about 4 ms on the
    test machine's disk, 0.06 ms in memory, and thousands of commits per module. The controller sets
    it before the xdist workers start, so the workers, ``tmp_path`` and every subprocess (``dagster
    dev``, runs, the CLI) inherit it. ``TMPDIR=/tmp make test`` keeps the folders on disk."""
    if hasattr(config, "workerinput") or config.option.basetemp or os.environ.get("TMPDIR"):
        return
    try:
        usable = _MEMORY_TEMP.is_dir() and os.access(_MEMORY_TEMP, os.W_OK | os.X_OK)
        stats = os.statvfs(_MEMORY_TEMP) if usable else None
    except OSError:
        return
    if stats is None or stats.f_bavail * stats.f_frsize < _MEMORY_TEMP_MIN_FREE:
        return
    os.environ["TMPDIR"] = str(_MEMORY_TEMP)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_collection_modifyitems(config, items):
    """Queue the :data:`SLOW_MODULES` first (with ``--no-loadscope-reorder``, as ``make test`` runs,
    xdist hands out modules in this order). Only whole modules move: the tests of a module stay
    together and in their order, so its module-scoped fixtures are set up once. Every worker
    collects the same items and sorts them the same way (xdist checks that the collections match)."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


def pytest_terminal_summary(terminalreporter, config):
    """Under xdist the workers' terminal output is not shown: print the fault-injection figures that
    ``test_faults.py`` wrote into a worker's base temp folder (a serial run prints them itself)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return
    for path in sorted(factory.getbasetemp().glob("*/fault_injection_figures.json")):
        from userpilot_sync_tests.fixtures_faults import figures_table

        terminalreporter.write_line("")
        for line in figures_table(json.loads(path.read_text()), path):
            terminalreporter.write_line(line)
