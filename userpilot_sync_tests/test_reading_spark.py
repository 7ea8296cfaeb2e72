"""The readers' guide's Spark snippets (docs/reading.md), run as written with pyspark on the
machine's Java, and the acceptance check of issue 15: Spark, pyarrow.dataset and polars read the
``hive`` Parquet table folder of ``track`` over a range with an empty day — no glob, no filter
option — and get the rows the manifests count.

Marker ``readers``: ``make test`` runs it, ``make test-fast`` leaves it out. One SparkSession per
module (``local[1]``, 512 MB, no UI). Without Java the module fails, naming what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest

from userpilot_sync_tests.fixtures_reading import (
    DAYS,
    EMPTY_DAY,
    FORMATS,
    TRICKY_NAME,
    TRICKY_SESSION,
    export_days,
    fenced_snippets,
    manifest_rows,
    write_chunks,
)

pytestmark = pytest.mark.readers

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "reading.md"
SNIPPETS = {name: code for name, code in fenced_snippets(GUIDE.read_text(), "python").items()
            if name.startswith("spark-")}


def _java_or_fail() -> None:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").exists() else shutil.which("java")
    if java is None:
        pytest.fail("the readers tests need a Java runtime for pyspark and none is on PATH: install Debian's "
                    "default-jre-headless (apt-get install -y default-jre-headless; .ci/run does this) or set "
                    "JAVA_HOME", pytrace=False)
    probe = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.fail(f"'java -version' failed ({probe.returncode}): {probe.stderr.strip()[:300]}", pytrace=False)


@pytest.fixture(scope="module")
def spark():
    _java_or_fail()
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("userpilot_sync_reading")
               .config("spark.ui.enabled", "false").config("spark.driver.memory", "512m")
               .config("spark.sql.shuffle.partitions", "1").config("spark.sql.sources.parallelPartitionDiscovery.parallelism", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading_spark")
    formats = [f for f in FORMATS if f["format"] != "avro"]  # Spark reads Avro only with spark-avro (not bundled)
    return export_days(root / "hive", write_chunks(root / "chunks"), "hive", formats)


def _run(name: str, spark, sync: Path):
    namespace = {"spark": spark, "sync": sync.as_posix()}
    exec(compile(SNIPPETS[name], f"docs/reading.md#{name}", "exec"), namespace)
    return namespace.get("df")


def test_every_spark_snippet_is_run():
    assert set(SNIPPETS) == {"spark-session", "spark-parquet", "spark-ndjson", "spark-csv", "spark-all-event-types"}


def test_acceptance_three_engines_read_the_hive_parquet_table_folder(spark, exports):
    """Issue 15: the table folder itself, a range with an empty day, rows equal the manifests."""
    sync, manifests = exports
    assert manifests[DAYS.index(EMPTY_DAY)]["event_types"]["track"]["rows"] == 0
    expected = manifest_rows(manifests, "track")
    folder = (sync / "parquet" / "track").as_posix()
    assert spark.read.parquet(folder).count() == expected
    assert ds.dataset(folder, format="parquet", partitioning="hive").count_rows() == expected
    assert pl.scan_parquet(folder).select(pl.len()).collect().item() == expected
    days = {r["date"].isoformat() for r in spark.read.parquet(folder).select("date").distinct().collect()}
    assert days == {DAYS[0].isoformat(), DAYS[2].isoformat()}


def test_spark_snippets(spark, exports):
    sync, manifests = exports
    expected = manifest_rows(manifests, "track")
    _run("spark-session", spark, sync)
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"

    parquet = _run("spark-parquet", spark, sync)
    assert parquet.count() == expected
    first = min(r["inserted_at"] for r in parquet.select("inserted_at").collect())
    text = parquet.selectExpr("CAST(MIN(inserted_at) AS STRING) AS t").collect()[0]["t"]
    assert text.startswith(first.strftime("%Y-%m-%d %H:%M:%S")) or text.startswith(DAYS[0].isoformat())

    ndjson = _run("spark-ndjson", spark, sync)
    assert ndjson.count() == expected
    assert "note" in ndjson.schema["metadata"].dataType.fieldNames()  # inferred from every row

    csv = _run("spark-csv", spark, sync)
    assert csv.count() == expected
    assert csv.where(f"session = '{TRICKY_SESSION}'").count() == 1
    assert csv.where(csv.event_name == TRICKY_NAME).count() == 1
    assert dict(csv.dtypes)["inserted_at"] == "timestamp"

    merged = _run("spark-all-event-types", spark, sync)
    assert merged.count() == sum(manifest_rows(manifests, et) for et in ("page_view", "interaction", "track"))
    assert merged.where("entity_type IS NOT NULL").count() == manifest_rows(manifests, "interaction")


def test_the_spark_traps_are_real(spark, exports):
    sync, manifests = exports
    expected = manifest_rows(manifests, "track")
    folder = (sync / "csv" / "track").as_posix()
    # header only: the quoted newline splits a row, the doubled quotes shift columns
    naive = spark.read.option("header", True).csv(folder)
    assert naive.count() != expected or naive.where(naive.event_name == TRICKY_NAME).count() == 0
    # inferSchema: session becomes a number, "007" reads as 7
    inferred = spark.read.options(header=True, escape='"', multiLine=True, inferSchema=True).csv(folder)
    assert dict(inferred.dtypes)["session"] in ("int", "bigint")
    assert inferred.where("session = 7").count() >= 1
    # times are shown in the session's zone: UTC only when set
    parquet = spark.read.parquet((sync / "parquet" / "track").as_posix())
    try:
        spark.conf.set("spark.sql.session.timeZone", "America/New_York")
        shown = parquet.selectExpr("CAST(MIN(inserted_at) AS STRING) AS t").collect()[0]["t"]
        assert shown.startswith((DAYS[0].replace(day=DAYS[0].day - 1)).isoformat())  # 5 hours earlier
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
