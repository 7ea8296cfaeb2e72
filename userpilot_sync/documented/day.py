"""Every documented file of one day, computed and validated before anything of the day uploads.

:func:`documented_inputs` prepares the event types the files need (identify events with the id
filters only; ``track_feature``/``track`` exactly as their exports); :func:`compute_day_files`
builds the day's :class:`DocumentedFile` handles (tables written to staging as Arrow IPC, per-tag
and per-label files streamed from the prepared export at write time) and advances the snapshot
state; the destination's writer (``destination/documented.py``) writes them in every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa

from userpilot_sync.config.model import SyncJob
from userpilot_sync.documented import feature_tags as ft
from userpilot_sync.documented.snapshots import (
    COMPANIES,
    ID_COLUMN,
    IDENTIFY_EVENT_TYPE,
    USERS,
    DayEvents,
    day_delta,
    merge_delta,
    snapshot_table,
    validate_snapshot,
)
from userpilot_sync.documented.state import STATE_FILES, PriorState, SnapshotStore
from userpilot_sync.export import PreparedExport, filter_expr, prepare_export
from userpilot_sync.partitions import day_window, parse_partition
from userpilot_sync.staging import IpcFileWriter, StagedDay

STATUS_COMPLETE = "complete"
STATUS_EMPTY = "empty"
#: A documented file the sync job lists but cannot write for the day (e.g. no lookups): no file.
STATUS_ABSENT = "absent"
#: Per-tag / per-label files: the event type they split and their key in the hive layout.
SPLITS = {"track_feature_per_tag": ("track_feature", "tag"), "track_labeled_per_label": ("track_labeled", "label")}


@dataclass
class DocumentedFile:
    """One documented file (or, for per-tag/label files, one file per id) of one day.

    ``status``: complete | empty | absent (``reason`` says why). ``table_path``: an Arrow IPC
    file in staging holding the table (snapshots, breakdown, definitions); ``split``/``ids``: the
    prepared export whose rows are split per ``event_name`` (per-tag/label files). ``facts``:
    extra manifest fields (``history_start``, ...).
    """

    name: str
    status: str
    rows: int = 0
    reason: str | None = None
    schema: pa.Schema | None = None
    table_path: str | None = None
    split: PreparedExport | None = None
    ids: set[str] | None = None
    facts: dict = field(default_factory=dict)

    def tables(self) -> Iterator[tuple[str | None, pa.Table]]:
        """``(id, table)`` per file: one ``(None, table)`` for table files, one per id for splits."""
        if self.status == STATUS_ABSENT:
            return
        if self.table_path is not None:
            reader = pa.ipc.open_file(pa.memory_map(self.table_path))
            yield None, reader.read_all()
        elif self.split is not None:
            yield from ft.split_by_id(self.split, self.ids)

    def entry(self) -> dict:
        """The file's entry in the day's manifest (``userpilot_files``)."""
        out = {"status": self.status, "rows": self.rows}
        if self.reason:
            out["reason"] = self.reason
        out.update(self.facts)
        return out


def _id_filters_only(job: SyncJob) -> SyncJob:
    f = job.filters.model_copy(update={"event_names_include": (), "event_names_exclude": ()})
    return job.model_copy(update={"filters": f})


def rows_needed(job: SyncJob) -> set[str]:
    """Event types whose exported rows the documented files read again (prepared with
    ``keep_rows``): identify_user/identify_company for the snapshots (unless name filters make
    :func:`documented_inputs` prepare them apart), track_feature for the feature-tag files, track for
    the per-label files."""
    files = set(job.userpilot_files)
    names_filtered = bool(job.filters.event_names_include or job.filters.event_names_exclude)
    needed = set()
    if not names_filtered:
        needed |= {IDENTIFY_EVENT_TYPE[n] for n in (USERS, COMPANIES) if n in files}
    if files & {"feature_tags_breakdown", "track_feature_per_tag"}:
        needed.add("track_feature")
    if "track_labeled_per_label" in files:
        needed.add("track")
    return needed


def documented_inputs(job: SyncJob, staged: StagedDay, prepared: dict[str, PreparedExport]) -> dict[str, PreparedExport]:
    """The prepared event types the documented files read, by event type.

    identify_user/identify_company: the sync job's id filters only (name filters would drop every
    identify event: their names are empty); reused from ``prepared`` when no name filter is set.
    track_feature/track: exactly as exported (reused, or prepared here when the sync job does not
    export them). An export is reused only when its rows were kept (:func:`rows_needed`); otherwise it
    is prepared again here without encoding. Raises ValidationError like
    :func:`~userpilot_sync.export.prepare_export`.
    """
    files = set(job.userpilot_files)
    out: dict[str, PreparedExport] = {}
    names_filtered = bool(job.filters.event_names_include or job.filters.event_names_exclude)
    for name in (USERS, COMPANIES):
        if name not in files:
            continue
        et = IDENTIFY_EVENT_TYPE[name]
        if et in prepared and prepared[et].rows_kept and not names_filtered:
            out[et] = prepared[et]
        else:
            out[et] = prepare_export(staged, _id_filters_only(job), et, staged.root / "prepared_files" / et,
                                     formats=(), keep_rows=True)
    needs = {"track_feature": files & {"feature_tags_breakdown", "track_feature_per_tag"},
             "track": files & {"track_labeled_per_label"}}
    for et, wanted in needs.items():
        if wanted:
            out[et] = prepared[et] if et in prepared and prepared[et].rows_kept else prepare_export(
                staged, job, et, staged.root / "prepared_files" / et, formats=(), keep_rows=True)
    return out


def _activity(job: SyncJob, staged: StagedDay, id_col: str) -> pl.DataFrame:
    """Latest event of the day per id, over every staged event type (id filters applied)."""
    files = [f for et in sorted(staged.rows_by_event_type) for f in staged.staged_files(et)]
    if not files:
        return pl.DataFrame(schema={"id": pl.String, "last_event_at": pl.Datetime("us", "UTC")})
    predicate = filter_expr(_id_filters_only(job).filters)
    frame = pl.scan_ipc(files).select("user_id", "company_id", "inserted_at")
    if predicate is not None:
        frame = frame.filter(predicate)
    return (frame.filter(pl.col(id_col).is_not_null())
            .group_by(id_col).agg(pl.col("inserted_at").max().alias("last_event_at"))
            .rename({id_col: "id"}).collect(engine="streaming"))


def _identify_frame(prepared: PreparedExport) -> pl.DataFrame:
    frame = pl.from_arrow(pa.Table.from_batches(list(prepared.iter_batches()), schema=prepared.arrow_schema))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _write_ipc(table: pa.Table, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = IpcFileWriter(path, table.schema)
    try:
        writer.write_table(table)
    finally:
        writer.close()
    return str(path)


@dataclass
class SnapshotStep:
    """The snapshot state carried from one day of a run to the next (``frames`` at end of ``day``)."""

    day: str | None
    frames: dict[str, pl.DataFrame]


def compute_day_files(job: SyncJob, staged: StagedDay, prepared: dict[str, PreparedExport], *,
                      store: SnapshotStore | None, carried: SnapshotStep | None, features_events: pa.Table | None,
                      lookups_note: str | None, run_id: str, window_start: str | None = None
                      ) -> tuple[dict[str, DocumentedFile], SnapshotStep | None]:
    """Compute and validate every documented file of one staged day.

    ``store``/``carried``: the snapshot state (``carried`` is the state the previous day of this
    run left, used when it is the recorded day before this one). ``features_events``: the lookup
    table (None when the source has none; ``lookups_note`` says why). Records the day's deltas and
    state in ``store``. Returns the files by name (in ``job.userpilot_files`` order) and the state
    to carry to the next day. Raises ValidationError (naming sync job, partition and file).
    """
    pk = staged.partition
    files = set(job.userpilot_files)
    out: dict[str, DocumentedFile] = {}
    if not files:
        return out, carried
    inputs = documented_inputs(job, staged, prepared)
    folder = staged.root / "documented"
    _, day_end = day_window(parse_partition(pk))
    step = carried
    if files & {USERS, COMPANIES}:
        assert store is not None
        if carried is not None and carried.day == store.previous_day(pk) and carried.day is not None:
            prior = PriorState(carried.day, store.chain(carried.day), store.history_start(), carried.frames)
        else:
            prior = store.prior_state(pk)
        deltas, states = {}, {}
        for name in STATE_FILES:
            id_col = ID_COLUMN[name]
            et = IDENTIFY_EVENT_TYPE[name]
            identify = _identify_frame(inputs[et]) if et in inputs else None
            if identify is None:  # the file is not written: an empty delta keeps the chain defined
                deltas[name] = prior.frames[name].clear()
            else:
                deltas[name] = day_delta(name, DayEvents(identify, _activity(job, staged, id_col)))
            states[name] = merge_delta(name, prior.frames[name], deltas[name])
        entry = store.record_day(pk, deltas, states, run_id=run_id, window_start=window_start)
        history_start = min(d for d in [store.history_start(), pk] if d)
        facts = {"history_start": history_start, "previous_day": prior.day, "state_chain": entry["chain"][:16]}
        rebuilt = [d for d, e in store.index["days"].items() if d < pk and e.get("rebuilt_from_identify_events")]
        if rebuilt:  # a lost state was rebuilt from identify events: say how far last_event_at is partial
            facts["last_event_at_identify_events_only_through"] = max(rebuilt)
        with_props = "metadata" not in job.filters.exclude_columns
        for name in (USERS, COMPANIES):
            if name not in files:
                continue
            table = validate_snapshot(name, snapshot_table(name, states[name], with_properties=with_props),
                                      sync_job=job.name, partition=pk, day_end=day_end)
            out[name] = DocumentedFile(
                name, STATUS_COMPLETE if table.num_rows else STATUS_EMPTY, rows=table.num_rows,
                reason=None if table.num_rows else f"no {IDENTIFY_EVENT_TYPE[name]} event since the history start "
                                                   f"{history_start}",
                schema=table.schema, table_path=_write_ipc(table, folder / f"{name}.arrow"),
                facts=dict(facts))
        step = SnapshotStep(pk, states)
    if "feature_tags_breakdown" in files:
        names = ft.feature_tag_names(features_events)
        table = ft.breakdown_table(inputs["track_feature"].iter_batches(), names, sync_job=job.name, partition=pk)
        out["feature_tags_breakdown"] = DocumentedFile(
            "feature_tags_breakdown", STATUS_COMPLETE if table.num_rows else STATUS_EMPTY, rows=table.num_rows,
            reason=None if table.num_rows else "no track_feature event exported for the day",
            schema=table.schema, table_path=_write_ipc(table, folder / "feature_tags_breakdown.arrow"))
    if "feature_tags_definitions" in files:
        if features_events is None:
            out["feature_tags_definitions"] = DocumentedFile("feature_tags_definitions", STATUS_ABSENT,
                                                             reason=lookups_note or "the source has no lookups")
        else:
            table = ft.definitions_table(features_events, sync_job=job.name, partition=pk)
            out["feature_tags_definitions"] = DocumentedFile(
                "feature_tags_definitions", STATUS_COMPLETE if table.num_rows else STATUS_EMPTY, rows=table.num_rows,
                reason=None if table.num_rows else "the app defines no feature tag",
                schema=table.schema, table_path=_write_ipc(table, folder / "feature_tags_definitions.arrow"))
    if "track_feature_per_tag" in files:
        source = inputs["track_feature"]
        out["track_feature_per_tag"] = DocumentedFile(
            "track_feature_per_tag", STATUS_COMPLETE if source.rows else STATUS_EMPTY, rows=source.rows,
            reason=None if source.rows else "no track_feature event exported for the day (no file)",
            schema=source.arrow_schema, split=source)
    if "track_labeled_per_label" in files:
        if features_events is None:
            out["track_labeled_per_label"] = DocumentedFile(
                "track_labeled_per_label", STATUS_ABSENT,
                reason=(lookups_note or "the source has no lookups") + "; labeled events are known from the "
                       "features_events lookup")
        else:
            labels = ft.labeled_event_ids(features_events)
            source = inputs["track"]
            rows = _count_ids(source, labels)
            out["track_labeled_per_label"] = DocumentedFile(
                "track_labeled_per_label", STATUS_COMPLETE if rows else STATUS_EMPTY, rows=rows,
                reason=None if rows else "no track event of a labeled event for the day (no file)",
                schema=source.arrow_schema, split=source, ids=labels)
    return {n: out[n] for n in job.userpilot_files if n in out}, step


def _count_ids(prepared: PreparedExport, ids: set[str]) -> int:
    if not ids or not prepared.files:
        return 0
    return (pl.scan_ipc(prepared.files).filter(pl.col("event_name").is_in(sorted(ids)))
            .select(pl.len()).collect(engine="streaming").item())


def rebuild_deltas(job: SyncJob, staged_days: list[StagedDay], store: SnapshotStore, *, run_id: str) -> None:
    """Record the snapshot deltas of ``staged_days`` (identify events only, in day order) in
    ``store``: the rebuild of a lost state. Days that failed staging are skipped (logged by the
    caller's manifest facts as gaps). Raises ValidationError."""
    carried: SnapshotStep | None = None
    for staged in staged_days:
        if staged.error:
            continue
        pk = staged.partition
        if carried is not None and carried.day == store.previous_day(pk):
            frames = carried.frames
        else:
            frames = store.prior_state(pk).frames
        deltas, states = {}, {}
        for name in STATE_FILES:
            et = IDENTIFY_EVENT_TYPE[name]
            if name in job.userpilot_files:
                prepared = prepare_export(staged, _id_filters_only(job), et, staged.root / "prepared_files" / et,
                                          formats=(), keep_rows=True)
                deltas[name] = day_delta(name, DayEvents(_identify_frame(prepared), _activity(job, staged, ID_COLUMN[name])))
            else:
                deltas[name] = frames[name].clear()
            states[name] = merge_delta(name, frames[name], deltas[name])
        store.record_day(pk, deltas, states, run_id=run_id, rebuilt=True)
        carried = SnapshotStep(pk, states)
