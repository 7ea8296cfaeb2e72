"""Every instance config the project ships or shows is valid for Dagster itself.

Checked: ``deploy/dagster.yaml`` (local), ``deploy/cluster/dagster.yaml`` (cluster) and every YAML
block of ``docs/deploy.md`` whose first line is ``# $DAGSTER_HOME/dagster.yaml ...``. Each goes
through Dagster's own loader (``dagster_instance_config``: the instance schema, the concurrency
rules) and then each configurable class it names (run launcher, coordinator, compute logs,
storage) is imported and its config validated and post-processed (environment variables
resolved) against that class's ``config_type()`` — what ``DagsterInstance.get()`` does, without
connecting to a database, broker or Kubernetes. No server is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from dagster._config import convert_potential_field, post_process_config, validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import class_from_code_pointer

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deploy.md"
MARK = "# $DAGSTER_HOME/dagster.yaml"
CLASS_SECTIONS = ("run_launcher", "run_coordinator", "compute_logs", "run_storage", "event_log_storage",
                  "schedule_storage", "scheduler", "local_artifact_storage")
#: Values for every environment variable the configs read (they are resolved, as at load time).
ENV = {
    "DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "secret", "DAGSTER_PG_DB": "dagster",
    "USERPILOT_SYNC_CELERY_BROKER": "redis://broker.internal:6379/0",
    "USERPILOT_SYNC_CELERY_BACKEND": "redis://broker.internal:6379/1",
    "USERPILOT_SYNC_COMPUTE_LOGS_DIR": "/srv/dagster/compute_logs",
    "USERPILOT_SYNC_COMPUTE_LOGS_BUCKET": "my-dagster-logs",
}


def doc_blocks() -> list[tuple[str, str]]:
    text = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return [(b.splitlines()[0], b) for b in blocks if b.startswith(MARK)]


def configs() -> list[tuple[str, str]]:
    shipped = [("deploy/dagster.yaml", (REPO / "deploy" / "dagster.yaml").read_text()),
               ("deploy/cluster/dagster.yaml", (REPO / "deploy" / "cluster" / "dagster.yaml").read_text())]
    return shipped + [(f"docs/deploy.md: {title}", body) for title, body in doc_blocks()]


def validate_instance_config(text: str, folder: Path) -> list[str]:
    """Validate like ``DagsterInstance.get()``; returns the configurable classes checked."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(folder))  # raises DagsterInvalidConfigError
    checked = []
    for section in CLASS_SECTIONS:
        entry = config.get(section)
        if not entry:
            continue
        klass = class_from_code_pointer(entry["module"], entry["class"])
        value = entry.get("config") or {}
        config_type = convert_potential_field(klass.config_type()).config_type
        result = validate_config(config_type, value)
        assert result.success, (section, [e.message for e in result.errors])
        processed = post_process_config(config_type, result.value)
        assert processed.success, (section, [e.message for e in processed.errors])
        checked.append(klass.__name__)
    storage = config.get("storage") or {}
    if "postgres" in storage:
        from dagster_postgres import DagsterPostgresStorage
        from dagster_postgres.utils import pg_url_from_config

        config_type = convert_potential_field(DagsterPostgresStorage.config_type()).config_type
        assert validate_config(config_type, storage["postgres"]).success
        processed = post_process_config(config_type, storage["postgres"])
        assert processed.success, [e.message for e in processed.errors]
        url = pg_url_from_config(processed.value)
        assert url.startswith("postgresql+psycopg2://"), f"{url}: name the psycopg2 driver (SQLAlchemy 2.1 reads " \
                                                          f"postgresql:// as psycopg 3)"
        checked.append("DagsterPostgresStorage")
    return checked


def test_the_doc_shows_every_deployment_shape():
    titles = [title for title, _ in doc_blocks()]
    assert len(titles) >= 3, titles
    bodies = "\n".join(body for _, body in doc_blocks())
    for cls in ("CeleryRunLauncher", "K8sRunLauncher", "S3ComputeLogManager", "QueuedRunCoordinator"):
        assert cls in bodies, cls


@pytest.mark.parametrize("name,text", configs(), ids=[name for name, _ in configs()])
def test_an_instance_config_loads_with_dagsters_own_schema(name, text, tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    checked = validate_instance_config(text, tmp_path / "home")
    config = yaml.safe_load(text)
    if "run_launcher" in config:
        assert config["run_launcher"]["class"] in checked
    if "cluster" in name or "Celery" in text:
        # what the cluster's liveness rules depend on
        monitoring = config["run_monitoring"]
        assert monitoring["enabled"] and monitoring.get("max_resume_run_attempts") == 0, monitoring
        assert config["concurrency"]["pools"]["default_limit"] == 1
    if "CeleryRunLauncher" in checked:
        source = config["run_launcher"]["config"]["config_source"]
        assert source["task_track_started"] is True and source["worker_max_tasks_per_child"] == 1
        assert source["task_acks_late"] is False
        assert source["worker_disable_prefetch"] is True  # a busy worker leaves the next run to an idle one


@pytest.mark.parametrize("mutate,expected", [
    (lambda c: c["run_launcher"]["config"].update(brokr="redis://x"), "brokr"),
    (lambda c: c["run_monitoring"].update(poll_interval_seconds="often"), "poll_interval_seconds"),
    (lambda c: c["storage"]["postgres"]["postgres_db"].pop("hostname"), "hostname"),
])
def test_the_validation_catches_a_broken_config(mutate, expected, tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    config = yaml.safe_load((REPO / "deploy" / "cluster" / "dagster.yaml").read_text())
    mutate(config)
    with pytest.raises(Exception, match=expected):
        validate_instance_config(yaml.safe_dump(config), tmp_path / "home")


def test_the_helm_values_keep_the_cluster_rules():
    """deploy/kubernetes/values.yaml (Dagster's Helm chart) sets what the cluster shape relies on.
    (Validated against the chart's values.schema.json by hand, see docs/deploy.md; no helm here.)"""
    values = yaml.safe_load((REPO / "deploy" / "kubernetes" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["enabled"] and daemon["runMonitoring"]["maxResumeRunAttempts"] == 0
    assert daemon["runRetries"] == {"enabled": True, "maxRetries": 1, "retryOnAssetOrOpFailure": False}
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["defaultLimit"] == 1
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "userpilot_sync.definitions"]
    mounts = values["runLauncher"]["config"]["k8sRunLauncher"]["volumeMounts"]
    staging = next(e["value"] for e in deployment["env"] if e["name"] == "USERPILOT_SYNC_STAGING_DIR")
    assert any(m["mountPath"] == staging for m in mounts)  # staging on the run pod's own volume
