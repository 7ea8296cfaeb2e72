"""The user/company snapshot benchmark (``snapshot_1m``, ``snapshot_1m_replay``): data and children.

Days: C, a checkpoint day of the state store (``toordinal() % 30 == 0``), then C+1 .. C+31; the
timed day T = C+31 is the last one on or before the benchmark day.

* ``snapshot_setup`` (not timed; the parent caches its output under ``benchmarks/.data/``): a
  :class:`~userpilot_sync.documented.state.SnapshotStore` on a ``LocalBackend`` with the 31 days
  C .. C+30 recorded through the real functions (``day_delta`` -> ``merge_delta`` ->
  ``record_day``), so every file is what the exporter writes. Day C identifies N users (5-10
  property keys each: email, name, plan, role, signed_up_at + up to 5 of title, country, seats,
  locale, beta_opt_in; ~5 % without company) and N/50 companies; every later day is a "normal"
  day (:func:`day_events`). The store then holds the full states of C (checkpoint) and C+30
  (newest, also a checkpoint) and the 31 deltas.
* ``snapshot`` (timed): on a copy of the store, the snapshot work of day T in the order of
  ``documented.day.compute_day_files``: ``prior_state`` (loads the newest full state, C+30),
  ``day_delta`` and ``merge_delta`` per file, ``record_day``, then per file ``snapshot_table`` +
  ``validate_snapshot`` and the real writer (``destination.formats.write_parts``, Parquet/zstd).
* ``snapshot_replay`` (timed): on a copy of the store, ``prior_state(C+30)`` -- a re-export of
  the newest day: its prior state (end of C+29) is the checkpoint C plus 29 replayed deltas.

A normal day (``day_events``): identify_user events for 10 % of the users (one event each, a
second one for a fifth of them; every event sets ``plan`` and ``last_seen_at``, half rename the
user, 30 % add a day-specific ``last_campaign`` key, 10 % set ``role`` to null, 5 % change
``seats``; 2 % move to another company), 0.05 % sign-ups (full profile), identify_company events
for 10 % of the companies, activity rows (latest event per id) for 20 % of the users plus every
identified user plus 1 % never-identified ids (dropped by the merge); company activity is the
latest event of the active users of each company.

Each child prints one JSON line (``wall_s``, ``maxrss_kb`` and its figures) as its last line.
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

CHECKPOINT_EVERY = 30
SYNC_JOB = "bench"
PLANS = ("free", "starter", "growth", "enterprise")
ROLES = ("admin", "member", "viewer", "owner", "billing")
TITLES = ("CTO", "Engineer", "Product Manager", "Designer", "Analyst", "Support", "Founder")
COUNTRIES = ("US", "DE", "FR", "GB", "IN", "BR", "JP", "CA", "AU", "ES")
LOCALES = ("en-US", "de-DE", "fr-FR", "en-GB", "hi-IN", "pt-BR")
INDUSTRIES = ("SaaS", "Fintech", "Retail", "Health", "Education", "Media")
_MUL_USER = 0x9E3779B97F4A7C15  # odd: i -> i * M mod 2**64 is a bijection (unique, unordered ids)
_MUL_COMPANY = 0xC2B2AE3D27D4EB4F
_MUL_ANON = 0x165667B19E3779F9
_DAY_US = 86_400 * 1_000_000
_TS = pl.Datetime("us", "UTC")


# ------------------------------------------------------------------------------- days and ids
def bench_days(bench_day: str) -> list[str]:
    """C .. C+31 (32 days): C a checkpoint day, C+31 (the timed day) on or before ``bench_day``."""
    c = date.fromisoformat(bench_day).toordinal() - 31
    c -= c % CHECKPOINT_EVERY
    return [date.fromordinal(c + i).isoformat() for i in range(32)]


def signups_per_day(users: int) -> int:
    return max(users // 2000, 1)


def companies_for(users: int) -> int:
    return max(users // 50, 1)


def _hex_ids(prefix: str, idx: np.ndarray, mul: int) -> pl.Series:
    hashed = idx.astype(np.uint64) * np.uint64(mul)  # wraps mod 2**64
    return pl.Series([f"{prefix}{int(x):016x}" for x in hashed], dtype=pl.String)


def _pick(values: tuple[str, ...], index: pl.Expr) -> pl.Expr:
    return index.replace_strict(dict(enumerate(values)), return_dtype=pl.String)


def _day_start_us(day: str) -> int:
    d = date.fromisoformat(day)
    return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()) * 1_000_000


def _company_index(u: pl.Expr, companies: int) -> pl.Expr:
    """The company of user ``u`` (null for ~5 % of the users)."""
    return pl.when((u * 7919) % 20 == 0).then(None).otherwise(u % companies)


def _times(rng: np.random.Generator, n: int, day: str) -> pl.Series:
    return pl.Series(_day_start_us(day) + rng.integers(0, _DAY_US, size=n), dtype=pl.Int64).cast(_TS)


def _event_ids(rng: np.random.Generator, n: int) -> pl.Series:
    return pl.Series([f"{int(x):016x}" for x in rng.integers(0, 2**63, size=n, dtype=np.int64)], dtype=pl.String)


def _q(expr: pl.Expr) -> pl.Expr:
    return pl.concat_str([pl.lit('"'), expr, pl.lit('"')])


def _with_company_ids(frame: pl.DataFrame, companies: int) -> pl.DataFrame:
    """Add ``company_id`` (text) from the ``c`` (company index, nullable) column."""
    idx = frame.get_column("c")
    ids = _hex_ids("cmp_", idx.fill_null(0).to_numpy(), _MUL_COMPANY)
    return frame.with_columns(pl.when(idx.is_null()).then(None).otherwise(ids).alias("company_id"))


# ------------------------------------------------------------------------------- events of one day
def _profile_metadata(u: pl.Expr, user_id: pl.Expr) -> pl.Expr:
    """A full user profile: 5 keys + (u % 6) of 5 extra keys, as JSON text."""
    extra = u % 6
    parts = [
        pl.lit('{"email":'), _q(pl.concat_str([user_id, pl.lit("@example.com")])),
        pl.lit(',"name":'), _q(pl.concat_str([pl.lit("User "), u.cast(pl.String)])),
        pl.lit(',"plan":'), _q(_pick(PLANS, u % len(PLANS))),
        pl.lit(',"role":'), _q(_pick(ROLES, u % len(ROLES))),
        pl.lit(',"signed_up_at":'), _q(pl.concat_str([pl.lit("2024-"), (1 + u % 12).cast(pl.String).str.zfill(2),
                                                     pl.lit("-"), (1 + u % 28).cast(pl.String).str.zfill(2)])),
    ]
    extras = [
        pl.concat_str([pl.lit(',"title":'), _q(_pick(TITLES, u % len(TITLES)))]),
        pl.concat_str([pl.lit(',"country":'), _q(_pick(COUNTRIES, u % len(COUNTRIES)))]),
        pl.concat_str([pl.lit(',"seats":'), (1 + u % 50).cast(pl.String)]),
        pl.concat_str([pl.lit(',"locale":'), _q(_pick(LOCALES, u % len(LOCALES)))]),
        pl.concat_str([pl.lit(',"beta_opt_in":'), pl.when(u % 2 == 0).then(pl.lit("true")).otherwise(pl.lit("false"))]),
    ]
    parts += [pl.when(extra > i).then(e).otherwise(pl.lit("")) for i, e in enumerate(extras)]
    return pl.concat_str(parts + [pl.lit("}")])


def _update_metadata(r: pl.Expr, u: pl.Expr, k: int, day: str) -> pl.Expr:
    """A day's profile change: ``plan`` and ``last_seen_at`` always, other keys by ``r`` in [0, 1)."""
    parts = [
        pl.lit('{"plan":'), _q(_pick(PLANS, (u + k) % len(PLANS))),
        pl.lit(f',"last_seen_at":"{day}"'),
        pl.when(r < 0.5).then(pl.concat_str([pl.lit(',"name":"User '), u.cast(pl.String), pl.lit(f' ({k})"')]))
        .otherwise(pl.lit("")),
        pl.when((r * 10) % 1 < 0.3).then(pl.lit(f',"last_campaign":"campaign-{k}"')).otherwise(pl.lit("")),
        pl.when((r * 100) % 1 < 0.1).then(pl.lit(',"role":null')).otherwise(pl.lit("")),
        pl.when((r * 1000) % 1 < 0.05).then(pl.concat_str([pl.lit(',"seats":'), (1 + (u + k) % 80).cast(pl.String)]))
        .otherwise(pl.lit("")),
        pl.lit("}"),
    ]
    return pl.concat_str(parts)


def day_events(users: int, seed: int, days: list[str], k: int) -> dict:
    """The :class:`~userpilot_sync.documented.snapshots.DayEvents` of day ``days[k]`` per file.

    ``k == 0``: the history's first day (every user and company identified once, full profile);
    ``k >= 1``: a normal day (see the module docstring). Deterministic in (users, seed, k).
    """
    from userpilot_sync.documented.snapshots import COMPANIES, USERS, DayEvents

    day = days[k]
    rng = np.random.default_rng([seed, k, users])
    companies = companies_for(users)
    signups = signups_per_day(users)
    population = users + max(k - 1, 0) * signups  # identified before this day
    if k == 0:
        ident_u = np.arange(users, dtype=np.int64)
        new_u = ident_u
        second = np.empty(0, dtype=np.int64)
        ident_c = np.arange(companies, dtype=np.int64)
    else:
        ident_u = np.sort(rng.choice(population, size=max(population // 10, 1), replace=False))
        new_u = np.arange(population, population + signups, dtype=np.int64)
        second = ident_u[rng.random(ident_u.size) < 0.2]
        ident_c = np.sort(rng.choice(companies, size=max(companies // 10, 1), replace=False))
    # identify_user: updates (k >= 1), sign-ups with a full profile, second events of the day
    frames = []
    if k:
        upd = pl.DataFrame({"u": ident_u, "r": rng.random(ident_u.size)})
        upd = upd.with_columns(
            pl.when(pl.col("r") * 7 % 1 < 0.02).then((pl.col("u") + k) % companies)
            .otherwise(_company_index(pl.col("u"), companies)).alias("c"))
        upd = upd.with_columns(user_id=_hex_ids("usr_", ident_u, _MUL_USER))
        frames.append(upd.select("u", "user_id", "c", _update_metadata(pl.col("r"), pl.col("u"), k, day)
                                 .alias("metadata")))
        if second.size:
            sec = pl.DataFrame({"u": second}).with_columns(
                user_id=_hex_ids("usr_", second, _MUL_USER), c=_company_index(pl.col("u"), companies))
            frames.append(sec.select("u", "user_id", "c", pl.lit('{"role":"admin"}').alias("metadata")))
    new = pl.DataFrame({"u": new_u}).with_columns(user_id=_hex_ids("usr_", new_u, _MUL_USER),
                                                 c=_company_index(pl.col("u"), companies))
    frames.append(new.select("u", "user_id", "c", _profile_metadata(pl.col("u"), pl.col("user_id")).alias("metadata")))
    ident = pl.concat(frames)
    ident = _with_company_ids(ident, companies)
    ident = ident.with_columns(inserted_at=_times(rng, ident.height, day),
                               internal_event_id=_event_ids(rng, ident.height))
    identify_users = ident.select("user_id", "company_id", "inserted_at", "internal_event_id", "metadata")

    # activity: 20 % of the users, every identified user, 1 % never-identified ids
    active = np.arange(population, dtype=np.int64) if k == 0 else rng.choice(population, size=max(population // 5, 1),
                                                                              replace=False)
    active = np.union1d(np.union1d(active, ident_u), new_u)
    act = pl.DataFrame({"u": active}).with_columns(
        id=_hex_ids("usr_", active, _MUL_USER), last_event_at=_times(rng, active.size, day),
        c=_company_index(pl.col("u"), companies))
    anon_idx = rng.integers(0, 2**40, size=max(users // 100, 1), dtype=np.int64)
    anon = pl.DataFrame({"id": _hex_ids("anon_", anon_idx, _MUL_ANON)}).unique()
    anon = anon.with_columns(last_event_at=_times(rng, anon.height, day))
    activity_users = pl.concat([act.select("id", "last_event_at"), anon])

    # identify_company and company activity (latest event of the company's active users)
    cid = _hex_ids("cmp_", ident_c, _MUL_COMPANY)
    if k == 0:
        meta = pl.concat_str([
            pl.lit('{"name":"Company '), pl.col("c").cast(pl.String), pl.lit('","industry":'),
            _q(_pick(INDUSTRIES, pl.col("c") % len(INDUSTRIES))),
            pl.lit(',"employees":'), (5 + pl.col("c") * 37 % 2000).cast(pl.String),
            pl.lit(',"plan":'), _q(_pick(PLANS, pl.col("c") % len(PLANS))),
            pl.lit(',"domain":"company'), pl.col("c").cast(pl.String), pl.lit('.example.com"}')])
    else:
        meta = pl.concat_str([pl.lit('{"employees":'), (5 + (pl.col("c") * 37 + k) % 2000).cast(pl.String),
                              pl.lit(',"plan":'), _q(_pick(PLANS, (pl.col("c") + k) % len(PLANS))), pl.lit("}")])
    comp = pl.DataFrame({"c": ident_c, "company_id": cid}).with_columns(
        inserted_at=_times(rng, ident_c.size, day), internal_event_id=_event_ids(rng, ident_c.size),
        metadata=meta, user_id=pl.lit(None, dtype=pl.String))
    identify_companies = comp.select("user_id", "company_id", "inserted_at", "internal_event_id", "metadata")
    act_c = _with_company_ids(act.filter(pl.col("c").is_not_null()), companies)
    activity_companies = (pl.concat([act_c.select(pl.col("company_id").alias("id"), "last_event_at"),
                                     comp.select(pl.col("company_id").alias("id"),
                                                 pl.col("inserted_at").alias("last_event_at"))])
                          .group_by("id").agg(pl.col("last_event_at").max()))
    return {USERS: DayEvents(identify_users, activity_users),
            COMPANIES: DayEvents(identify_companies, activity_companies)}


# ------------------------------------------------------------------------------- children
def _rss_mb() -> tuple[float, float]:
    """(peak so far, current) resident set size of this process, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    current = 0.0
    try:
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[1]) * resource.getpagesize() / 1024 / 1024
    except OSError:
        pass
    return round(peak, 1), round(current, 1)


def _store(root: Path):
    from userpilot_sync.documented.state import LocalBackend, SnapshotStore

    return SnapshotStore(LocalBackend(root), SYNC_JOB, checkpoint_every_days=CHECKPOINT_EVERY)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def setup(args: dict) -> None:
    """Record days C .. C+30 in a new store at ``args["out"]`` (see the module docstring)."""
    from userpilot_sync.documented.snapshots import day_delta, empty_state, merge_delta
    from userpilot_sync.documented.state import STATE_FILES

    users, seed, days = args["users"], args["seed"], bench_days(args["bench_day"])
    out = Path(args["out"])
    store = _store(out)
    frames = {n: empty_state(n) for n in STATE_FILES}
    t0 = time.perf_counter()
    for k, day in enumerate(days[:-1]):
        events = day_events(users, seed, days, k)
        deltas = {n: day_delta(n, events[n]) for n in STATE_FILES}
        frames = {n: merge_delta(n, frames[n], deltas[n]) for n in STATE_FILES}
        store.record_day(day, deltas, frames, run_id="bench-setup")
        print(f"    setup {day}: {frames['all_users'].height:,} users, "
              f"{deltas['all_users'].height:,} delta rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    print(json.dumps({"days": days, "users": frames["all_users"].height,
                      "companies": frames["all_companies"].height, "states": store.index["states"],
                      "store_bytes": _tree_bytes(out), "setup_s": round(time.perf_counter() - t0, 1)}))


def _copy_store(args: dict) -> tuple[Path, Path]:
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.get("tmp")))
    shutil.copytree(args["store"], work / "state")
    return work, work / "state"


def snapshot(args: dict) -> None:
    """The snapshot work of the timed day T (see the module docstring), stage by stage."""
    import pyarrow as pa

    from userpilot_sync.config.model import FormatSpec
    from userpilot_sync.destination.formats import write_parts
    from userpilot_sync.documented.snapshots import (
        COMPANIES,
        USERS,
        day_delta,
        merge_delta,
        snapshot_table,
        validate_snapshot,
    )
    from userpilot_sync.documented.state import STATE_FILES
    from userpilot_sync.partitions import day_window, parse_partition

    users, seed, days = args["users"], args["seed"], bench_days(args["bench_day"])
    day = days[-1]
    _, day_end = day_window(parse_partition(day))
    spec = FormatSpec(format="parquet", compression="zstd")
    work, root = _copy_store(args)
    try:
        events = day_events(users, seed, days, len(days) - 1)
        store = _store(root)
        store_before = _tree_bytes(root)
        gc.collect()
        stages: dict[str, float] = {}
        rss: dict[str, tuple[float, float]] = {"inputs": _rss_mb()}
        pool = pa.default_memory_pool()
        t0 = lap = time.perf_counter()

        def done(stage: str) -> None:
            nonlocal lap
            now = time.perf_counter()
            stages[stage] = round(stages.get(stage, 0.0) + now - lap, 3)
            rss[stage] = _rss_mb()
            lap = now

        prior = store.prior_state(day)
        done("prior_state")
        deltas = {n: day_delta(n, events[n]) for n in STATE_FILES}
        done("day_delta")
        states = {n: merge_delta(n, prior.frames[n], deltas[n]) for n in STATE_FILES}
        done("merge_delta")
        entry = store.record_day(day, deltas, states, run_id="bench")
        done("record_day")
        written: dict[str, dict] = {}
        for name in (USERS, COMPANIES):
            table = validate_snapshot(name, snapshot_table(name, states[name]), sync_job=SYNC_JOB, partition=day,
                                      day_end=day_end)
            done("snapshot_table_validate")
            parts = write_parts(iter(table.to_batches()), table.schema, spec, work / "out", name)
            written[name] = {"rows": table.num_rows, "bytes": sum(p.bytes for p in parts), "parts": len(parts)}
            del table
            done("write")
        wall = time.perf_counter() - t0
        print(json.dumps({
            "wall_s": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "day": day, "previous_day": prior.day, "stages_s": stages,
            "rss_mb_after": {k: {"peak": v[0], "current": v[1]} for k, v in rss.items()},
            "pyarrow_pool_max_mb": round(pool.max_memory() / 1024 / 1024, 1), "pyarrow_backend": pool.backend_name,
            "users": written[USERS]["rows"], "companies": written[COMPANIES]["rows"],
            "identify_user_events": events[USERS].identify.height, "activity_rows": events[USERS].activity.height,
            "delta_rows": {n: deltas[n].height for n in STATE_FILES},
            "output_bytes": written[USERS]["bytes"], "output_bytes_companies": written[COMPANIES]["bytes"],
            "output_parts": written[USERS]["parts"], "state_store_bytes_written": _tree_bytes(root) - store_before,
            "state_chain": entry["chain"][:16],
        }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replay(args: dict) -> None:
    """``prior_state`` of a re-export of the newest recorded day: checkpoint + 29 deltas replayed."""
    from userpilot_sync.documented.snapshots import COMPANIES, USERS

    days = bench_days(args["bench_day"])
    day = days[-2]  # C+30, the store's newest day
    work, root = _copy_store(args)
    try:
        store = _store(root)
        prev = store.previous_day(day)
        base = max(s for s in store.index["states"] if s <= prev)
        replayed = sum(1 for d in store.days() if base < d <= prev)
        gc.collect()
        before = _rss_mb()
        t0 = time.perf_counter()
        prior = store.prior_state(day)
        wall = time.perf_counter() - t0
        print(json.dumps({
            "wall_s": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "day": day, "previous_day": prior.day, "base_state": base, "deltas_replayed": replayed,
            "users": prior.frames[USERS].height, "companies": prior.frames[COMPANIES].height,
            "rss_mb_before": {"peak": before[0], "current": before[1]},
        }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


COMMANDS = {"snapshot_setup": setup, "snapshot": snapshot, "snapshot_replay": replay}
