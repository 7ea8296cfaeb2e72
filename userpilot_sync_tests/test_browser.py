"""The main flows as a person meets them: the Dagster UI in headless Chromium (Playwright).

One ``dagster dev`` (webserver + daemon) serves the module, on a free loopback port, with a workspace
in a temporary folder: the demo sync job (generated events, local destination) and a sync job
``broken`` whose local-files source holds a chunk that is not UTF-8 (its days fail before anything is
written). Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright for Python; no browser is
downloaded and nothing leaves the machine.

The flows: the sync job's lineage in the asset graph and on the asset pages; one day materialized
from the group's "Materialize all…" dialog and its run seen succeeding; a 3-day backfill launched
from the same dialog and seen completing (the daemon runs it); the day's partition page showing its
rows, bytes and file URIs (the row count equal to the day's manifest) and its checks; a failing day
showing its one-line cause. Assertions are on page text; GraphQL is used only to wait for the
server to load and to mark the "Join the Dagster community" dialog seen (what its Skip button does).

Each step saves a full-page screenshot to ``userpilot_sync_tests/artifacts/browser/`` (git-ignored).
The days are chosen so that the demo's documented-file snapshot chain is exported oldest first
(the materialized day, then the three days after it): no snapshot goes stale, so the snapshot sensor
launches no run of its own while the module runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from userpilot_sync.destination.manifest import rows_by_event_type
from userpilot_sync.partitions import last_complete_days
from userpilot_sync_tests.fixtures_core import dagster_dev, demo_yaml, project_environment
from userpilot_sync_tests.test_ui import _gql, _partition_keys, _wait

pytestmark = pytest.mark.browser

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package (never a Playwright download)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

EVENT_TYPES = ("identify_user", "identify_company", "interaction", "track", "track_feature", "page_view",
               "session_start")
DOCUMENTED = ("all_users", "all_companies", "feature_tags_breakdown", "feature_tags_definitions")
DAY_ASSETS = ("raw_events", *EVENT_TYPES, *DOCUMENTED, "manifest")

#: The day materialized from the UI, then the three days after it (the backfill): oldest first.
_LAST_FOUR = [d.isoformat() for d in last_complete_days(4)]
DAY, BACKFILL_DAYS = _LAST_FOUR[0], _LAST_FOUR[1:]
#: The ``broken`` sync job's day (its own partitions; any day of the window fails the same way).
FAIL_DAY = _LAST_FOUR[-1]

#: Generous bounds for a 2-core machine shared with other work (milliseconds).
PAGE_MS = 60_000
RUN_MS = 240_000

BROKEN_JOB = """\
name: broken
sync_id: "10002"
title: A source with a corrupt chunk
app_token: NX-broken01
enabled: true
source:
  kind: files
  path: {source}
destination:
  kind: local
  path: {exports}
  prefix: userpilot_events
frequency: daily
backfill_days: 0
formats:
  - {{format: parquet, compression: zstd}}
layout: userpilot
schedules_running: false
"""

#: What a user learns from the page when the broken day fails: sync job, partition, chunk, cause.
FAIL_CAUSE = f"sync job 'broken', partition {FAIL_DAY}, chunk {FAIL_DAY}.ndjson: column 'event_name' has 1 value(s) " \
             "that are not valid UTF-8 text"

#: Facts the tests hand on to later tests (the day's run id from the materialize test).
STATE: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """``dagster dev`` on a free loopback port: the demo sync job and the ``broken`` one, each writing
    to a local folder in a temporary root; the partitions window added by the daemon's sensor."""
    root = tmp_path_factory.mktemp("browser")
    exports = root / "exports"
    bad = root / "bad_source"
    bad.mkdir()
    row = {"app_token": "NX-broken01", "event_type": "track", "event_name": "clicked", "user_id": "u1",
           "hostname": "app.example", "inserted_at": f"{FAIL_DAY}T10:00:00Z"}
    (bad / f"{FAIL_DAY}.ndjson").write_bytes(json.dumps(row).encode().replace(b"clicked", b"caf\xe9") + b"\n")
    env = project_environment(root, {"demo.yaml": demo_yaml(exports),
                                     "broken.yaml": BROKEN_JOB.format(source=bad, exports=exports)})
    with dagster_dev(root, env) as server:
        info = {"base": f"http://127.0.0.1:{server.port}", "url": server.url, "root": root, "exports": exports,
                "location": server.location, "dev": server}
        # the "Join the Dagster community" dialog the UI opens on loopback (what its Skip button records)
        _gql(info["url"], "mutation { setNuxSeen }")
        _wait(info, "the partition-window sensor adding the 365 days of the window",
              lambda: len(_partition_keys(info)) == 365, timeout=150)
        yield info


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=PAGE_MS)  # assertions wait as long as actions (a busy 2-core machine)
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, dev, request):
    """A fresh browser page on the server (tall viewport: the UI scrolls inside its panels, so a
    full-page screenshot shows what fits the viewport)."""
    context = browser.new_context(base_url=dev["base"], viewport={"width": 1600, "height": 1800})
    context.set_default_timeout(PAGE_MS)
    page = context.new_page()
    page.shots = []  # type: ignore[attr-defined]
    page.test_name = request.node.name.removeprefix("test_")  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------- helpers
def shot(page, step: str) -> Path:
    """A full-page screenshot ``artifacts/browser/<test>-<step>.png``."""
    path = ARTIFACTS / f"{page.test_name}-{step}.png"
    page.screenshot(path=str(path), full_page=True)
    page.shots.append(path)
    return path


def group_page(page, dev: dict, group: str) -> None:
    page.goto(f"/locations/{dev['location']}/asset-groups/{group}/lineage")
    expect(page.get_by_role("button", name="Materialize all")).to_be_enabled()


def main_text(page) -> str:
    return page.locator("body").inner_text()


def poll_text(page, done, timeout_ms: int = PAGE_MS) -> str:
    """The page's text once ``done(text)`` holds (the page refreshes itself), or the last text seen."""
    for _ in range(max(1, timeout_ms // 1000)):
        text = main_text(page)
        try:
            if done(text):
                break
        except ValueError:  # a heading not on the page yet
            pass
        page.wait_for_timeout(1000)
    return text


def section(text: str, start: str, end: str) -> list[str]:
    """Lines of the page text between the headings ``start`` and ``end`` (without blanks/duplicates)."""
    i = text.index(start) + len(start)
    j = text.index(end, i)
    lines = []
    for line in text[i:j].splitlines():
        line = line.strip()
        if line and line not in lines:
            lines.append(line)
    return lines


def choose_partitions(page, days: list[str]) -> None:
    """In the open "Launch runs to materialize" dialog: type each day into the partition selector
    and tick it."""
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    for day in days:
        search = page.get_by_placeholder(re.compile("Filter|Search", re.I)).filter(visible=True)
        if search.count():
            search.first.fill(day)
        else:
            page.keyboard.press("Control+A")
            page.keyboard.type(day)
        page.get_by_text(day, exact=True).filter(visible=True).last.click()
    # close the selector's popover by clicking the dialog's title
    dialog.get_by_text("Launch runs to materialize").click()
    expect(dialog.get_by_text(f"{len(days)} partition" + ("s" if len(days) > 1 else ""), exact=True)).to_be_visible()


def materialize_day_in_ui(page, dev: dict, group: str, day: str) -> str:
    """The group's "Materialize all…", one day chosen, "Launch 1 run"; follows the toast's View link
    to the run page and returns the run id (from the address)."""
    group_page(page, dev, group)
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"Launch runs to materialize {len(DAY_ASSETS)} assets")).to_be_visible()
    choose_partitions(page, [day])
    shot(page, "dialog")
    dialog.get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text("Launched run")
    expect(toast.first).to_be_visible()
    shot(page, "launched")
    page.get_by_role("link", name="View", exact=True).click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    return page.url.rsplit("/", 1)[-1]


def run_row(page, run_id: str):
    """The runs list's row of ``run_id`` (the smallest block holding its short id and its launcher)."""
    page.get_by_role("link", name="Runs", exact=True).first.click()
    short = page.get_by_text(run_id[:8], exact=True).first
    expect(short).to_be_visible()
    return short.locator("xpath=ancestor::*[contains(., 'Manually launched')][1]")


def manifest_of(dev: dict, day: str) -> dict:
    """The day's manifest from the local destination folder (whatever the layout puts it under)."""
    found = [json.loads(p.read_text()) for p in dev["exports"].rglob("_manifest.json")]
    docs = [d for d in found if d.get("partition") == day and d.get("sync_job") == "demo"]
    assert len(docs) == 1, f"manifests of {day}: {len(docs)} (of {len(found)})"
    return docs[0]


def metadata_value(page, label: str):
    """The value cell of the metadata table's row ``label`` (a locator)."""
    row = page.locator("tr").filter(has=page.get_by_text(label, exact=True))
    expect(row.first).to_be_visible()
    return row.first.locator("td").nth(1)


# ---------------------------------------------------------------------------------------------- tests
def test_lineage_of_the_sync_job(page, dev):
    """The group's asset graph holds every asset of a day; the asset pages say who feeds whom:
    raw_events → each event type (and the snapshots) → manifest, the documented files into the
    manifest, and the lookups in their own group."""
    group_page(page, dev, "demo")
    for asset in DAY_ASSETS:
        expect(page.get_by_text(asset, exact=True).first, asset).to_be_visible()
    expect(page.get_by_text("lookups", exact=True)).to_have_count(0)  # its own group
    shot(page, "graph")

    strip = lambda lines: {x.removeprefix("demo / ") for x in lines if x.startswith("demo / ")}  # noqa: E731

    def parse(text: str) -> tuple[set[str], set[str]]:
        return (strip(section(text, "Upstream assets", "Downstream assets")),
                strip(section(text, "Downstream assets", "Definition")))

    def neighbours(asset: str, expected) -> tuple[set[str], set[str]]:
        """The asset page's upstream and downstream lists, once ``expected(up, down)`` holds (the lists
        load after their headings, "–" standing for none) or the page's timeout passed."""
        page.goto(f"/assets/demo/{asset}")
        expect(page.get_by_text("Upstream assets", exact=True)).to_be_visible()
        expect(page.get_by_text("Downstream assets", exact=True)).to_be_visible()
        text = poll_text(page, lambda t: expected(*parse(t)))
        shot(page, asset)
        return parse(text)

    up, down = neighbours("raw_events", lambda up, down: set(EVENT_TYPES) <= down)
    assert up == set()
    assert set(EVENT_TYPES) <= down and {"all_users", "all_companies"} <= down, down
    up, down = neighbours("track", lambda up, down: up and down)
    assert up == {"raw_events"} and "manifest" in down, (up, down)
    up, down = neighbours("manifest", lambda up, down: len(up) >= len(EVENT_TYPES) + len(DOCUMENTED))
    assert up == {*EVENT_TYPES, *DOCUMENTED}, up
    assert down == set()
    up, down = neighbours("feature_tags_breakdown", lambda up, down: up and down)
    assert up == {"track_feature"} and down == {"manifest"}, (up, down)

    page.goto("/assets/demo/lookups")
    expect(page.get_by_text("demo_lookups", exact=True).first).to_be_visible()
    shot(page, "lookups")


def test_materialize_one_day_from_the_ui(page, dev):
    """The group's "Materialize all…", one day chosen, one run launched: its page shows it succeed,
    and the runs list shows it with its partition."""
    run_id = materialize_day_in_ui(page, dev, "demo", DAY)
    expect(page.get_by_text(f"partition: {DAY}").first).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_MS)
    expect(page.get_by_text("Failure", exact=True)).to_have_count(0)
    expect(page.get_by_text("Errored (0)")).to_be_visible()
    shot(page, "run")
    STATE["run_id"] = run_id

    row = run_row(page, run_id)
    expect(row).to_contain_text("Success")
    expect(row).to_contain_text(f"partition: {DAY}")
    shot(page, "runs")


def test_three_day_backfill_from_the_ui(page, dev):
    """The same dialog with three days launches a backfill; its page (refreshing itself) shows
    every asset of the day 100% completed for the 3 days and the backfill succeeded."""
    group_page(page, dev, "demo")
    page.get_by_role("button", name="Materialize all").click()
    choose_partitions(page, BACKFILL_DAYS)
    shot(page, "dialog")
    page.get_by_role("dialog").get_by_role("button", name="Launch backfill").click()
    expect(page.get_by_text("Created backfill").first).to_be_visible()
    shot(page, "launched")
    page.get_by_role("link", name="View", exact=True).click()
    page.wait_for_url(re.compile(r"/runs/b/"))
    for day in BACKFILL_DAYS:
        expect(page.get_by_text(day, exact=True).first).to_be_visible()
    shot(page, "requested")
    expect(page.get_by_text("100% completed", exact=True)).to_have_count(len(DAY_ASSETS), timeout=RUN_MS)
    status = poll_text(page, lambda text: section(text, "Status", "Asset name") == ["Succeeded"])
    assert section(status, "Status", "Asset name") == ["Succeeded"], section(status, "Status", "Asset name")
    for asset in DAY_ASSETS:
        name = page.get_by_text(f"demo / {asset}", exact=True).first
        # the asset's row: the nearest enclosing block that holds its four counts
        for level in range(1, 8):
            row = name.locator(f"xpath=ancestor::*[{level}]")
            numbers = [x for x in row.inner_text().split() if x.isdigit()]
            if len(numbers) >= 4:
                break
        # partitions targeted, in progress, succeeded, failed
        assert numbers[-4:] == ["3", "0", "3", "0"], (asset, row.inner_text())
    shot(page, "completed")

    # the backfill ran as one ranged run (backfill_days_per_run), which succeeded
    page.get_by_role("tab", name="Runs").click()
    expect(page.get_by_text("Success", exact=True)).to_have_count(1)
    expect(page.get_by_text("Failure", exact=True)).to_have_count(0)
    shot(page, "runs")


def test_partition_page_shows_the_days_records_and_checks(page, dev):
    """The day's partition page of demo/track: materialized by the run of the materialize test, with
    the day's rows (equal to the manifest's), bytes and the file's URI; the day's checks passed."""
    run_id = STATE.get("run_id")
    if run_id is None:  # run alone: materialize the day first, as the materialize test does
        run_id = materialize_day_in_ui(page, dev, "demo", DAY)
        expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_MS)
    doc = manifest_of(dev, DAY)
    assert doc["run_id"] == run_id and doc["status"] == "complete", doc["run_id"]
    track_file = next(f for f in doc["files"] if f.get("event_type") == "track")

    page.goto(f"/assets/demo/track?view=partitions&partition={DAY}")
    detail = page.get_by_text("Latest materialization", exact=True)
    expect(detail).to_be_visible()
    expect(page.get_by_text(DAY, exact=True).filter(visible=True).last).to_be_visible()
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(page.get_by_role("link", name=run_id[:8], exact=True)).to_be_visible()

    rows_shown = metadata_value(page, "dagster/row_count").inner_text().strip()
    assert int(rows_shown.replace(",", "")) == rows_by_event_type(doc)["track"], (rows_shown, rows_by_event_type(doc))
    bytes_shown = metadata_value(page, "bytes").inner_text().strip()
    assert int(bytes_shown.replace(",", "")) == track_file["bytes"], (bytes_shown, track_file)
    uri_shown = "".join(metadata_value(page, "dagster/uri").inner_text().split())
    assert uri_shown.startswith("file://") and uri_shown.endswith(f"/{track_file['path']}"), uri_shown
    files_shown = metadata_value(page, "userpilot/files").inner_text()
    assert uri_shown in "".join(files_shown.split()), files_shown
    assert f'"rows": {track_file["rows"]}' in files_shown and f'"sha256": "{track_file["sha256"]}"' in files_shown
    assert metadata_value(page, "userpilot/status").inner_text().strip() == "exported"
    shot(page, "track")

    # the manifest's partition page: the day's total rows and files
    page.goto(f"/assets/demo/manifest?view=partitions&partition={DAY}")
    expect(page.get_by_text("Latest materialization", exact=True)).to_be_visible()
    shot(page, "manifest")

    # the day's checks: day_exported passed for this day (execution history of the check)
    page.goto("/assets/demo/manifest?view=checks")
    expect(page.get_by_text("day_exported", exact=True).first).to_be_visible()
    page.locator("button[role=tab]", has_text="Execution history").click()
    check_row = page.locator("tr").filter(has=page.get_by_text(DAY, exact=True)).first
    expect(check_row).to_contain_text("Passed")
    shot(page, "day_exported")
    page.goto("/assets/demo/track?view=checks")
    for check in ("known_values", "expected_volume"):
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    page.locator("button[role=tab]", has_text="Execution history").click()
    check_row = page.locator("tr").filter(has=page.get_by_text(DAY, exact=True)).first
    expect(check_row).to_contain_text("Passed")
    shot(page, "track_checks")


def test_a_failing_day_shows_its_one_line_cause(page, dev):
    """The broken sync job's day, launched like any other: its run page shows Failure and the cause
    as the step failure's first line; the runs list carries it as the run's failure tag (clipped by
    the column); the day's partition page says the run failed, and its "View logs" shows the cause."""
    run_id = materialize_day_in_ui(page, dev, "broken", FAIL_DAY)
    expect(page.get_by_text("Failure", exact=True).first).to_be_visible(timeout=RUN_MS)
    expect(page.get_by_text("Errored (1)")).to_be_visible()
    cause = page.get_by_text(FAIL_CAUSE).first
    expect(cause).to_be_visible()
    cause.scroll_into_view_if_needed()
    shot(page, "run")

    row = run_row(page, run_id)
    expect(row).to_contain_text("Failure")
    # the list's ID column clips the tag after "partition"; the full line is on the run page above
    expect(row).to_contain_text("userpilot_sync/failure: sync job 'broken', partition")
    shot(page, "runs")

    page.goto(f"/assets/broken/track?view=partitions&partition={FAIL_DAY}")
    expect(page.get_by_text(f"Run {run_id[:8]} failed, and did not materialize this asset")).to_be_visible()
    shot(page, "partition")
    page.get_by_role("button", name="View logs").click()
    expect(page.get_by_text(FAIL_CAUSE).first).to_be_visible()
    shot(page, "logs")
