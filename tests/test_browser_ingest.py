"""The ingest path from a real browser, as the PRANA bridge drives it.

Headless Chromium (Debian's, driven by Playwright: ``tests/browser.py``) loads a page from one
origin (``http://localhost:<port>``) that posts packets cross-origin to a real bucket on
another (``http://127.0.0.1:<port>``, gunicorn started by the Procfile's web line): single
packets with ``fetch`` and the bridge's retries (the first attempt of two of them fails), a
packet sent again after its answer was "lost", a batch envelope with ``X-PRANA-BATCH-ID``, and
``navigator.sendBeacon`` (text/plain). The bucket's HTTP API must then hold every packet exactly
once. A page from an origin missing from ``BUCKET_CORS_ORIGINS`` sees its fetches rejected by the
browser (CORS preflight refused), and nothing it tried to send is stored.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import requests

from tests import servers
from tests.browser import launch_chromium, open_page, page_log, save_screenshot, serve_directory
from tests.cluster import Instance, migrate, service_env
from tests.concurrency import wait_until
from tests.factories import make_packet

pytestmark = pytest.mark.slow
API = "/api/v1/bucket/prana"
BRIDGE_DONE_MS = 30_000  # the page's whole run: at most 4 tries per packet, 10 s timeout each
BEACON_DEADLINE = 15.0  # seconds for beacons (sent when the browser likes) to be stored

# The PRANA bridge, cut down to its transport: fetch with X-CLIENT-TIMESTAMP, a 10 s timeout
# (AbortController), up to 3 retries with exponential backoff (1, 2, 4 s in the bridge; 50, 100,
# 200 ms here), batches with X-PRANA-BATCH-ID, and sendBeacon when the page goes away.
BRIDGE_JS = """
const CONFIG = JSON.parse(document.getElementById("config").textContent);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function show(label, value) {
  const row = document.createElement("tr");
  for (const text of [label, JSON.stringify(value)]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  document.getElementById("log").append(row);
}

// One POST. firstTry: "closed-port" sends it where nobody listens (connection refused);
// "abort" aborts it 1 ms after it started (it may or may not have reached the bucket).
async function send(body, headers, firstTry) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), firstTry === "abort" ? 1 : 10000);
  const url = firstTry === "closed-port" ? CONFIG.closedUrl : CONFIG.ingestUrl;
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        "X-CLIENT-TIMESTAMP": new Date().toISOString(),
        ...headers,
      },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    return {url, status: response.status, body: await response.json()};
  } catch (error) {
    return {url, error: error.name, message: error.message};
  } finally {
    clearTimeout(timer);
  }
}

// The bridge's retry loop: a network error, 429 or 5xx is tried again after a backoff.
async function post(body, headers = {}, firstTry = null) {
  const attempts = [];
  for (let retry = 0; retry <= 3; retry++) {
    if (retry) await sleep(CONFIG.backoffMs * 2 ** (retry - 1));
    const sent = body.packets ? body : {...body, retry_count: retry};
    const attempt = await send(sent, headers, retry === 0 ? firstTry : null);
    attempts.push(attempt);
    const status = attempt.status;
    if (status !== undefined && status !== 429 && status < 500) break;
  }
  return attempts;
}

function envelope(packets) {
  return {packets, batch_size: packets.length, sent_at: new Date().toISOString()};
}

async function allowedPage() {
  const [refused, aborted, lost] = CONFIG.singles;
  const report = {};
  report.refused = await post(refused, {}, "closed-port");
  report.aborted = await post(aborted, {}, "abort");
  report.lost = await post(lost);
  report.resent = await post(lost);  // its answer "was lost": the bridge sends it again
  report.batch = await post(envelope(CONFIG.batch), {"X-PRANA-BATCH-ID": CONFIG.batchId});
  report.beacons = CONFIG.beacons.map(
    (body) => navigator.sendBeacon(CONFIG.ingestUrl, JSON.stringify(body))
  );
  return report;
}

async function foreignPage() {
  const report = {};
  report.single = await post(CONFIG.singles[0]);
  report.batch = await post(envelope(CONFIG.batch), {"X-PRANA-BATCH-ID": CONFIG.batchId});
  return report;
}

(CONFIG.role === "allowed" ? allowedPage() : foreignPage()).then(
  (report) => {
    for (const [label, value] of Object.entries(report)) show(label, value);
    window.bridgeReport = report;
  },
  (error) => { window.bridgeReport = {crashed: String(error)}; },
);
"""

PAGE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>PRANA bridge: {role} origin</title>
<style>body {{ font: 13px sans-serif; }} td {{ border: 1px solid #ccc; padding: 2px 6px;
vertical-align: top; word-break: break-all; }} td:first-child {{ word-break: normal; }}
</style></head>
<body><h1>PRANA bridge test page ({role} origin)</h1><p>posting to {ingest_url}</p>
<table id="log"></table>
<script id="config" type="application/json">{config}</script>
<script>{script}</script>
</body></html>
"""


@dataclass
class Site:
    """A running bucket and the two page servers: one origin it allows, one it does not."""

    bucket: str
    allowed_origin: str
    foreign_origin: str
    pages: Path


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as launched:
        yield launched


@pytest.fixture
def database_url(empty_database):
    """A fresh, empty database on each backend (conftest's ``empty_database``)."""
    return empty_database


def forget_redis_keys(prefix: str) -> None:
    """Delete the keys this test's instance left under its prefix in the shared Redis."""
    client = redis.Redis.from_url(servers.REDIS_TEST_URL, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def site(database_url, tmp_path):
    """The bucket (migrated, CORS open to the allowed origin only) and both page servers."""
    reason = servers.redis_reachable()
    if reason:
        servers.unavailable(reason)
    pages = tmp_path / "pages"
    pages.mkdir()
    with contextlib.ExitStack() as stack:
        allowed_port = stack.enter_context(serve_directory(pages))
        foreign_port = stack.enter_context(serve_directory(pages))
        allowed_origin = f"http://localhost:{allowed_port}"
        prefix = f"bucket-browser-{uuid.uuid4().hex[:10]}"
        stack.callback(forget_redis_keys, prefix)
        env = service_env(
            database_url, servers.REDIS_TEST_URL, prefix, BUCKET_CORS_ORIGINS=allowed_origin
        )
        migrate(env)
        instance = Instance(env, workers=2, threads=4)
        stack.callback(instance.stop)
        instance.start()
        yield Site(instance.url, allowed_origin, f"http://localhost:{foreign_port}", pages)


def run_page(browser, site: Site, request, role: str, config: dict) -> tuple[dict, str]:
    """Write the page, load it from its origin, wait for the bridge's report, screenshot it;
    return the report and what the browser logged (its console, where CORS errors go)."""
    ingest_url = f"{site.bucket}{API}/ingest"
    config = {
        "role": role,
        "ingestUrl": ingest_url,
        "closedUrl": f"http://127.0.0.1:{servers.free_port()}{API}/ingest",
        "backoffMs": 50,
        "batchId": f"batch-{uuid.uuid4().hex[:8]}",
        **config,
    }
    html = PAGE_HTML.format(
        role=role,
        ingest_url=ingest_url,
        config=json.dumps(config).replace("</", "<\\/"),
        script=BRIDGE_JS,
    )
    (site.pages / f"{role}.html").write_text(html)
    origin = site.allowed_origin if role == "allowed" else site.foreign_origin
    with open_page(browser) as page:
        page.goto(f"{origin}/{role}.html")
        page.wait_for_function("() => window.bridgeReport !== undefined", timeout=BRIDGE_DONE_MS)
        report = page.evaluate("() => window.bridgeReport")
        save_screenshot(page, request, role)
        assert "crashed" not in report, f"{report}\n{page_log(page)}"
        log = page_log(page)
        assert not page.page_errors(), log
    return report, log


def labelled(user_id: str, label: str) -> dict:
    """A contract packet of ``user_id`` whose raw signals say how the page sent it."""
    return make_packet(
        user_id=user_id,
        session_id=f"sess-{user_id}",
        raw_signals={"tab_visible": True, "dwell_time_ms": 5000, "sent_as": label},
    )


def stored(site: Site, user_id: str) -> list[dict]:
    """The user's packets as the bucket lists them."""
    answer = requests.get(f"{site.bucket}{API}/packets/user/{user_id}?limit=500", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def status(site: Site) -> dict:
    answer = requests.get(f"{site.bucket}{API}/status", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_bridge_stores_every_packet_exactly_once_from_an_allowed_origin(browser, site, request):
    user = f"stu-browser-{uuid.uuid4().hex[:8]}"
    singles = [labelled(user, label) for label in ("refused-first", "aborted-first", "lost")]
    batch = [labelled(user, f"batch-{n}") for n in range(4)] + [singles[2]]  # lost one again
    beacon_single = labelled(user, "beacon-single")
    beacon_batch = [labelled(user, f"beacon-batch-{n}") for n in range(2)]
    beacons = [
        beacon_single,
        {
            "packets": beacon_batch,
            "batch_size": 2,
            "sent_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        },
    ]
    report, _ = run_page(
        browser,
        site,
        request,
        "allowed",
        {"singles": singles, "batch": batch, "beacons": beacons},
    )

    # The first attempts really failed in the browser, and the retries went through.
    refused = report["refused"]
    assert refused[0].get("error") == "TypeError", refused
    assert refused[-1]["status"] == 200 and len(refused) == 2, refused
    aborted = report["aborted"]
    assert aborted[0].get("error") == "AbortError", aborted
    assert aborted[-1]["status"] == 200 and len(aborted) == 2, aborted
    for key in ("refused", "aborted", "lost", "resent"):
        answer = report[key][-1]["body"]
        assert answer["status"] == "ingested" and answer["packet_id"], (key, answer)
    # The packet sent again is recognised: same packet_id, flagged as a duplicate.
    first, again = report["lost"][-1]["body"], report["resent"][-1]["body"]
    assert not first.get("duplicate") and again.get("duplicate") is True, (first, again)
    assert again["packet_id"] == first["packet_id"]
    batch_answer = report["batch"][-1]
    assert batch_answer["status"] == 200 and len(report["batch"]) == 1, report["batch"]
    results = batch_answer["body"]["results"]
    assert [r["status"] for r in results] == ["ingested"] * 4 + ["duplicate"], results
    assert results[4]["packet_id"] == first["packet_id"]
    assert report["beacons"] == [True, True], "the browser refused to queue a beacon"

    expected = sorted(
        p["raw_signals"]["sent_as"] for p in [*singles, *batch[:4], beacon_single, *beacon_batch]
    )
    assert len(expected) == 10

    def everything_arrived() -> bool:
        return len(stored(site, user)) >= len(expected)

    wait_until(everything_arrived, BEACON_DEADLINE, "the beacons' packets to be stored")
    packets = stored(site, user)
    labels = Counter(p["raw_signals"]["sent_as"] for p in packets)
    assert sorted(labels.elements()) == expected, labels  # none twice, none missing
    assert len({p["packet_id"] for p in packets}) == len(expected)
    fetched_ids = {report[key][-1]["body"]["packet_id"] for key in ("refused", "aborted", "lost")}
    fetched_ids |= {r["packet_id"] for r in results}
    assert fetched_ids <= {p["packet_id"] for p in packets}
    figures = status(site)
    assert figures["total_packets"] == len(expected), figures
    assert figures["pending_packets"] == len(expected), figures


def test_a_page_from_an_origin_not_allowed_is_refused_by_the_browser(browser, site, request):
    user = f"stu-foreign-{uuid.uuid4().hex[:8]}"
    single = labelled(user, "foreign-single")
    batch = [labelled(user, f"foreign-batch-{n}") for n in range(3)]
    # The bucket names no foreign origin in its preflight answer; the allowed one it does.
    for origin, allowed in ((site.foreign_origin, False), (site.allowed_origin, True)):
        preflight = requests.options(
            f"{site.bucket}{API}/ingest",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-client-timestamp",
            },
            timeout=10,
        )
        granted = preflight.headers.get("Access-Control-Allow-Origin")
        assert (granted == origin) is allowed, (origin, preflight.headers)

    report, log = run_page(browser, site, request, "foreign", {"singles": [single], "batch": batch})

    for key in ("single", "batch"):
        attempts = report[key]
        assert len(attempts) == 4, attempts  # the bridge tried, retried, and gave up
        assert all(a.get("error") == "TypeError" for a in attempts), attempts
    assert "blocked by CORS policy" in log, log  # refused for its origin, not a network error
    assert stored(site, user) == []
    assert status(site)["total_packets"] == 0
