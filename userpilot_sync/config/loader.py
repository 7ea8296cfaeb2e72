"""Load sync jobs from YAML: one document per file in ``sync_jobs/`` (or ``$USERPILOT_SYNC_JOBS_DIR``).

Errors are :class:`~userpilot_sync.errors.ConfigError` naming the file and the key. Beyond the
model's rules, the loader refuses what YAML would otherwise accept silently:

* a key given twice in one mapping (YAML keeps the last value without a word);
* a file that is not UTF-8 text (named with the line and, where it can be found, the key);
* a value YAML 1.1 reads as a boolean, null, number or date where text is expected
  (``name: off``, ``title: yes``, ``sync_id: no``) gets a hint to write it in quotes.
  The one exception is the key ``on`` of a ``notifications`` entry (``on: [failed, late]``),
  which is read as the text ``on``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


#: Tags of plain (unquoted) scalars that YAML 1.1 does not read as text, and what they became.
_NOT_TEXT = {
    "tag:yaml.org,2002:bool": "the boolean",
    "tag:yaml.org,2002:null": "no value (null)",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:timestamp": "a date",
}
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class _Plain:
    """An unquoted scalar that YAML did not read as text: its text, its tag and its line (1-based)."""

    text: str
    tag: str
    line: int


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _key_text(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _is_on_key(path: tuple, key: yaml.Node) -> bool:
    """The unquoted key ``on`` of a ``notifications`` entry (YAML 1.1 reads it as the boolean true).

    ``on: [failed, late]`` is the documented spelling there, so it is read as the text ``on``
    instead of being refused like other keys that YAML reads as booleans.
    """
    return (
        len(path) == 2 and path[0] == "notifications" and isinstance(path[1], int)
        and isinstance(key, yaml.ScalarNode) and key.style is None and key.value == "on"
        and key.tag == "tag:yaml.org,2002:bool"
    )


def _walk(filename: str, node: yaml.Node, path: tuple, plain: dict[tuple, _Plain], seen: set[int]) -> None:
    """Check a composed YAML node tree: duplicate keys, keys that are not text; collect non-text scalars.

    Raises ConfigError naming the file, the key and its lines.
    """
    if id(node) in seen:  # an alias of a node already checked (or a recursive alias)
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.ScalarNode):
        if node.style is None and node.tag in _NOT_TEXT:
            plain[path] = _Plain(node.value, node.tag, node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(filename, item, path + (i,), plain, seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG:  # "<<: *base": merged keys may be overridden, on purpose
                continue
            text = _key_text(key)
            if text is None:
                continue
            line = key.start_mark.line + 1
            if _is_on_key(path, key):
                key.tag = "tag:yaml.org,2002:str"  # notifications[i].on: the key, not the boolean true
            if key.style is None and key.tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"):
                raise ConfigError(
                    f"sync job file {filename}: key {_dotted(path + (text,))}: "
                    f"{_reads_as(_Plain(text, key.tag, line))}; write the key in quotes: \"{text}\":"
                )
            if (key.tag, text) in first_line:
                first = first_line[(key.tag, text)]
                lines = f"on line {line}" if first == line else f"lines {first} and {line}"
                raise ConfigError(
                    f"sync job file {filename}: key {_dotted(path + (text,))} is given twice ({lines}); YAML "
                    f"would silently keep the last value. Keep one of them."
                )
            first_line[(key.tag, text)] = line
            _walk(filename, value, path + (text,), plain, seen)


def _parse(filename: str, text: str) -> tuple[object, dict[tuple, _Plain]]:
    """The YAML document of ``text`` and its unquoted non-text scalars by key path.

    Raises ConfigError (duplicate keys, keys YAML reads as booleans) or yaml.YAMLError (syntax).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        plain: dict[tuple, _Plain] = {}
        _walk(filename, node, (), plain, set())
        return loader.construct_document(node), plain
    finally:
        loader.dispose()


def _key_at(text: str, index: int) -> tuple | None:
    """The key path whose entry spans character ``index`` of ``text`` (best effort; None if unknown)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    path: tuple = ()
    found = None
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        entries = (
            [(_key_text(k), k, v) for k, v in node.value] if isinstance(node, yaml.MappingNode)
            else [(i, item, item) for i, item in enumerate(node.value)]
        )
        for name, first, last in entries:
            if name is not None and first.start_mark.index <= index < last.end_mark.index:
                path, node = path + (name,), last
                found = path
                break
        else:
            break
    return found


def _read_text(path: Path) -> str:
    """The file's text. Raises ConfigError naming the file (unreadable, not UTF-8: line and key)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"sync job file {path.name}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[line_start:exc.start].decode("utf-8")) + 1
        key = _key_at(raw.decode("utf-8", errors="replace"), len(raw[: exc.start].decode("utf-8")))
        where = f"key {_dotted(key)}, " if key else ""
        raise ConfigError(
            f"sync job file {path.name}: not UTF-8 text ({where}line {line}, column {column}: byte "
            f"0x{raw[exc.start]:02x}). Save the file with the UTF-8 encoding."
        ) from None


def _data_path(data: object, loc: tuple) -> tuple:
    """The key path in the YAML data of a pydantic error location (without union tags like ``s3``)."""
    path: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            continue  # a tagged-union member or validator name, not a key of the file
        path.append(part)
    return tuple(path)


def _reads_as(scalar: _Plain) -> str:
    """``YAML 1.1 reads the unquoted off (line 3) as the boolean false, not as text``."""
    what = _NOT_TEXT[scalar.tag]
    if scalar.tag == "tag:yaml.org,2002:bool":
        what = f"{what} {str(yaml.SafeLoader.bool_values.get(scalar.text.lower(), '')).lower()}"
    spec = "YAML 1.1" if scalar.tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null") else "YAML"
    return f"{spec} reads the unquoted {scalar.text or '(empty)'} (line {scalar.line}) as {what}, not as text"


def _quote_hint(path: tuple, scalar: _Plain) -> str:
    """What YAML made of an unquoted value, and how to keep it as text."""
    if scalar.tag == "tag:yaml.org,2002:null" and not scalar.text:
        return f"the key has no value (line {scalar.line}); give one or remove the key"
    label = path[-1] if path and isinstance(path[-1], str) else None
    example = f'{label}: "{scalar.text}"' if label else f'"{scalar.text}"'
    if scalar.tag == "tag:yaml.org,2002:null":
        return f"{_reads_as(scalar)}; give a value, or write it in quotes if you mean that text: {example}"
    return f"{_reads_as(scalar)}; write it in quotes: {example}"


def _format_errors(path: Path, exc: PydanticValidationError, data: object = None,
                   plain: dict[tuple, _Plain] | None = None) -> str:
    lines = [f"sync job file {path.name}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        last = str(err["loc"][-1]) if err["loc"] else ""
        if err["type"] == "extra_forbidden" or last.endswith("_env"):
            # an unknown key (secret: ..., webhook_url: ...) or a secret's variable name may hold a
            # secret pasted by mistake: never repeat it
            msg += " (the value is not repeated here)" if err["type"] != "value_error" else ""
        elif err["type"] != "value_error" and isinstance(value, (str, int, float, bool)):
            msg += f" (got {value!r})"  # value_error messages already quote the value
        yaml_path = _data_path(data, tuple(err["loc"])) if plain else ()
        scalar = (plain or {}).get(yaml_path) if yaml_path else None
        if scalar and (
            err["type"] == "string_type"
            or (err["type"] == "literal_error" and scalar.tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"))
        ):
            msg += f": {_quote_hint(yaml_path, scalar)}"
        lines.append(f"  key {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_sync_job_file(path: Path, base: Path | None = None) -> SyncJob:
    """Parse and validate one sync-job YAML file.

    Relative local paths are resolved against ``base`` (default: the parent of the file's folder).
    Raises ConfigError naming the file and the key: unreadable or non-UTF-8 file, invalid YAML,
    a key given twice, a value YAML reads as a boolean/null/number where text is expected (with a
    hint to quote it), or any rule of the sync-job model (prefix, names, formats, ...).
    """
    text = _read_text(path)
    try:
        data, plain = _parse(path.name, text)
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
        raise ConfigError(_format_errors(path, exc, data, plain)) from None
    return resolve_paths(job, base if base is not None else path.resolve().parent.parent).model_copy(
        update={"source_file": path.name}
    )


def resolve_paths(job: SyncJob, base: Path) -> SyncJob:
    """Make a local destination's ``path``, a files source's ``path`` and a local state store's
    ``path`` absolute.

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
    state = job.state
    if state.kind == "local" and state.path and not Path(state.path).is_absolute():
        update["state"] = state.model_copy(update={"path": str((base / state.path).resolve())})
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
