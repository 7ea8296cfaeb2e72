"""Regenerate ledger_v1.json: run the version-1 code against fake-gcs-server and dump its records.

    git worktree add /some/folder bc7b648
    .venv/bin/python userpilot_sync_tests/data/make_ledger_v1.py /some/folder userpilot_sync_tests/data/ledger_v1.json

Not part of the test suite (the JSON it wrote is committed); kept so the fixture can be reproduced.
"""
import json, os, sys
from pathlib import Path
import dagster as dg
REPO = str(Path(__file__).resolve().parents[2])
OLD, OUT = sys.argv[1], sys.argv[2]
sys.path.insert(0, REPO)
from userpilot_sync_tests import fixtures_storage as fs
import subprocess, time, urllib.request

port = fs.free_port(); endpoint = f"http://127.0.0.1:{port}"
proc = subprocess.Popen([str(fs.fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                         "-backend", "memory", "-log-level", "warn", "-external-url", endpoint],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    try:
        urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read(); break
    except OSError:
        time.sleep(0.05)
gcs = fs.FakeGcs(endpoint)
gcs.create_bucket("v1-ledger")
os.environ["STORAGE_EMULATOR_HOST"] = endpoint
sys.path.remove(REPO)
for m in [m for m in sys.modules if m.startswith("userpilot_sync")]:
    del sys.modules[m]
sys.path.insert(0, OLD)
from userpilot_sync.config.model import SyncJob
from userpilot_sync.defs.project import build_definitions

days = ["2026-11-28", "2026-11-29", "2026-11-30"]
base = {"name": "demo", "sync_id": "10001", "title": "Demo", "app_token": "NX-demo0001",
        "source": {"kind": "demo", "events_per_day": 300, "seed": 7},
        "destination": {"kind": "gcs", "bucket": "v1-ledger", "project": "test-project", "prefix": "userpilot_events"}}
try:
    with dg.instance_for_test() as instance:
        job = SyncJob.model_validate({**base, "max_file_rows": 40})
        defs = build_definitions([job], Path(OUT).parent / ".v1staging")
        r = defs.resolve_job_def("demo_sync").execute_in_process(instance=instance, tags={
            "dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]})
        assert r.success
        job2 = SyncJob.model_validate(base)  # re-export of one day with fewer parts: superseded files
        defs2 = build_definitions([job2], Path(OUT).parent / ".v1staging")
        assert defs2.resolve_job_def("demo_sync").execute_in_process(instance=instance, partition_key=days[1]).success
        assert defs2.resolve_job_def("demo_definitions_refresh").execute_in_process(instance=instance).success
        events = []
        for key in instance.get_asset_keys():
            for rec in instance.fetch_materializations(key, limit=1000, ascending=True).records:
                m = rec.asset_materialization
                md = {}
                for k, v in m.metadata.items():
                    if k == "dagster/column_schema":
                        continue
                    kind = type(v).__name__
                    value = v.data if kind == "JsonMetadataValue" else getattr(v, "value", getattr(v, "text", None))
                    md[k] = {"type": kind, "value": value}
                events.append({"storage_id": rec.storage_id, "kind": "materialization", "asset_key": key.path,
                               "partition": m.partition, "metadata": md})
        events.sort(key=lambda e: e["storage_id"])
        for i, e in enumerate(events):
            e["storage_id"] = i
        doc = {"written_by": "userpilot_sync before the per-day ledger (ledger version 1, commit bc7b648): a 3-day "
                             "range run with max_file_rows 40, a re-export of the middle day without it, a lookups refresh",
               "sync_job": base, "events": events}
        json.dump(doc, open(OUT, "w"), indent=1, sort_keys=True)
        print(len(events))
finally:
    proc.terminate()
    import shutil
    shutil.rmtree(Path(OUT).parent / ".v1staging", ignore_errors=True)
