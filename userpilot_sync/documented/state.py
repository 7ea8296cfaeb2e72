"""The state store of the user and company snapshots (DESIGN.md decision 18).

The destination is write-only, so the state a snapshot is computed from lives elsewhere: a local
folder (``state: {kind: local, path}``; default ``<staging root>/_state``), or an S3 or GCS prefix
the exporter may read, write, list and delete (``state: {kind: s3|gcs, bucket, prefix}``) — the
shape for several machines. Per sync job, under ``<root>/<sync job>/``:

* ``deltas/<day>.<file>.parquet`` — the day's delta (``snapshots.day_delta``) for ``all_users``
  and ``all_companies``: what the day's events change; kept for every day inside the window;
* ``states/<day>.<file>.parquet`` — a full snapshot at the end of ``<day>``, kept for the newest
  day and every ``checkpoint_every_days``-th day (bounded disk: about 365/N full states);
* ``index.json`` — written last: per day its delta's sha256, ``basis`` (the chain value of the
  previous recorded day when the day was computed) and ``chain`` = sha256(basis + delta sha).

A day E is **stale** when its ``basis`` differs from the chain of the recorded day before it
now: an earlier day was (re-)exported after E was computed, so E's snapshots miss that change.
:meth:`SnapshotStore.stale_days` lists them; the automation re-exports them in one range run.
The state at the end of any recorded day is rebuilt from the newest full state before the
first stale day plus the deltas after it, never from the destination.

Errors: StateError (a missing or unreadable state object; delete the store folder to rebuild it
from the source within the 365-day window).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import pyarrow.parquet as pq

from userpilot_sync.documented.snapshots import COMPANIES, USERS, empty_state, merge_delta
from userpilot_sync.errors import UserpilotSyncError

INDEX = "index.json"
GENESIS = "genesis"
STATE_FILES = (USERS, COMPANIES)


class StateError(UserpilotSyncError):
    """The snapshot state store is missing an object it recorded, or cannot be read/written."""


class Backend(Protocol):
    """Object access under one sync job's state prefix (names are relative, ``/``-separated)."""

    where: str

    def get(self, name: str) -> bytes | None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


class LocalBackend:
    """A local folder; writes are atomic (temporary file + rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = f"local folder {self.root}"

    def get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class S3Backend:
    """An S3 prefix (boto3; credentials from the standard AWS chain)."""

    def __init__(self, bucket: str, prefix: str, *, region: str | None = None, endpoint_url: str | None = None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.session.Session(region_name=region).client("s3", endpoint_url=endpoint_url)
        self.where = f"s3://{bucket}/{self.prefix}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))


class GcsBackend:
    """A GCS prefix (google-cloud-storage; credentials as for a GCS destination)."""

    def __init__(self, config: Any, prefix: str):
        from userpilot_sync.destination.gcs import build_gcs_client

        self.bucket = build_gcs_client(config).bucket(config.bucket)
        self.prefix = prefix.strip("/")
        self.where = f"gs://{config.bucket}/{self.prefix}"

    def get(self, name: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(f"{self.prefix}/{name}").download_as_bytes()
        except NotFound:
            return None

    def put(self, name: str, data: bytes) -> None:
        self.bucket.blob(f"{self.prefix}/{name}").upload_from_string(data)

    def delete(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(f"{self.prefix}/{name}").delete()
        except NotFound:
            pass


#: A folder for the local state stores that name no ``path`` (default: ``<staging root>/_state``):
#: set it to a folder every worker shares when runs of one sync job run on several workers.
STATE_DIR_ENV = "USERPILOT_SYNC_STATE_DIR"


def local_state_root(job: Any, staging_root: Path | str) -> Path | None:
    """The folder of a local state store: ``state.path``, else ``$USERPILOT_SYNC_STATE_DIR``, else
    ``<staging root>/_state`` (None for S3/GCS stores)."""
    if job.state.kind != "local":
        return None
    return Path(job.state.path or os.environ.get(STATE_DIR_ENV) or Path(staging_root) / "_state")


def state_is_worker_local(job: Any) -> bool:
    """True when the state store is the default folder inside a worker's own staging: fine on one
    machine, wrong when runs of the sync job go to several workers (each would chain alone)."""
    return job.state.kind == "local" and not job.state.path and not os.environ.get(STATE_DIR_ENV)


def backend_for(job: Any, staging_root: Path | str) -> Backend:
    """The state backend of a sync job (its ``state`` setting), rooted at ``<root>/<sync job>``."""
    state = job.state
    if state.kind == "local":
        return LocalBackend(local_state_root(job, staging_root) / job.name)
    prefix = f"{state.prefix.strip('/')}/{job.name}".strip("/")
    if state.kind == "s3":
        return S3Backend(state.bucket, prefix, region=state.region, endpoint_url=state.endpoint_url)
    return GcsBackend(state, prefix)


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(frame.to_arrow(), buf, compression="zstd", row_group_size=256_000)
    return buf.getvalue()


def _read_parquet(data: bytes) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(data))  # straight into polars: no Arrow copy held beside it


@dataclass
class PriorState:
    """The snapshots' state at the end of ``day`` (None: nothing recorded before), its chain
    value (the ``basis`` of the next day) and the history start it covers."""

    day: str | None
    chain: str
    history_start: str | None
    frames: dict[str, pl.DataFrame]


class SnapshotStore:
    """One sync job's snapshot state (see the module docstring). Not safe for two writers at
    once: runs of one app token hold its pool's single slot, which serialises them."""

    def __init__(self, backend: Backend, sync_job: str, checkpoint_every_days: int = 30):
        self.backend = backend
        self.sync_job = sync_job
        self.every = checkpoint_every_days
        self._index: dict | None = None

    # ------------------------------------------------------------------ index
    @property
    def index(self) -> dict:
        if self._index is None:
            try:
                raw = self.backend.get(INDEX)
            except Exception as exc:  # noqa: BLE001 - any backend failure: name the store
                raise StateError(f"sync job {self.sync_job!r}: cannot read the snapshot state store "
                                 f"({self.backend.where}): {type(exc).__name__}: {exc}") from None
            self._index = json.loads(raw) if raw else {"version": 1, "sync_job": self.sync_job, "days": {},
                                                       "states": []}
        return self._index

    @property
    def exists(self) -> bool:
        """Whether anything was recorded (an empty store means: start, or rebuild, the history)."""
        return bool(self.index["days"])

    def days(self) -> list[str]:
        return sorted(self.index["days"])

    def history_start(self) -> str | None:
        days = self.days()
        return days[0] if days else None

    def previous_day(self, day: str) -> str | None:
        """The newest recorded day before ``day``."""
        before = [d for d in self.days() if d < day]
        return before[-1] if before else None

    def chain(self, day: str | None) -> str:
        return GENESIS if day is None else self.index["days"][day]["chain"]

    def stale_days(self) -> list[str]:
        """Recorded days whose snapshots miss a change of an earlier day (first stale day and
        every recorded day after it), oldest first."""
        days = self.days()
        for i, day in enumerate(days):
            expected = self.chain(days[i - 1]) if i else GENESIS
            if self.index["days"][day]["basis"] != expected:
                return days[i:]
        return []

    # ------------------------------------------------------------------ state
    def prior_state(self, day: str) -> PriorState:
        """The state at the end of the recorded day before ``day`` (empty before the history).

        Starts from the newest full state that is not stale and replays the recorded deltas after
        it. Raises StateError when a recorded object is missing.
        """
        prev = self.previous_day(day)
        if prev is None:
            return PriorState(None, GENESIS, None, {n: empty_state(n) for n in STATE_FILES})
        stale = self.stale_days()
        first_stale = stale[0] if stale else None
        candidates = [s for s in self.index["states"] if s <= prev and (first_stale is None or s < first_stale)]
        base = max(candidates) if candidates else None
        if base is None and self.history_start() not in (None,) and self.index.get("pruned_before"):
            raise StateError(self._missing(f"a full state before {prev}"))
        frames = {n: (self._load(f"states/{base}.{n}.parquet") if base else empty_state(n)) for n in STATE_FILES}
        replay = [d for d in self.days() if (base is None or d > base) and d <= prev]
        for n in STATE_FILES:
            # the deltas combined first (small), then one merge with the full state
            combined = None
            for d in replay:
                delta = self._load(f"deltas/{d}.{n}.parquet")
                combined = delta if combined is None else merge_delta(n, combined, delta, keep_unidentified=True)
            if combined is not None:
                frames[n] = merge_delta(n, frames[n], combined)
        return PriorState(prev, self.chain(prev), self.history_start(), frames)

    def _missing(self, what: str) -> str:
        return (f"sync job {self.sync_job!r}: the snapshot state store ({self.backend.where}) is missing {what}; "
                f"delete its folder for this sync job and re-export: the state is rebuilt from the source "
                f"(within the 365-day window)")

    def _load(self, name: str) -> pl.DataFrame:
        data = self.backend.get(name)
        if data is None:
            raise StateError(self._missing(name))
        return _read_parquet(data)

    def record_day(self, day: str, deltas: dict[str, pl.DataFrame], states: dict[str, pl.DataFrame], *,
                   run_id: str, rebuilt: bool = False, window_start: str | None = None) -> dict:
        """Record day ``day``: its deltas, its full state when it is a checkpoint or the newest
        day, then the index (last). Returns the day's index entry."""
        digest = hashlib.sha256()
        for n in STATE_FILES:
            data = _parquet_bytes(deltas[n])
            digest.update(hashlib.sha256(data).digest())
            self.backend.put(f"deltas/{day}.{n}.parquet", data)
        basis = self.chain(self.previous_day(day))
        delta_sha = digest.hexdigest()
        entry = {"delta": delta_sha, "basis": basis,
                 "chain": hashlib.sha256(f"{basis}:{delta_sha}".encode()).hexdigest(),
                 "run_id": run_id, "rebuilt_from_identify_events": rebuilt}
        index = self.index
        index["days"][day] = entry
        newest = max(index["days"])
        keep = set(s for s in index["states"] if s != day)
        if day == newest or date.fromisoformat(day).toordinal() % self.every == 0:
            for n in STATE_FILES:
                self.backend.put(f"states/{day}.{n}.parquet", _parquet_bytes(states[n]))
            keep.add(day)
        # full states: the newest day's and checkpoints only (bounded disk)
        for s in sorted(keep):
            if s != newest and date.fromisoformat(s).toordinal() % self.every != 0:
                keep.discard(s)
                for n in STATE_FILES:
                    self.backend.delete(f"states/{s}.{n}.parquet")
        index["states"] = sorted(keep)
        if window_start:
            self._prune(window_start)
        self.backend.put(INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
        return entry

    def _prune(self, window_start: str) -> None:
        """Forget what lies before the newest full state at or before the window's first day
        (days outside the window can never be re-exported, so nothing replays from before it)."""
        index = self.index
        bases = [s for s in index["states"] if s <= window_start]
        if not bases:
            return
        base = max(bases)
        for s in [s for s in index["states"] if s < base]:
            index["states"].remove(s)
            for n in STATE_FILES:
                self.backend.delete(f"states/{s}.{n}.parquet")
        for d in [d for d in index["days"] if d < base]:
            for n in STATE_FILES:
                self.backend.delete(f"deltas/{d}.{n}.parquet")
            # keep the entry's chain facts (small) so later days' bases still check out
            index["days"][d]["pruned"] = True
        index["pruned_before"] = base
