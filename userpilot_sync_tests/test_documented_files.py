"""Userpilot's documented files: user/company snapshots (values per day, late data, stale days and
their automatic range run, a lost state rebuilt), feature-tag breakdown/definitions, per-tag and
per-label files (safe names, union = export), every format and layout, byte-identical re-runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb
import fastavro
import polars as pl
import pytest

from userpilot_sync.defs.automation import snapshot_refresh_request
from userpilot_sync.defs.keys import CHECK_SNAPSHOT_CURRENT, SNAPSHOT_REFRESH_TAG, SyncJobKeys
from userpilot_sync.defs.partitions import RANGE_END_TAG, RANGE_START_TAG
from userpilot_sync.defs.project import build_definitions
from userpilot_sync.documented.feature_tags import escape_id
from userpilot_sync.documented.state import SnapshotStore, backend_for
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import check_evaluations, make_job, run_sync

D1, D2, D3 = [d.isoformat() for d in last_complete_days(3)]
ALL_FILES = ["all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions",
             "track_feature_per_tag", "track_labeled_per_label"]


def _at(day: str, hhmm: str) -> str:
    return f"{day}T{hhmm}:00.000000Z"


def _event(event_type: str, day: str, hhmm: str, user=None, company=None, name="", metadata=None, **extra) -> dict:
    return {"app_token": "NX-demo0001", "event_type": event_type, "event_name": name, "user_id": user,
            "company_id": company, "source": "web-client", "inserted_at": _at(day, hhmm), "metadata": metadata,
            **extra}


def _write(folder: Path, name: str, events: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(e) + "\n" for e in events))


CRAFTED = [
    # day 1: u1 identified with company c1, u2 without a company; company c1 identified; u1 active later
    _event("identify_company", D1, "09:00", company="c1", metadata={"name": "Acme", "tier": "gold"}),
    _event("identify_user", D1, "10:00", user="u1", company="c1", metadata={"email": "a@x", "plan": "free"}),
    _event("identify_user", D1, "11:00", user="u2", company=None, metadata={"plan": "pro"}),
    _event("page_view", D1, "12:00", user="u1", company="c1"),
    # day 2: u1's plan overwritten and company changed; an event of u2's (no identify)
    _event("identify_user", D2, "08:00", user="u1", company="c2", metadata={"plan": "pro"}),
    _event("track", D2, "09:30", user="u2", company=None, name="Report Exported"),
    _event("identify_company", D2, "10:00", company="c1", metadata={"tier": None}),
    # day 3: a key first seen, an empty company (keeps c2), a null value
    _event("identify_user", D3, "07:00", user="u1", company="", metadata={"role": "admin", "email": None}),
    _event("session_start", D3, "07:05", user="u1", company="c2"),
]
LATE = [  # identify events of day 1 that arrive after day 1 was exported
    _event("identify_user", D1, "23:00", user="u4", company="c1", metadata={"plan": "trial"}),
    _event("identify_user", D1, "23:30", user="u2", company="c9", metadata={"plan": None, "seats": 3}),
]


def _ts(day: str, hhmm: str) -> datetime:
    return datetime.fromisoformat(f"{day}T{hhmm}:00+00:00")


def _users(rows: list[tuple]) -> list[dict]:
    return [{"user_id": u, "company_id": c, "first_identified_at": f, "last_identified_at": li,
             "last_event_at": le, "properties": p} for u, c, f, li, le, p in rows]


def _expected_users(late: bool) -> dict[str, list[dict]]:
    u1 = [("u1", "c1", _ts(D1, "10:00"), _ts(D1, "10:00"), _ts(D1, "12:00"), '{"email":"a@x","plan":"free"}')]
    u2 = ("u2", None, _ts(D1, "11:00"), _ts(D1, "11:00"), _ts(D1, "11:00"), '{"plan":"pro"}')
    if late:
        u2 = ("u2", "c9", _ts(D1, "11:00"), _ts(D1, "23:30"), _ts(D1, "23:30"), '{"plan":null,"seats":3}')
    u4 = [("u4", "c1", _ts(D1, "23:00"), _ts(D1, "23:00"), _ts(D1, "23:00"), '{"plan":"trial"}')] if late else []
    day1 = u1 + [u2] + u4
    u1_d2 = ("u1", "c2", _ts(D1, "10:00"), _ts(D2, "08:00"), _ts(D2, "08:00"), '{"email":"a@x","plan":"pro"}')
    u2_d2 = (u2[0], u2[1], u2[2], u2[3], _ts(D2, "09:30"), u2[5])
    day2 = [u1_d2, u2_d2] + u4
    u1_d3 = ("u1", "c2", _ts(D1, "10:00"), _ts(D3, "07:00"), _ts(D3, "07:05"),
             '{"email":null,"plan":"pro","role":"admin"}')
    day3 = [u1_d3, u2_d2] + u4
    return {D1: _users(day1), D2: _users(day2), D3: _users(day3)}


def _expected_companies(late: bool = False) -> dict[str, list[dict]]:
    def row(last_identified, last_event, props):
        return {"company_id": "c1", "first_identified_at": _ts(D1, "09:00"), "last_identified_at": last_identified,
                "last_event_at": last_event, "properties": props}
    # u4's late identify event carries company c1 (an event of c1's): its last_event_at moves
    return {D1: [row(_ts(D1, "09:00"), _ts(D1, "23:00" if late else "12:00"), '{"name":"Acme","tier":"gold"}')],
            D2: [row(_ts(D2, "10:00"), _ts(D2, "10:00"), '{"name":"Acme","tier":null}')],
            D3: [row(_ts(D2, "10:00"), _ts(D2, "10:00"), '{"name":"Acme","tier":null}')]}


def _folder(job, pk: str) -> Path:
    return Path(job.destination.path) / "userpilot_events" / job.sync_folder / pk


def _rows(job, pk: str, name: str) -> list[dict]:
    return pl.read_parquet(_folder(job, pk) / f"{name}.parquet").to_dicts()


def _manifest(job, pk: str) -> dict:
    return json.loads((_folder(job, pk) / "_manifest.json").read_text())


def _crafted_job(tmp_path: Path):
    chunks = tmp_path / "chunks"
    _write(chunks, "part-1.ndjson", CRAFTED)
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)}, checks={"empty_days": "expected"})
    return job, chunks


def test_snapshots_per_day_late_data_and_the_automatic_range_run(tmp_path):
    job, chunks = _crafted_job(tmp_path)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, D1, D3).success
        expected = _expected_users(late=False)
        companies = _expected_companies()
        for pk in (D1, D2, D3):
            assert _rows(job, pk, "all_users") == expected[pk], pk
            assert _rows(job, pk, "all_companies") == companies[pk], pk
            entry = _manifest(job, pk)["userpilot_files"]["all_users"]
            assert entry["status"] == "complete" and entry["history_start"] == D1
            paths = {f["path"]: f for f in _manifest(job, pk)["files"]}
            assert paths[f"{pk}/all_users.parquet"]["file"] == "all_users"
            assert paths[f"{pk}/all_users.parquet"]["rows"] == len(expected[pk])
        # the files source has no lookups: no definitions file, and the manifest says why
        entry = _manifest(job, D1)["userpilot_files"]["feature_tags_definitions"]
        assert entry["status"] == "absent" and "no lookups" in entry["reason"]
        assert not (_folder(job, D1) / "feature_tags_definitions.parquet").exists()
        assert snapshot_refresh_request(instance, keys, tmp_path / "staging").skip_message == "no stale snapshot"

        # late identify events for day 1; the day is re-exported (e.g. by the sync back)
        _write(chunks, "part-2.ndjson", LATE)
        assert run_sync(defs, instance, D1).success
        late = _expected_users(late=True)
        assert _rows(job, D1, "all_users") == late[D1]
        assert _rows(job, D2, "all_users") == expected[D2]  # not yet recomputed ...
        for name in ("all_users", "all_companies"):  # ... and each later day says so
            evaluations = check_evaluations(instance, keys.documented(name), CHECK_SNAPSHOT_CURRENT)
            assert evaluations[D1].passed
            for pk in (D2, D3):
                assert not evaluations[pk].passed and f"day {D1} was re-exported" in evaluations[pk].description

        # one range run over the stale days, requested by the sensor
        request = snapshot_refresh_request(instance, keys, tmp_path / "staging")
        assert isinstance(request, dg.RunRequest)
        assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (D2, D3)
        assert request.tags[SNAPSHOT_REFRESH_TAG] == D2
        result = defs.resolve_job_def(keys.sync_job_name).execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False)
        assert result.success
        for pk in (D1, D2, D3):
            assert _rows(job, pk, "all_users") == late[pk], pk
            assert _rows(job, pk, "all_companies") == _expected_companies(late=True)[pk], pk
        evaluations = check_evaluations(instance, keys.documented("all_users"), CHECK_SNAPSHOT_CURRENT)
        assert all(evaluations[pk].passed for pk in (D1, D2, D3))
        assert snapshot_refresh_request(instance, keys, tmp_path / "staging").skip_message == "no stale snapshot"


def test_out_of_order_days_and_a_lost_state_rebuilt_from_the_source(tmp_path):
    job, chunks = _crafted_job(tmp_path)
    _write(chunks, "part-2.ndjson", LATE)
    keys = SyncJobKeys(job)
    defs = build_definitions([job], tmp_path / "staging")
    late = _expected_users(late=True)
    with dg.instance_for_test() as instance:
        # day 3 first (e.g. the daily run), then the backfill of days 1-2
        assert run_sync(defs, instance, D3).success
        assert _manifest(job, D3)["userpilot_files"]["all_users"]["history_start"] == D3
        assert run_sync(defs, instance, D1, D2).success
        request = snapshot_refresh_request(instance, keys, tmp_path / "staging")
        assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (D3, D3)
        assert defs.resolve_job_def(keys.sync_job_name).execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False).success
        assert _rows(job, D3, "all_users") == late[D3]
        assert _manifest(job, D3)["userpilot_files"]["all_users"]["history_start"] == D1

        # the state store is lost: the next export rebuilds it from the source's identify events
        shutil.rmtree(tmp_path / "staging" / "_state")
        assert run_sync(defs, instance, D3).success
        rebuilt = _rows(job, D3, "all_users")
        # last_event_at before day 3 counts identify events only after a rebuild (documented)
        strip = [{k: v for k, v in r.items() if k != "last_event_at"} for r in rebuilt]
        assert strip == [{k: v for k, v in r.items() if k != "last_event_at"} for r in late[D3]]
        index = SnapshotStore(backend_for(job, tmp_path / "staging"), job.name).index
        assert index["days"][D1]["rebuilt_from_identify_events"] and not index["days"][D3]["rebuilt_from_identify_events"]
        entry = _manifest(job, D3)["userpilot_files"]["all_users"]
        assert entry["history_start"] == D1 and entry["last_event_at_identify_events_only_through"] == D2


def test_state_store_keeps_the_newest_state_and_checkpoints_only(tmp_path):
    job, chunks = _crafted_job(tmp_path)
    job = job.model_copy(update={"state": job.state.model_copy(update={"checkpoint_every_days": 365})})
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, D1, D3).success
    store = SnapshotStore(backend_for(job, tmp_path / "staging"), job.name, 365)
    assert store.index["states"] == [D3]  # D1, D2 are no checkpoints (every 365 days)
    folder = tmp_path / "staging" / "_state" / job.name
    assert sorted(p.name for p in (folder / "states").iterdir()) == [f"{D3}.all_companies.parquet",
                                                                     f"{D3}.all_users.parquet"]
    assert len(list((folder / "deltas").iterdir())) == 6
    # the state before day 3 is replayed from the deltas (no full state of day 2 kept)
    prior = store.prior_state(D3)
    assert prior.day == D2
    expected = _expected_users(late=False)[D2]
    assert prior.frames["all_users"].with_columns(pl.col("properties").fill_null("{}")).to_dicts() == expected


def _hostile_job(tmp_path: Path, **overrides):
    tags = ["../x", "a/b", "5_00001", "5", "überblick", "x" * 300, "1201"]
    events = []
    for i, tag in enumerate(tags):
        for j in range(i + 1):
            events.append(_event("track_feature", D1, f"{10 + j:02d}:{i:02d}", user=f"u{j % 3}" if j % 4 else "",
                                 company=f"c{j % 2}" if j % 5 else None, name=tag))
    events.append(_event("identify_user", D1, "09:00", user="u1", company="c1", metadata={"plan": "pro"}))
    chunks = tmp_path / "chunks"
    _write(chunks, "part-1.ndjson", events)
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)}, checks={"empty_days": "expected"},
                   userpilot_files=ALL_FILES, **overrides)
    return job, tags


@pytest.mark.parametrize("source", ["demo", "hostile"])
def test_breakdown_equals_a_group_by_over_the_export_and_per_tag_files_union(tmp_path, source):
    if source == "demo":
        job = make_job(tmp_path, userpilot_files=ALL_FILES)
        tags = None
    else:
        job, tags = _hostile_job(tmp_path)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, D1).success
    folder = _folder(job, D1)
    export = str(folder / "track_feature.parquet")
    expected = duckdb.sql(
        f"SELECT event_name, count(*), count(DISTINCT NULLIF(user_id, '')), count(DISTINCT NULLIF(company_id, '')) "
        f"FROM read_parquet('{export}') GROUP BY 1 ORDER BY 1").fetchall()
    breakdown = pl.read_parquet(folder / "feature_tags_breakdown.parquet")
    assert [tuple(r) for r in breakdown.select("feature_tag_id", "events", "unique_users", "unique_companies").rows()] \
        == [tuple(r) for r in expected]
    assert breakdown.get_column("feature_tag_id").to_list() == sorted(breakdown.get_column("feature_tag_id").to_list())
    manifest = _manifest(job, D1)
    per_tag = [f for f in manifest["files"] if f.get("file") == "track_feature_per_tag"]
    names = [Path(f["path"]).name for f in per_tag]
    assert len(set(names)) == len(names) == breakdown.height
    for f in per_tag:  # safe names, mapped to the full id
        assert Path(f["path"]).name == f"track_feature_{escape_id(f['id'])}.parquet"
        assert all(c.isalnum() and c.isascii() or c in "-%~_." for c in Path(f["path"]).name)
        assert len(Path(f["path"]).name) <= 120 + len("track_feature_.parquet")
    union = pl.concat([pl.read_parquet(folder / n) for n in names]).sort(["inserted_at", "internal_event_id"])
    assert union.equals(pl.read_parquet(export).sort(["inserted_at", "internal_event_id"]))
    if tags:
        assert sorted(f["id"] for f in per_tag) == sorted(tags)
        names_by_id = {f["id"]: Path(f["path"]).name for f in per_tag}
        assert names_by_id["../x"] == "track_feature_%2E%2E%2Fx.parquet"
        assert names_by_id["5_00001"] != names_by_id["5"]
        long = names_by_id["x" * 300]
        assert long.startswith("track_feature_" + "x" * 100 + "~") and len(long) == len("track_feature_.parquet") + 117
    else:  # the demo has lookups: names, definitions and labeled events
        per_label = [f for f in manifest["files"] if f.get("file") == "track_labeled_per_label"]
        assert sorted(f["id"] for f in per_label) == ["Signed Up", "Upgraded Plan"]
        assert [Path(f["path"]).name for f in per_label] == ["track_labeled_Signed%20Up.parquet",
                                                             "track_labeled_Upgraded%20Plan.parquet"]
        labeled = pl.concat([pl.read_parquet(folder / Path(f["path"]).name) for f in per_label])
        track = pl.read_parquet(folder / "track.parquet")
        expected_labeled = track.filter(pl.col("event_name").is_in(["Signed Up", "Upgraded Plan"]))
        assert labeled.sort(["inserted_at", "internal_event_id"]).equals(
            expected_labeled.sort(["inserted_at", "internal_event_id"]))
        assert manifest["userpilot_files"]["track_labeled_per_label"]["rows"] == expected_labeled.height > 0
        assert breakdown.get_column("name").null_count() == 0
        definitions = pl.read_parquet(folder / "feature_tags_definitions.parquet")
        assert definitions.columns == ["id", "name", "description", "category"]
        assert set(breakdown.get_column("feature_tag_id")) <= set(definitions.get_column("id"))


def _read_any(path: Path) -> pl.DataFrame:
    """A documented file in any format, as read by a reader (DuckDB for text formats, fastavro)."""
    name = path.name
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    if name.endswith(".avro"):
        with open(path, "rb") as fh:
            return pl.DataFrame(list(fastavro.reader(fh)))
    if ".ndjson" in name:
        return duckdb.sql(f"SELECT * FROM read_json('{path}', format='newline_delimited')").pl()
    return duckdb.sql(f"SELECT * FROM read_csv('{path}', header=true, all_varchar=true)").pl()


def _first_ndjson_line(path: Path) -> dict:
    import gzip

    data = path.read_bytes()
    return json.loads((gzip.decompress(data) if path.name.endswith(".gz") else data).splitlines()[0])


@pytest.mark.parametrize("layout", ["userpilot", "hive"])
def test_every_format_and_layout_and_byte_identical_reruns(tmp_path, layout):
    formats = [{"format": "parquet"}, {"format": "ndjson", "compression": "gzip"}, {"format": "csv"},
               {"format": "avro"}]
    job = make_job(tmp_path, userpilot_files=ALL_FILES, formats=formats, layout=layout,
                   source={"kind": "demo", "events_per_day": 800, "seed": 3})
    defs = build_definitions([job], tmp_path / "staging")
    root = Path(job.destination.path) / "userpilot_events" / job.sync_folder
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, D1).success
        manifest = json.loads(next(root.rglob("_manifest.json")).read_text())
        documented = [f for f in manifest["files"] if f.get("file")]
        assert {f["file"] for f in documented} == set(ALL_FILES)
        for f in documented:
            path = root / f["path"]
            assert path.is_file(), f["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
            if layout == "hive":
                assert "date=" + D1 in f["path"]
        by_key: dict[tuple, dict[str, pl.DataFrame]] = {}
        for f in documented:
            by_key.setdefault((f["file"], f.get("id")), {})[f["format"]] = _read_any(root / f["path"])
        for (name, file_id), frames in by_key.items():
            parquet = frames["parquet"]
            for fmt, frame in frames.items():
                assert frame.height == parquet.height, (name, file_id, fmt)
                if name == "all_users" and fmt == "ndjson":
                    # properties is a JSON object in NDJSON, the same canonical text elsewhere
                    path = root / next(f["path"] for f in documented if f["file"] == name and f["format"] == "ndjson")
                    line = _first_ndjson_line(path)
                    assert isinstance(line["properties"], dict)
                    assert json.dumps(line["properties"], sort_keys=True, separators=(",", ":")) == \
                        parquet.get_column("properties")[0]
                if fmt in ("csv", "avro") and name in ("all_users", "feature_tags_breakdown"):
                    key = parquet.columns[0]
                    assert frame.get_column(key).cast(pl.String).to_list() == parquet.get_column(key).to_list()
        digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
                   and p.name != "_manifest.json"}
        assert run_sync(defs, instance, D1).success
        again = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
                 and p.name != "_manifest.json"}
        assert again == digests


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_state_store_on_an_object_store(tmp_path, monkeypatch, request, kind):
    """The snapshot state on S3 (moto) or GCS (fake-gcs-server): same snapshots, objects there,
    nothing under the staging folder."""
    if kind == "s3":
        server = request.getfixturevalue("moto_s3")
        bucket = server.create_bucket(f"state-{tmp_path.name.lower().replace('_', '-')[:40]}")
        key_id, secret = server.keys["admin"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        state = {"kind": "s3", "bucket": bucket, "prefix": "prod/state", "region": "us-east-1",
                 "endpoint_url": server.endpoint}
    else:
        server = request.getfixturevalue("fake_gcs")
        bucket = server.create_bucket(f"state-{tmp_path.name.lower().replace('_', '-')[:40]}")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
        state = {"kind": "gcs", "bucket": bucket, "prefix": "prod/state", "project": "test-project"}
    chunks = tmp_path / "chunks"
    _write(chunks, "part-1.ndjson", CRAFTED)
    job = make_job(tmp_path, source={"kind": "files", "path": str(chunks)}, checks={"empty_days": "expected"},
                   state=state)
    defs = build_definitions([job], tmp_path / "staging")
    with dg.instance_for_test() as instance:
        assert run_sync(defs, instance, D1, D2).success
        assert run_sync(defs, instance, D3).success  # a new run reads the state back from the store
    expected = _expected_users(late=False)
    for pk in (D1, D2, D3):
        assert _rows(job, pk, "all_users") == expected[pk]
    assert not (tmp_path / "staging" / "_state").exists()
    if kind == "s3":
        names = [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    else:
        names = [b.name for b in server.client().list_blobs(bucket)]
    assert f"prod/state/{job.name}/index.json" in names
    assert f"prod/state/{job.name}/states/{D3}.all_users.parquet" in names
    assert f"prod/state/{job.name}/deltas/{D1}.all_users.parquet" in names
