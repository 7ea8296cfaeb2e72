"""The code's import rules (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "userpilot_sync"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.glob("*.py"))


#: The one exception to the rules below: the renderer of docs/schema.md's generated reference reads
#: the schemas of every package; it is a tool (``python -m userpilot_sync.schema.reference``) that no
#: module of the package imports (checked below).
SCHEMA_REFERENCE = PACKAGE / "schema" / "reference.py"


@pytest.mark.parametrize("folder, forbidden", [
    ("config", ("userpilot_sync.source", "userpilot_sync.destination", "dagster")),
    ("source", ("userpilot_sync.destination", "dagster")),
    ("destination", ("userpilot_sync.source", "dagster")),
    ("schema", ("userpilot_sync.source", "userpilot_sync.destination", "dagster")),
    ("notify", ("userpilot_sync.source", "userpilot_sync.destination", "userpilot_sync.defs", "dagster")),
])
def test_core_packages_keep_to_themselves(folder, forbidden):
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in _modules(folder) if path != SCHEMA_REFERENCE for name in _imports(path)
        if any(name == f or name.startswith(f + ".") or name.startswith(f + "_") for f in forbidden)
    }
    assert not offenders


def test_no_module_imports_the_schema_reference_renderer():
    offenders = {
        str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
        if path != SCHEMA_REFERENCE and "userpilot_sync.schema.reference" in _imports(path)
    }
    assert SCHEMA_REFERENCE.exists() and not offenders


def test_notify_imports_only_config_net_and_errors_of_the_package():
    allowed = ("userpilot_sync.config", "userpilot_sync.net", "userpilot_sync.errors", "userpilot_sync.notify")
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in _modules("notify") for name in _imports(path)
        if name.startswith("userpilot_sync") and not any(name == a or name.startswith(a + ".") for a in allowed)
    }
    assert _modules("notify") and not offenders


def test_only_defs_the_cli_and_the_cluster_worker_import_dagster():
    allowed = {"cli.py", "definitions.py"}
    offenders = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if not {"defs", "cluster"} & set(path.relative_to(PACKAGE).parts) and path.name not in allowed
        and any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in _imports(path))
    }
    assert not offenders


#: The modules allowed a private Dagster import. Each replaces one method of Dagster's, checks first
#: that the installed Dagster still has the code it replaces, and has a test proving both:
#: pool_wait.py, Dagster 1.13's busy loop while a step waits for a pool slot (test_pool_wait.py);
#: sqlite_engines.py, the SQLite event log's and run storage's engine per connection (test_sqlite_engines.py).
PRIVATE_DAGSTER_ALLOWED = {
    "userpilot_sync/defs/pool_wait.py": {"dagster._core.execution.plan.instance_concurrency_context"},
    "userpilot_sync/defs/sqlite_engines.py": {"dagster._check", "dagster._core.storage.event_log.sqlite.sqlite_event_log",
                                              "dagster._core.storage.runs.sqlite.sqlite_run_storage"},
}


def test_no_dagster_private_imports():
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in PACKAGE.rglob("*.py") for name in _imports(path) if name.startswith("dagster._")
        and name not in PRIVATE_DAGSTER_ALLOWED.get(str(path.relative_to(PACKAGE.parent)), set())
    }
    assert not offenders
