"""Load sync jobs from YAML: one document per file in ``sync_jobs/`` (or ``$USERPILOT_SYNC_JOBS_DIR``).

Errors are :class:`~userpilot_sync.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError as PydanticValidationError

from userpilot_sync.config.model import SyncJob
from userpilot_sync.errors import ConfigError

ENV_SYNC_JOBS_DIR = "USERPILOT_SYNC_JOBS_DIR"


def default_sync_jobs_dir() -> Path:
    """``$USERPILOT_SYNC_JOBS_DIR`` if set, else ``sync_jobs/`` at the repository root."""
    env = os.environ.get(ENV_SYNC_JOBS_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "sync_jobs"


def _format_errors(path: Path, exc: PydanticValidationError) -> str:
    lines = [f"sync job file {path.name}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] != "value_error" and isinstance(value, (str, int, float, bool)):
            msg += f" (got {value!r})"  # value_error messages already quote the value
        lines.append(f"  key {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_sync_job_file(path: Path, base: Path | None = None) -> SyncJob:
    """Parse and validate one sync-job YAML file.

    Relative local paths are resolved against ``base`` (default: the parent of the file's folder).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"sync job file {path.name}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sync job file {path.name}: expected a mapping of keys (name, sync_id, ...)")
    try:
        job = SyncJob.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    return resolve_paths(job, base if base is not None else path.resolve().parent.parent).model_copy(
        update={"source_file": path.name}
    )


def resolve_paths(job: SyncJob, base: Path) -> SyncJob:
    """Make a local destination's ``path`` and a files source's ``path`` absolute.

    Relative paths are relative to ``base``, the project folder (the parent of the sync-jobs
    folder), never to the working directory: the destination of a sync job must not depend on
    where a command is started (its fingerprint is the resolved path).
    """
    update = {}
    dest = job.destination
    if dest.kind == "local" and not Path(dest.path).is_absolute():
        update["destination"] = dest.model_copy(update={"path": str((base / dest.path).resolve())})
    src = job.source
    if src.kind == "files" and not Path(src.path).is_absolute():
        update["source"] = src.model_copy(update={"path": str((base / src.path).resolve())})
    return job.model_copy(update=update) if update else job


def load_sync_jobs(directory: Path | None = None) -> list[SyncJob]:
    """All sync jobs of a folder (``*.yaml``/``*.yml``, sorted), checked for duplicate names/ids."""
    directory = Path(directory) if directory else default_sync_jobs_dir()
    if not directory.is_dir():
        raise ConfigError(f"sync jobs folder {directory} does not exist (set {ENV_SYNC_JOBS_DIR})")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    jobs = [load_sync_job_file(p) for p in files]
    for attr in ("name", "sync_id"):
        seen: dict[str, str] = {}
        for job in jobs:
            value = getattr(job, attr)
            if value in seen:
                raise ConfigError(
                    f"sync job file {job.source_file}: key {attr}: {value!r} is already used by {seen[value]}; "
                    f"every sync job needs its own {attr}"
                )
            seen[value] = job.source_file or "?"
    return jobs
