"""Authenticated ingest from a real browser (Chromium, ``tests/browser.py``).

Under ``observe`` the unchanged bridge (no ``Authorization`` header: single packets, a batch
and a beacon) keeps working exactly as before: everything stored, marked unauthenticated.
Under ``require`` the bridge with its one change (``Authorization: Bearer <the page's token>``,
read when each packet is sent) is stored authenticated, including a packet first sent with an
expired token, kept in the offline queue on its 401, and sent again after the page got a new
token: then it is accepted.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import jwt
import pytest
import requests

from tests import servers
from tests.browser import launch_chromium, open_page, page_log, save_screenshot, serve_directory
from tests.cluster import Instance, migrate, service_env
from tests.concurrency import wait_until
from tests.factories import make_packet
from tests.test_browser_ingest import forget_redis_keys

pytestmark = pytest.mark.slow
API = "/api/v1/bucket/prana"
SECRET = "gurukul-browser-secret-of-at-least-32-bytes"
DONE_MS = 30_000

BRIDGE_JS = """
const CONFIG = JSON.parse(document.getElementById("config").textContent);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// What the learning platform's page keeps after login: the bridge reads it at send time.
window.pageToken = CONFIG.firstToken;
const offlineQueue = [];

async function send(body) {
  const headers = {
    "Content-Type": "application/json",
    "X-CLIENT-TIMESTAMP": new Date().toISOString(),
  };
  if (CONFIG.withHeader && window.pageToken) {
    headers["Authorization"] = `Bearer ${window.pageToken}`;  // the bridge's one change
  }
  try {
    const response = await fetch(
      CONFIG.ingestUrl, {method: "POST", headers, body: JSON.stringify(body)}
    );
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: error.name, message: error.message};
  }
}

// The bridge: retried on failure, then kept in the offline queue (a non-2xx keeps it too).
async function post(body) {
  const attempts = [];
  for (let retry = 0; retry <= 3; retry++) {
    if (retry) await sleep(CONFIG.backoffMs * 2 ** (retry - 1));
    const attempt = await send(body);
    attempts.push(attempt);
    if (attempt.status >= 200 && attempt.status < 300) return attempts;
    if (attempt.status !== undefined && attempt.status !== 429 && attempt.status < 500) break;
  }
  offlineQueue.push(body);
  return attempts;
}

async function flushQueue() {
  const results = [];
  while (offlineQueue.length) results.push(await post(offlineQueue.shift()));
  return results;
}

async function run() {
  const report = {};
  report.single = await post(CONFIG.singles[0]);
  report.batch = await post({packets: CONFIG.batch, batch_size: CONFIG.batch.length,
                             sent_at: new Date().toISOString()});
  if (CONFIG.beacon) {
    report.beacon = navigator.sendBeacon(CONFIG.ingestUrl, JSON.stringify(CONFIG.beacon));
  }
  if (CONFIG.queuedThenRelogin) {
    window.pageToken = CONFIG.expiredToken;     // the session ran out while offline
    report.expired = await post(CONFIG.queuedThenRelogin);
    report.queued = offlineQueue.length;
    window.pageToken = CONFIG.freshToken;       // the learner signs in again
    report.flushed = await flushQueue();
    report.queuedAfter = offlineQueue.length;
  }
  return report;
}

run().then((report) => { window.bridgeReport = report; },
           (error) => { window.bridgeReport = {crashed: String(error)}; });
"""

PAGE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>PRANA bridge with auth</title></head>
<body><h1>PRANA bridge, authenticated ingest</h1>
<script id="config" type="application/json">{config}</script>
<script>{script}</script>
</body></html>
"""


def token(user: str, expires_in: int = 600) -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now - 1200, "exp": now + expires_in, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as launched:
        yield launched


@pytest.fixture
def database_url(empty_database):
    """A fresh, empty database on each backend (conftest's ``empty_database``)."""
    return empty_database


@contextlib.contextmanager
def running_bucket(database_url, tmp_path, mode: str):
    """A bucket under ``BUCKET_INGEST_AUTH=mode`` and a page server on another origin."""
    reason = servers.redis_reachable()
    if reason:
        servers.unavailable(reason)
    pages = tmp_path / "pages"
    pages.mkdir()
    with contextlib.ExitStack() as stack:
        origin = f"http://localhost:{stack.enter_context(serve_directory(pages))}"
        prefix = f"bucket-browser-auth-{uuid.uuid4().hex[:10]}"
        stack.callback(forget_redis_keys, prefix)
        env = service_env(
            database_url,
            servers.REDIS_TEST_URL,
            prefix,
            BUCKET_CORS_ORIGINS=origin,
            BUCKET_INGEST_AUTH=mode,
            BUCKET_INGEST_JWT_SECRET=SECRET,
        )
        migrate(env)
        instance = Instance(env, workers=1, threads=4)
        stack.callback(instance.stop)
        instance.start()
        yield instance.url, origin, pages


def run_page(browser, request, bucket, origin, pages, config: dict) -> dict:
    config = {"ingestUrl": f"{bucket}{API}/ingest", "backoffMs": 50, **config}
    html = PAGE_HTML.format(config=json.dumps(config).replace("</", "<\\/"), script=BRIDGE_JS)
    (pages / "bridge.html").write_text(html)
    with open_page(browser) as page:
        page.goto(f"{origin}/bridge.html")
        page.wait_for_function("() => window.bridgeReport !== undefined", timeout=DONE_MS)
        report = page.evaluate("() => window.bridgeReport")
        save_screenshot(page, request, "bridge")
        assert "crashed" not in report, f"{report}\n{page_log(page)}"
        assert not page.page_errors(), page_log(page)
    return report


def listed(bucket: str, user: str) -> list[dict]:
    answer = requests.get(f"{bucket}{API}/packets/user/{user}?limit=100", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def packet(user: str, label: str) -> dict:
    return make_packet(user_id=user, session_id=f"sess-{user}", raw_signals={"sent_as": label})


def test_the_unchanged_bridge_keeps_working_under_observe(browser, database_url, tmp_path, request):
    """No header at all: every packet stored as before, each marked unauthenticated."""
    user = f"stu-{uuid.uuid4().hex[:6]}"
    with running_bucket(database_url, tmp_path, "observe") as (bucket, origin, pages):
        config = {
            "withHeader": False,
            "singles": [packet(user, "single")],
            "batch": [packet(user, "batch-0"), packet(user, "batch-1")],
            "beacon": packet(user, "beacon"),
        }
        report = run_page(browser, request, bucket, origin, pages, config)
        assert report["single"][-1]["status"] == 200, report
        assert report["batch"][-1]["status"] == 200, report
        assert report["beacon"] is True
        wait_until(lambda: len(listed(bucket, user)) == 4, 15.0, "the beacon was not stored")
        packets = listed(bucket, user)
        labels = sorted(item["raw_signals"]["sent_as"] for item in packets)
        assert labels == ["batch-0", "batch-1", "beacon", "single"]
        for item in packets:
            assert item["authenticated"] is False and item["auth_outcome"] == "missing"


def test_the_bridge_with_the_header_is_stored_authenticated_under_require(
    browser, database_url, tmp_path, request
):
    """With the page's token: stored, authenticated. A packet sent with an expired token is
    refused (401), kept in the offline queue, and accepted once the page has a new token."""
    user = f"stu-{uuid.uuid4().hex[:6]}"
    with running_bucket(database_url, tmp_path, "require") as (bucket, origin, pages):
        config = {
            "withHeader": True,
            "firstToken": token(user),
            "expiredToken": token(user, expires_in=-600),
            "freshToken": token(user),
            "singles": [packet(user, "single")],
            "batch": [packet(user, "batch-0"), packet(user, "batch-1")],
            "queuedThenRelogin": packet(user, "queued-offline"),
        }
        report = run_page(browser, request, bucket, origin, pages, config)
        assert report["single"][-1]["status"] == 200, report
        assert report["batch"][-1]["status"] == 200, report
        assert [attempt["status"] for attempt in report["expired"]] == [401], report
        assert report["expired"][0]["body"]["message"].endswith("expired."), report
        assert report["queued"] == 1 and report["queuedAfter"] == 0
        assert report["flushed"][0][-1]["status"] == 200, report
        packets = listed(bucket, user)
        labels = sorted(item["raw_signals"]["sent_as"] for item in packets)
        assert labels == ["batch-0", "batch-1", "queued-offline", "single"]
        for item in packets:
            assert item["authenticated"] is True and item["auth_subject"] == user
        unsigned = requests.post(f"{bucket}{API}/ingest", json=packet(user, "curl"), timeout=10)
        assert unsigned.status_code == 401
        status = requests.get(f"{bucket}{API}/status", timeout=10).json()
        assert status["ingest_auth"] == "require"
        assert status["auth_refused"]["invalid"] == 1 and status["auth_refused"]["missing"] == 1
