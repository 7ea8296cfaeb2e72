"""Config hygiene at load: prefixes and paths, duplicate keys, YAML 1.1 surprises, non-UTF-8 files.

Every refusal is a ConfigError naming the file and the key. Also: the one HTTPS/loopback rule
(``userpilot_sync.net``) that config, sources and destinations share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from userpilot_sync import net
from userpilot_sync.config.loader import load_sync_job_file, load_sync_jobs
from userpilot_sync.destination.layout import layout_for
from userpilot_sync.destination.transport import require_https as destination_require_https
from userpilot_sync.errors import ConfigError, DestinationError
from userpilot_sync.source import urls

MINIMAL = {"name": "acme_prod", "sync_id": "13214", "app_token": "NX-123454"}
DESTINATIONS = {
    "local": {"kind": "local", "path": "exports"},
    "s3": {"kind": "s3", "bucket": "acme-lake"},
    "gcs": {"kind": "gcs", "bucket": "acme-lake"},
}


def _write(folder: Path, filename: str, data: dict | str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _load_error(folder: Path) -> str:
    """The message of the ConfigError raised when the folder's sync jobs load."""
    with pytest.raises(ConfigError) as err:
        load_sync_jobs(folder)
    return str(err.value)


# ------------------------------------------------------------------------------ prefix and paths
@pytest.mark.parametrize("kind", list(DESTINATIONS))
@pytest.mark.parametrize(
    "prefix, reason",
    [
        ("a/../b", "'a/../b' has a '..' folder: on a local disk it would leave the destination folder"),
        ("../x", "'../x' has a '..' folder"),
        ("x/..", "'x/..' has a '..' folder"),
        ("a//b", "'a//b' has an empty folder ('//')"),
        ("a/./b", "'a/./b' has a '.' folder: a local folder ignores it, S3 and GCS keep it literally"),
        (".", "'.' has a '.' folder"),
        ("a\nb", "'a\\nb' contains control character(s) \\n"),
        ("a\tb", "'a\\tb' contains control character(s) \\t"),
        ("a\\b", "'a\\\\b' contains '\\'; separate the folders of a prefix with '/'"),
    ],
    ids=["dotdot_inside", "dotdot_first", "dotdot_last", "empty_segment", "dot", "only_dot", "newline", "tab",
         "backslash"],
)
def test_refused_prefixes_name_the_file_and_the_key(tmp_path, kind, prefix, reason):
    folder = tmp_path / "jobs"
    _write(folder, "acme.yaml", {**MINIMAL, "destination": {**DESTINATIONS[kind], "prefix": prefix}})
    text = _load_error(folder)
    assert text.startswith("sync job file acme.yaml: invalid configuration\n"), text
    assert f"  key destination.{kind}.prefix: {reason}" in text, text


def test_leading_and_trailing_slashes_give_the_same_keys_on_every_backend(tmp_path):
    keys, fingerprints = set(), set()
    for kind, dest in DESTINATIONS.items():
        path = _write(tmp_path / "jobs", f"{kind}.yaml", {**MINIMAL, "destination": {**dest, "prefix": "/userpilot/events/"}})
        job = load_sync_job_file(path)
        keys.add(layout_for(job).key("2026-03-09/track.parquet"))
        fingerprints.add(job.destination.fingerprint()["prefix"])
    assert keys == {"userpilot/events/userpilot_datasync_13214_NX-123454/2026-03-09/track.parquet"}
    assert fingerprints == {"userpilot/events"}


@pytest.mark.parametrize(
    "source, destination, key, reason",
    [
        (None, {"kind": "local", "path": "exports\nold"}, "destination.local.path",
         "'exports\\nold' contains control character(s) \\n"),
        (None, {"kind": "local", "path": " "}, "destination.local.path", "is empty; give a folder"),
        ({"kind": "files", "path": "chunks\x00"}, None, "source.files.path", "'chunks\\x00' contains control character(s) \\x00"),
    ],
    ids=["local_path_newline", "local_path_blank", "files_path_nul"],
)
def test_refused_local_paths_name_the_file_and_the_key(tmp_path, source, destination, key, reason):
    data = dict(MINIMAL)
    if source:
        data["source"] = source
    if destination:
        data["destination"] = destination
    folder = tmp_path / "jobs"
    _write(folder, "acme.yaml", data)
    assert f"sync job file acme.yaml: invalid configuration\n  key {key}: {reason}" in _load_error(folder)


def test_dotdot_in_a_local_path_is_a_folder_not_a_key(tmp_path):
    path = _write(tmp_path / "project" / "jobs", "acme.yaml",
                  {**MINIMAL, "destination": {"kind": "local", "path": "../lake"}})
    assert load_sync_job_file(path).destination.path == str(tmp_path / "lake")


# ------------------------------------------------------------------------------ duplicate keys
def test_duplicate_top_level_key_names_key_and_lines(tmp_path):
    folder = tmp_path / "jobs"
    _write(folder, "acme.yaml", 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\nname: acme_staging\n')
    assert _load_error(folder) == (
        "sync job file acme.yaml: key name is given twice (lines 1 and 4); YAML would silently keep the last "
        "value. Keep one of them."
    )


def test_duplicate_nested_key_names_the_dotted_key(tmp_path):
    text = (
        'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\n'
        "destination:\n  kind: s3\n  bucket: acme-lake\n  prefix: events\n  region: us-east-1\n  prefix: raw\n"
    )
    path = _write(tmp_path, "acme.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value) == (
        "sync job file acme.yaml: key destination.prefix is given twice (lines 7 and 9); YAML would silently "
        "keep the last value. Keep one of them."
    )


def test_duplicate_key_in_a_list_item_and_in_flow_style(tmp_path):
    text = 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\nformats: [{format: csv, format: avro}]\n'
    with pytest.raises(ConfigError, match=r"^sync job file acme.yaml: key formats\.0\.format is given twice \(on line 4\)"):
        load_sync_job_file(_write(tmp_path, "acme.yaml", text))


def test_anchors_and_merge_keys_still_load(tmp_path):
    text = (
        'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\n'
        "filters: {user_ids_include: &ids [u1, u2], company_ids_include: *ids}\n"
        "sync_back: {<<: {weekday: monday, hour: 5}, hour: 6}\n"
    )
    job = load_sync_job_file(_write(tmp_path, "acme.yaml", text))
    assert job.filters.company_ids_include == ("u1", "u2")
    assert (job.sync_back.weekday, job.sync_back.hour) == ("monday", 6)


# ------------------------------------------------------------------------------ YAML 1.1 surprises
def test_yaml_11_booleans_in_text_keys_are_explained_with_a_quoting_hint(tmp_path):
    folder = tmp_path / "jobs"
    _write(folder, "acme.yaml", "name: off\nsync_id: no\ntitle: yes\napp_token: NX-123454\n")
    assert _load_error(folder) == (
        "sync job file acme.yaml: invalid configuration\n"
        "  key name: Input should be a valid string (got False): YAML 1.1 reads the unquoted off (line 1) as the "
        'boolean false, not as text; write it in quotes: name: "off"\n'
        "  key sync_id: Input should be a valid string (got False): YAML 1.1 reads the unquoted no (line 2) as the "
        'boolean false, not as text; write it in quotes: sync_id: "no"\n'
        "  key title: Input should be a valid string (got True): YAML 1.1 reads the unquoted yes (line 3) as the "
        'boolean true, not as text; write it in quotes: title: "yes"'
    )
    _write(folder, "acme.yaml", 'name: "off"\nsync_id: "no"\ntitle: "yes"\napp_token: NX-123454\n')
    (job,) = load_sync_jobs(folder)
    assert (job.name, job.sync_id, job.title) == ("off", "no", "yes")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("title: 2024-01-01", "key title: Input should be a valid string: YAML reads the unquoted 2024-01-01 (line 4) "
                              'as a date, not as text; write it in quotes: title: "2024-01-01"'),
        ("title: 1.5", "key title: Input should be a valid string (got 1.5): YAML reads the unquoted 1.5 (line 4) as "
                       'a number, not as text; write it in quotes: title: "1.5"'),
        ("title: ~", "key title: Input should be a valid string: YAML 1.1 reads the unquoted ~ (line 4) as no value "
                     '(null), not as text; give a value, or write it in quotes if you mean that text: title: "~"'),
        ("title:", "key title: Input should be a valid string: the key has no value (line 4); give one or remove "
                   "the key"),
        ("filters: {user_ids_include: [u1, on]}", "key filters.user_ids_include.1: Input should be a valid string "
         '(got True): YAML 1.1 reads the unquoted on (line 4) as the boolean true, not as text; write it in quotes: "on"'),
        ("destination: {kind: s3, bucket: acme-lake, sse: off}", "key destination.s3.sse: Input should be 'none', "
         "'AES256' or 'aws:kms' (got False): YAML 1.1 reads the unquoted off (line 4) as the boolean false"),
    ],
    ids=["date", "number", "tilde", "empty", "list_item", "literal"],
)
def test_values_yaml_does_not_read_as_text_get_a_hint(tmp_path, line, expected):
    path = _write(tmp_path, "acme.yaml", f'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\n{line}\n')
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value).startswith("sync job file acme.yaml: invalid configuration\n")
    assert expected in str(err.value), str(err.value)


def test_a_key_yaml_reads_as_a_boolean_is_refused(tmp_path):
    path = _write(tmp_path, "acme.yaml", 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\nfilters: {on: x}\n')
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(path)
    assert str(err.value) == (
        "sync job file acme.yaml: key filters.on: YAML 1.1 reads the unquoted on (line 4) as the boolean true, "
        'not as text; write the key in quotes: "on":'
    )


def test_booleans_in_boolean_keys_still_load(tmp_path):
    path = _write(tmp_path, "acme.yaml", 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\nenabled: off\n')
    assert load_sync_job_file(path).enabled is False


# ------------------------------------------------------------------------------ encodings
def test_a_latin1_file_is_a_clean_error_naming_file_line_and_key(tmp_path):
    folder = tmp_path / "jobs"
    _write(folder, "acme.yaml", 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\ntitle: Caf\xe9 prod\n'
           .encode("latin-1"))
    assert _load_error(folder) == (
        "sync job file acme.yaml: not UTF-8 text (key title, line 4, column 11: byte 0xe9). "
        "Save the file with the UTF-8 encoding."
    )


def test_a_utf16_file_is_a_clean_error(tmp_path):
    path = _write(tmp_path, "acme.yaml", 'name: acme_prod\nsync_id: "13214"\n'.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"^sync job file acme.yaml: not UTF-8 text \(line 1, column 1: byte 0xff\)"):
        load_sync_job_file(path)


def test_utf8_text_with_a_bom_loads(tmp_path):
    data = '\ufeffname: acme_prod\nsync_id: "13214"\napp_token: NX-123454\ntitle: Café\n'.encode()
    assert load_sync_job_file(_write(tmp_path, "acme.yaml", data)).title == "Café"


# ------------------------------------------------------------------------------ one HTTPS/loopback rule
@pytest.mark.parametrize(
    "host, loopback",
    [("localhost", True), ("LOCALHOST", True), ("api.localhost", True), ("localhost.localdomain", True),
     ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("10.0.0.5", False),
     ("localhost.example.com", False), ("", False), (None, False)],
)
def test_is_loopback_is_one_rule(host, loopback):
    assert net.is_loopback(host) is loopback
    assert urls.is_loopback(host) is loopback


def test_require_https_keeps_its_message_everywhere():
    message = "S3 endpoint_url http://10.0.0.5 is not allowed: endpoints that are not loopback must use https://"
    with pytest.raises(ValueError) as plain:
        net.require_https("http://10.0.0.5:9000/x?sig=1", "S3 endpoint_url")
    assert str(plain.value) == message
    with pytest.raises(DestinationError) as dest:
        destination_require_https("http://10.0.0.5:9000/x?sig=1", "S3 endpoint_url")
    assert str(dest.value) == message
    assert net.require_https("localhost:4443", "STORAGE_EMULATOR_HOST") == "localhost:4443"
    assert net.require_https("https://s3.example", "endpoint") == "https://s3.example"


def test_config_imports_neither_source_nor_destination():
    code = (
        "import sys\n"
        "from userpilot_sync.config.model import SyncJob\n"
        "SyncJob.model_validate({'name': 'a', 'sync_id': '1', 'app_token': 'NX-1',\n"
        "    'source': {'kind': 'export_api', 'base_url': 'http://127.0.0.1:1'},\n"
        "    'destination': {'kind': 's3', 'bucket': 'abc', 'endpoint_url': 'http://localhost:9'}})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('userpilot_sync.source', 'userpilot_sync.destination'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
