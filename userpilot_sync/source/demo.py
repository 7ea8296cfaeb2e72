"""The demo source: a deterministic, seedable generator of realistic Userpilot events.

It plays one SaaS app ("Demo SaaS") with users in companies who start sessions, view pages,
send custom track events, hit feature tags and interact with flows, checklists, NPS and
surveys, spotlights, banners and the resource center; identify_user/identify_company events
carry properties. Records have the chunk record shape of the Bulk Data Export API (Event Schema
columns, ``inserted_at`` as ``timestamp[us, UTC]``, ``metadata`` as JSON text) and an
``internal_event_id`` computed with the documented recipe (see ``schema/internal_event_id.py``).

Determinism: a day is cut into ``BLOCKS_PER_DAY`` time blocks; each block's events depend only
on (seed, app token, day, block), so the same day always gives the same events, in batches of
bounded size, whatever window is asked for.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import xxhash

from userpilot_sync.schema.events import EVENT_TYPES
from userpilot_sync.schema.internal_event_id import internal_event_ids
from userpilot_sync.source.base import Extraction, ExtractRequest, SourceBatch

BLOCKS_PER_DAY = 96  # 15-minute blocks
#: Rows of one table of :meth:`DemoSource.iter_blocks` (consecutive blocks share a table up to this).
BATCH_ROWS = 65_536
_DAY_US = 86_400 * 1_000_000
_BLOCK_US = _DAY_US // BLOCKS_PER_DAY

EVENT_TYPE_WEIGHTS = {
    "page_view": 0.40,
    "track": 0.20,
    "interaction": 0.15,
    "track_feature": 0.12,
    "session_start": 0.08,
    "identify_user": 0.04,
    "identify_company": 0.01,
}
TRACK_EVENTS = ("Signed Up", "Invited Teammate", "Created Report", "Exported CSV", "Upgraded Plan", "Connected Integration")
PATHS = ("/", "/dashboard", "/reports", "/reports/new", "/settings", "/settings/billing", "/team", "/integrations")
#: Feature tags of the demo app (id -> name); ids are what track_feature's event_name carries.
FEATURE_TAGS = {
    "1201": "Create report button",
    "1202": "Export menu",
    "1203": "Invite modal",
    "1204": "Billing page",
    "1205": "Integration card",
    "1206": "Search bar",
}
#: Interaction entities of the demo app: entity_type -> (entity ids, possible statuses).
INTERACTION_ENTITIES = {
    "experience": (("448", "449", "450"), ("SEEN", "STARTED", "COMPLETED", "DISMISSED", "SKIPPED")),
    "checklist": (("2", "3"), ("SEEN", "STARTED", "COMPLETED", "DISMISSED")),
    "nps": (("71",), ("SEEN", "SUBMITTED", "DISMISSED")),
    "survey": (("305", "306"), ("SEEN", "SUBMITTED", "DISMISSED")),
    "spotlight": (("812",), ("SEEN", "DISMISSED")),
    "banner": (("9001",), ("SEEN", "DISMISSED")),
    "resource_center": (("1",), ("SEEN", "STARTED")),
}
_COUNTRIES = ("US", "GB", "DE", "FR", "CA", "BR", "IN", "AU", "NL", "ES")
_LANGS = ("en-US", "en-GB", "de-DE", "fr-FR", "en-CA", "pt-BR", "en-IN", "en-AU", "nl-NL", "es-ES")
_DEVICES = (
    ("desktop", 1920, 1080, "Windows", "Chrome", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"),
    ("desktop", 1440, 900, "Mac OS", "Safari", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15"),
    ("desktop", 2560, 1440, "Linux", "Firefox", "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"),
    ("tablet", 1024, 1366, "iOS", "Safari", "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"),
    ("mobile", 390, 844, "Android", "Chrome", "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36"),
)
_PLANS = ("free", "starter", "growth", "enterprise")
_INDUSTRIES = ("software", "finance", "retail", "healthcare", "education")
_SURVEY_ANSWERS = ("Very satisfied", "Satisfied", "Neutral", "Unsatisfied")
_ROLES = ("admin", "analyst", "viewer", "owner")


def _dumps(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class DemoSource:
    """Deterministic demo events: ``events_per_day`` events per UTC day for one app.

    ``extract`` yields at most ``events_per_day / 96`` rows per batch (one 15-minute block).
    """

    kind = "demo"

    def __init__(self, app_token: str, events_per_day: int = 5000, seed: int = 42):
        if events_per_day < 0:
            raise ValueError("events_per_day must be >= 0")
        self.app_token = app_token
        self.events_per_day = events_per_day
        self.seed = seed
        self.n_users = int(min(20_000, max(20, events_per_day // 25)))
        self.n_companies = max(3, self.n_users // 12)

    # -- generation ---------------------------------------------------------------------------
    def _block_size(self, block: int) -> int:
        base, extra = divmod(self.events_per_day, BLOCKS_PER_DAY)
        return base + (1 if block < extra else 0)

    def _rng(self, day: date, block: int) -> np.random.Generator:
        key = xxhash.xxh64_intdigest(f"{self.seed}|{self.app_token}|{day.isoformat()}|{block}".encode())
        return np.random.default_rng(key)

    def block_events(self, day: date, block: int) -> pa.Table:
        """The events of one 15-minute block of ``day`` (Event Schema columns, sorted by time)."""
        return self._frame([self._block_columns(day, block)]).to_arrow()

    def _block_columns(self, day: date, block: int) -> dict:
        """One block's columns as Python lists (``types``: numpy strings, ``ts_us``: numpy int64
        microseconds since the epoch, UTC); :meth:`_frame` turns blocks into one frame."""
        n = self._block_size(block)
        rng = self._rng(day, block)
        day_start_us = int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()) * 1_000_000
        offsets = np.sort(rng.integers(0, _BLOCK_US, size=n))
        ts_us = day_start_us + block * _BLOCK_US + offsets
        types = rng.choice(
            np.array(list(EVENT_TYPE_WEIGHTS)), size=n, p=np.array(list(EVENT_TYPE_WEIGHTS.values()))
        )
        users = rng.integers(0, self.n_users, size=n)
        rows = {c: [] for c in (
            "event_name", "user_id", "company_id", "source", "hostname", "pathname", "screen_width",
            "screen_height", "device_type", "user_agent", "operating_system", "browser",
            "browser_language", "session", "country_code", "metadata",
        )}
        r = rng.random(size=(n, 4))
        picks = rng.integers(0, 1_000_000, size=(n, 3))
        entity_names = list(INTERACTION_ENTITIES)
        feature_ids = list(FEATURE_TAGS)
        for i in range(n):
            et = types[i]
            u = int(users[i])
            company = f"company-{u % self.n_companies:04d}"
            dev = _DEVICES[u % len(_DEVICES)]
            country = u % len(_COUNTRIES)
            web = True
            meta: dict | None = None
            name = ""
            src = "web-client"
            user_id: str | None = f"user-{u:05d}"
            if et == "track":
                name = TRACK_EVENTS[picks[i, 0] % len(TRACK_EVENTS)]
                meta = {"plan": _PLANS[u % len(_PLANS)], "value": int(picks[i, 1] % 500)}
                if r[i, 0] < 0.15:
                    src, web = "backend-segment", False
            elif et == "track_feature":
                name = feature_ids[picks[i, 0] % len(feature_ids)]
            elif et == "interaction":
                entity = entity_names[picks[i, 0] % len(entity_names)]
                ids, statuses = INTERACTION_ENTITIES[entity]
                entity_id = ids[picks[i, 1] % len(ids)]
                status = statuses[picks[i, 2] % len(statuses)]
                name = f"{entity}:{entity_id}:{status}"
                if entity == "nps" and status == "SUBMITTED":
                    meta = {"score": int(picks[i, 1] % 11), "comment": "Great product" if r[i, 1] < 0.3 else ""}
                elif entity == "survey" and status == "SUBMITTED":
                    meta = {"question_id": f"q{1 + picks[i, 2] % 3}", "answer": _SURVEY_ANSWERS[picks[i, 1] % 4]}
                elif entity == "experience":
                    meta = {"step": int(1 + picks[i, 1] % 5)}
            elif et == "identify_user":
                meta = {
                    "email": f"user{u:05d}@{company}.example.com",
                    "name": f"Demo User {u}",
                    "plan": _PLANS[u % len(_PLANS)],
                    "role": _ROLES[u % len(_ROLES)],
                    "signed_up_at": f"2025-{1 + u % 12:02d}-{1 + u % 28:02d}",
                }
                if r[i, 0] < 0.3:
                    src, web = "backend-http", False
            elif et == "identify_company":
                user_id = None
                meta = {
                    "name": f"Company {u % self.n_companies}",
                    "industry": _INDUSTRIES[u % len(_INDUSTRIES)],
                    "employees": int(5 + (u * 37) % 2000),
                    "plan": _PLANS[u % len(_PLANS)],
                }
                src, web = ("backend-hubspot" if r[i, 0] < 0.5 else "backend-http"), False
            rows["event_name"].append(name)
            rows["user_id"].append(user_id)
            rows["company_id"].append(company)
            rows["source"].append(src)
            rows["metadata"].append(None if meta is None else _dumps(meta))
            if web:
                rows["hostname"].append("app.demo-saas.example")
                rows["pathname"].append(PATHS[picks[i, 2] % len(PATHS)])
                rows["screen_width"].append(dev[1])
                rows["screen_height"].append(dev[2])
                rows["device_type"].append(dev[0])
                rows["user_agent"].append(dev[5])
                rows["operating_system"].append(dev[3])
                rows["browser"].append(dev[4])
                rows["browser_language"].append(_LANGS[country])
                rows["session"].append(str(1 + (u + day.toordinal()) % 40))
                rows["country_code"].append(_COUNTRIES[country])
            else:
                for c in ("hostname", "pathname", "screen_width", "screen_height", "device_type", "user_agent",
                          "operating_system", "browser", "browser_language", "session", "country_code"):
                    rows[c].append(None)
        rows["types"] = types.tolist()
        rows["ts_us"] = ts_us
        return rows

    def _frame(self, blocks: list[dict]) -> pl.DataFrame:
        """The events of consecutive ``blocks`` (from :meth:`_block_columns`) as one frame, in
        order, with their ``internal_event_id``; the same rows as one frame per block, built with
        one polars call per column instead of one per column and block."""
        rows = {c: [v for b in blocks for v in b[c]] for c in blocks[0] if c != "ts_us"}
        ts_us = np.concatenate([b["ts_us"] for b in blocks])
        n = len(rows["types"])
        frame = pl.DataFrame(
            {
                "app_token": pl.Series([self.app_token] * n, dtype=pl.Utf8),
                "event_type": pl.Series(rows["types"], dtype=pl.Utf8),
                "event_name": pl.Series(rows["event_name"], dtype=pl.Utf8),
                "user_id": pl.Series(rows["user_id"], dtype=pl.Utf8),
                "company_id": pl.Series(rows["company_id"], dtype=pl.Utf8),
                "source": pl.Series(rows["source"], dtype=pl.Utf8),
                "inserted_at": pl.Series(ts_us, dtype=pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                "internal_event_id": pl.Series([None] * n, dtype=pl.Utf8),
                "hostname": pl.Series(rows["hostname"], dtype=pl.Utf8),
                "pathname": pl.Series(rows["pathname"], dtype=pl.Utf8),
                "screen_width": pl.Series(rows["screen_width"], dtype=pl.Int32),
                "screen_height": pl.Series(rows["screen_height"], dtype=pl.Int32),
                "device_type": pl.Series(rows["device_type"], dtype=pl.Utf8),
                "user_agent": pl.Series(rows["user_agent"], dtype=pl.Utf8),
                "operating_system": pl.Series(rows["operating_system"], dtype=pl.Utf8),
                "browser": pl.Series(rows["browser"], dtype=pl.Utf8),
                "browser_language": pl.Series(rows["browser_language"], dtype=pl.Utf8),
                "session": pl.Series(rows["session"], dtype=pl.Utf8),
                "country_code": pl.Series(rows["country_code"], dtype=pl.Utf8),
                "metadata": pl.Series(rows["metadata"], dtype=pl.Utf8),
            }
        )
        return frame.with_columns(internal_event_ids(frame))

    def iter_blocks(self, start: datetime, end: datetime, event_types: tuple[str, ...] = EVENT_TYPES,
                    batch_rows: int | None = None) -> Iterator[pa.Table]:
        """Tables of the blocks overlapping [start, end), rows filtered to the window and types.

        Consecutive blocks of one day share a table up to ``batch_rows`` rows (default
        :data:`BATCH_ROWS`; a block is never split, 1 gives a table per block), so a small day is
        one table and a large one tables of about ``batch_rows`` rows: the same rows in the same
        order whatever the grouping."""
        batch_rows = batch_rows or BATCH_ROWS
        wanted = set(event_types)
        keep = None if wanted >= set(EVENT_TYPES) else pl.col("event_type").is_in(sorted(wanted))
        in_window = (pl.col("inserted_at") >= start) & (pl.col("inserted_at") < end)
        day = start.astimezone(timezone.utc).date()
        while datetime(day.year, day.month, day.day, tzinfo=timezone.utc) < end:
            day_start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            blocks = []  # (block, whole block inside [start, end)) of the blocks the window touches
            for block in range(BLOCKS_PER_DAY):
                b_start = day_start + timedelta(microseconds=block * _BLOCK_US)
                b_end = b_start + timedelta(microseconds=_BLOCK_US)
                if b_end > start and b_start < end and self._block_size(block):
                    blocks.append((block, start <= b_start and b_end <= end))
            group: list[tuple[int, bool]] = []
            rows = 0
            for i, (block, inside) in enumerate(blocks):
                group.append((block, inside))
                rows += self._block_size(block)
                following = self._block_size(blocks[i + 1][0]) if i + 1 < len(blocks) else None
                if following is None or rows + following > batch_rows:
                    frame = self._frame([self._block_columns(day, b) for b, _ in group])
                    table = self._window(frame, None if all(ok for _, ok in group) else in_window, keep)
                    if table is not None:
                        yield table
                    group, rows = [], 0
            day += timedelta(days=1)

    @staticmethod
    def _window(frame: pl.DataFrame, in_window: pl.Expr | None, keep: pl.Expr | None) -> pa.Table | None:
        predicates = [p for p in (keep, in_window) if p is not None]
        if predicates:
            frame = frame.filter(*predicates)
        return frame.to_arrow() if frame.height else None

    def expected_counts(self, day: date) -> Counter:
        """Events per event type the generator produces for ``day`` (for tests and docs)."""
        counts: Counter = Counter()
        for block in range(BLOCKS_PER_DAY):
            if self._block_size(block):
                counts.update(self.block_events(day, block).column("event_type").to_pylist())
        return counts

    # -- EventSource ----------------------------------------------------------------------------
    def extract(self, request: ExtractRequest) -> Extraction:
        facts = {"kind": self.kind, "seed": self.seed, "events_per_day": self.events_per_day}

        def batches() -> Iterator[SourceBatch]:
            for i, table in enumerate(self.iter_blocks(request.start, request.end, request.event_types)):
                yield SourceBatch(where=f"demo batch {i}", data=table)

        return Extraction(batches=batches(), facts=facts)
