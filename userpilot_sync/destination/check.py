"""Write-only connection check of a sync job's destination (before its first sync).

An empty day must not hide a broken configuration, so a destination can be verified on its own:
:func:`check_destination` uploads one small marker object (and, on S3, starts and aborts one
multipart upload) using exactly the permissions a sync uses, and says in plain words what failed.
It never reads, lists or deletes. The marker key is deterministic (no timestamp), so repeated
checks replace one object instead of piling up:

    <prefix>/<sync folder>/_userpilot_sync_check/<sync job name>.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from userpilot_sync.config.model import SyncJob
from userpilot_sync.destination.storage import Storage
from userpilot_sync.errors import DestinationError

CHECK_FOLDER = "_userpilot_sync_check"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check_destination`.

    ``ok``: every step passed; ``uri``: the marker object; ``steps``: step name -> "ok" or what
    failed; ``problems``: the failures in plain words (empty when ok).
    """

    ok: bool
    uri: str
    key: str
    steps: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.ok:
            return f"destination reachable and writable: wrote {self.uri}"
        return "destination check failed: " + "; ".join(self.problems)


def marker_key(job: SyncJob) -> str:
    """Object key of the connection-check marker of ``job``."""
    from userpilot_sync.destination.layout import layout_for

    return layout_for(job).key(f"{CHECK_FOLDER}/{job.name}.json")


def marker_bytes(job: SyncJob) -> bytes:
    """Body of the marker: what wrote it and why (no timestamp, no secrets)."""
    body = {"written_by": "userpilot_sync", "purpose": "destination connection check", "sync_job": job.name,
            "sync_id": job.sync_id, "app_token": job.app_token, "destination": job.destination.fingerprint()}
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_destination(job: SyncJob, storage: Storage) -> CheckResult:
    """Upload the marker to ``storage`` (and probe multipart abort on S3); never raises DestinationError.

    Unexpected errors other than DestinationError propagate.
    """
    key = marker_key(job)
    steps: dict[str, str] = {}
    problems: list[str] = []
    try:
        storage.put_bytes(key, marker_bytes(job), content_type="application/json")
        steps["put_marker"] = "ok"
    except DestinationError as exc:
        exists = type(exc).__name__ == "ObjectExistsError"
        if exists:
            # GCS overwrite: refuse: an earlier check left the marker; create permission was
            # proven then and cannot be re-proven without deleting it.
            steps["put_marker"] = "ok (marker from an earlier check exists; overwrite is refused)"
        else:
            steps["put_marker"] = str(exc)
            problems.append(f"uploading the marker object failed: {exc}")
    probe = getattr(storage, "check_multipart", None)
    if probe is not None:
        try:
            probe(key + ".multipart")
            steps["multipart_abort"] = "ok"
        except DestinationError as exc:
            steps["multipart_abort"] = str(exc)
            problems.append(f"starting/aborting a multipart upload failed (large files would fail): {exc}")
    return CheckResult(ok=not problems, uri=storage.uri(key), key=key, steps=steps, problems=problems)
