"""The operator console in a real browser (Debian's Chromium, driven by Playwright), against the
service started as the Procfile starts it, on PostgreSQL and Redis.

It asks for the token and refuses a wrong one, shows the figures ``status`` answers, draws its
charts, requeues a dead packet with a click (and the figures follow), and shows a learner's
timeline whose packets open whole. Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import contextlib

import pytest
import requests

from tests.browser import launch_chromium, open_page, page_log, save_screenshot
from tests.cluster import Instance, fresh_database_env
from tests.concurrency import wait_until
from tests.factories import make_packet

pytestmark = pytest.mark.slow
API = "/api/v1/bucket/prana"
TOKEN = "console-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LEARNER = "stu_console"
FIGURES = {
    "fig-pending": "pending_packets",
    "fig-ready": "queue_size",
    "fig-leased": "leased_packets",
    "fig-retrying": "retrying_packets",
    "fig-processed": "processed_packets",
    "fig-dead": "dead_packets",
    "fig-quarantined": "quarantined_packets",
}


@pytest.fixture(scope="module")
def bucket():
    """One instance on a fresh PostgreSQL database, with packets processed, dead and waiting."""
    with contextlib.ExitStack() as cleanup:
        _, env = cleanup.enter_context(
            fresh_database_env(
                "console",
                BUCKET_CONSUMER_TOKEN=TOKEN,
                BUCKET_MAX_ATTEMPTS="1",
                BUCKET_RETRY_BACKOFF="0",
                BUCKET_BOOKKEEPING_INTERVAL="0.2",
            )
        )
        instance = Instance(env)
        cleanup.callback(instance.stop)
        base = instance.start().url
        for n in range(12):
            state = ("DEEP_FOCUS", "ON_TASK", "DISTRACTED")[n % 3]
            packet = make_packet(user_id=LEARNER, cognitive_state=state, focus_score=40 + 4 * n)
            assert requests.post(f"{base}{API}/ingest", json=packet, timeout=10).ok
        for n in range(3):
            packet = make_packet(user_id=f"emp_{n}", system_type="ems", state="FAKING")
            assert requests.post(f"{base}{API}/ingest", json=packet, timeout=10).ok
        served = requests.get(f"{base}{API}/packets/pending?limit=9", headers=AUTH, timeout=10)
        for k, packet in enumerate(served.json()["packets"]):
            ok = k % 3 != 2  # three of the learner's packets die
            body = {
                "packet_id": packet["packet_id"],
                "success": ok,
                "karma_actions": [{"action": "focus_bonus", "points": k}] if ok else None,
                "error_message": None if ok else "karma API timed out",
            }
            answer = requests.post(
                f"{base}{API}/packets/mark-processed", json=body, headers=AUTH, timeout=10
            )
            assert answer.ok, answer.text

        def booked() -> bool:
            series = requests.get(f"{base}{API}/stats/timeseries", headers=AUTH, timeout=10)
            return series.json()["totals"]["ingested"] == 15

        wait_until(booked, 20, "the bookkeeper booked the packets into their minutes")
        yield base


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as launched:
        yield launched


def status(base: str) -> dict:
    return requests.get(f"{base}{API}/status", headers=AUTH, timeout=10).json()


def figure(page, element_id: str) -> str:
    return page.get_attribute(f"#{element_id}", "data-value")


def canvas_is_drawn(page, element_id: str) -> bool:
    """The chart exists and its canvas holds painted pixels."""
    return page.evaluate(
        """(id) => {
            const canvas = document.getElementById(id);
            if (!window.Chart || !Chart.getChart(canvas)) return false;
            const pixels = canvas.getContext("2d")
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
            return painted > 500;
        }""",
        element_id,
    )


def open_console(page, base: str, token: str = TOKEN) -> None:
    page.goto(f"{base}/console")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", token)
    page.click("#token-submit")


def test_the_console_asks_for_the_token_and_refuses_a_wrong_one(bucket, browser, request):
    with open_page(browser) as page:
        page.goto(f"{bucket}/console")
        page.wait_for_selector("#token-dialog[open]")
        assert page.is_hidden("#console")
        save_screenshot(page, request, "asks")
        open_console(page, bucket, token="not-the-token")
        page.wait_for_selector("#token-error:not([hidden])")
        assert "not valid" in page.text_content("#token-error")
        assert page.is_hidden("#console")
        assert figure(page, "fig-dead") is None  # nothing was shown


def test_the_console_shows_status_charts_requeues_and_a_timeline(bucket, browser, request):
    with open_page(browser, viewport={"width": 1366, "height": 900}) as page:
        page.on("dialog", lambda dialog: dialog.accept())
        open_console(page, bucket)
        page.wait_for_selector("body[data-refreshed]")
        assert page.is_visible("#console") and page.is_hidden("#token-dialog")

        # Live figures: the numbers status answers.
        before = status(bucket)
        for element_id, name in FIGURES.items():
            assert figure(page, element_id) == str(before[name]), (element_id, page_log(page))
        assert figure(page, "fig-database") == "up"
        assert figure(page, "fig-backend").startswith(before["queue_backend"])

        # Charts: drawn, with the packets in them.
        for chart in ("chart-1h", "chart-24h", "chart-mix"):
            wait_until(lambda c=chart: canvas_is_drawn(page, c), 10, f"{chart} drawn")
        ingested = page.evaluate(
            "Chart.getChart('chart-1h').data.datasets[0].data.reduce((a, b) => a + b, 0)"
        )
        assert ingested == 15
        save_screenshot(page, request, "figures")

        # Dead letters: requeue one with a click; the figures follow.
        assert before["dead_packets"] == 3
        rows = page.locator("#dead-table tbody tr[data-packet-id]")
        assert rows.count() == 3
        victim = rows.first.get_attribute("data-packet-id")
        rows.first.locator("button.requeue-one").click()
        page.wait_for_selector("#fig-dead[data-value='2']")
        page.wait_for_function(
            "(id) => !document.querySelector(`#dead-table tr[data-packet-id='${id}']`)", arg=victim
        )
        after = status(bucket)
        assert after["dead_packets"] == 2 and after["queue_size"] == before["queue_size"] + 1
        assert figure(page, "fig-ready") == str(after["queue_size"])

        # A learner's timeline: every packet, its delivery state, one opened whole.
        page.fill("#timeline-user", LEARNER)
        page.click("#timeline-form button[type=submit]")
        page.wait_for_selector("#timeline-table tbody tr[data-packet-id]")
        timeline = page.locator("#timeline-table tbody tr[data-packet-id]")
        assert timeline.count() == 12
        deliveries = {timeline.nth(i).get_attribute("data-delivery") for i in range(12)}
        assert {"processed", "dead", "pending"} <= deliveries
        wait_until(lambda: canvas_is_drawn(page, "chart-timeline"), 10, "timeline drawn")
        processed_row = page.locator("#timeline-table tbody tr[data-delivery='processed']").first
        processed_row.click()
        detail = page.text_content("#packet-detail")
        assert '"focus_bonus"' in detail and '"delivery_state": "processed"' in detail
        save_screenshot(page, request, "timeline")

        # Requeue every dead packet: the button asks for it explicitly ({"all": true}).
        page.click("#requeue-all")
        page.wait_for_selector("#fig-dead[data-value='0']")
        assert status(bucket)["dead_packets"] == 0
        assert not page.page_errors(), page_log(page)
