# userpilot_sync — everything a newcomer needs: make run, make ui, make test, make bench.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT := false

.PHONY: install run ui cluster cluster-stop cluster-status test test-fast check schema-doc bench bench-cluster clean

# Create .venv from the lock file (uv is installed from PyPI when missing). --compile-bytecode: every
# Dagster process (each run of a backfill, the code server, the tests' dagster dev) then reads
# compiled bytecode instead of compiling Dagster, polars, pandas... again (10-20 s per process where
# PYTHONDONTWRITEBYTECODE is set; docs/performance.md, "The backfill").
$(BIN)/.installed: pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	$(PYTHON) -m uv sync --frozen --compile-bytecode --extra dev --extra cluster --python $(PYTHON)
	@touch $@

install: $(BIN)/.installed

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# Sync the last 7 complete UTC days of the demo app into ./exports.
run: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m userpilot_sync.cli sync --job demo --days 7

# The Dagster UI (webserver + daemon) on http://127.0.0.1:3000 with every sync job loaded.
ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

# The cluster deployment on this machine, for a trial (docs/deploy.md): PostgreSQL in .cluster/postgres,
# Redis, two Celery workers with separate staging folders, the daemon and the webserver on
# http://127.0.0.1:3000. Needs Debian's postgresql and redis-server packages.
cluster: install
	$(BIN)/python -m userpilot_sync.cluster.trial start

cluster-stop: install
	$(BIN)/python -m userpilot_sync.cluster.trial stop

cluster-status: install
	$(BIN)/python -m userpilot_sync.cluster.trial status

# Tests run on $(TEST_WORKERS) pytest-xdist workers (one per core of the 2-core machines). loadfile:
# each test module runs whole on one worker (its servers and dagster dev start once); the slowest
# modules go first, in the order of SLOW_MODULES in userpilot_sync_tests/conftest.py.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole test suite (starts its own local S3, GCS, Export API and Dagster servers).
test: install
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# The fast lane: no servers, no dagster dev, no kill -9, no cluster, no browser, no Spark (markers
# integration, faults, cluster, browser and readers left out).
test-fast: install
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not integration and not faults and not cluster and not browser and not readers"

# dg's own check that the definitions load.
check: install
	$(BIN)/dg check defs

# Render docs/schema.md's generated column reference from the code's schemas (a test fails when it is stale).
schema-doc: install
	$(BIN)/python -m userpilot_sync.schema.reference

# The `dlt` contender's own environment (docs/performance.md): dlt[s3] pins botocore, so dlt never
# enters the product's lock. Pinned in benchmarks/requirements-dlt.txt (from requirements-dlt.in).
DLT_VENV := .venv-dlt
.PHONY: bench-dlt-env bench-dlt-lock

$(DLT_VENV)/.installed: benchmarks/requirements-dlt.txt
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	@test -x $(DLT_VENV)/bin/python || $(PYTHON) -m uv venv $(DLT_VENV) --python $(PYTHON)
	$(PYTHON) -m uv pip sync --python $(DLT_VENV)/bin/python benchmarks/requirements-dlt.txt
	@touch $@

bench-dlt-env: $(DLT_VENV)/.installed

# Re-pin benchmarks/requirements-dlt.txt after editing benchmarks/requirements-dlt.in.
bench-dlt-lock:
	$(PYTHON) -m uv pip compile benchmarks/requirements-dlt.in --python-version 3.11 \
		--custom-compile-command "make bench-dlt-lock" -o benchmarks/requirements-dlt.txt

# 1M, 5M and 10M events (10M: exporter and floor only), dlt, the 365-day backfill, snapshot_1m.
bench: install bench-dlt-env
	$(BIN)/python -m benchmarks.run

# A backfill of 2 sync jobs x 90 days x 20k events on the cluster shape, one worker vs two (docs/deploy.md).
bench-cluster: install
	$(BIN)/python -m benchmarks.cluster

clean:
	rm -rf .staging exports
