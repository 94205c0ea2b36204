"""Long polling: ``pending?wait=N`` returns soon after a packet arrives, holding no DB connection.

Latencies are printed (run with ``-s``), not asserted: the only bound checked is that the poll
came back with the packet before its wait expired, which a missed wake-up would break because
the fallback re-check interval is set longer than the wait.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest
from gunicorn.workers.gthread import ThreadWorker

from bucket.extensions import db
from tests.concurrency import join_all
from tests.queue_helpers import API, Waiter, ingest, measure_wake_up, wait_until_listening

ROOT = Path(__file__).resolve().parent.parent


def test_long_poll_returns_soon_after_a_packet_arrives(make_app, backend):
    """A waiting poll is woken by an ingest on the same instance, not by its re-check timer."""
    app = make_app(BUCKET_LONG_POLL_INTERVAL=30)
    measure_wake_up(app, app.test_client(), wait=8, label=f"same instance, {backend}")


def test_long_poll_is_woken_by_another_instance(make_app, backend):
    """A packet ingested by another instance wakes the poll: via Redis, else the DB re-check."""
    interval = 30 if backend == "postgres" else 0.5  # memory cannot cross instances: re-check
    waiting = make_app(BUCKET_LONG_POLL_INTERVAL=interval)
    ingesting = make_app()
    measure_wake_up(waiting, ingesting.test_client(), wait=8, label=f"other instance, {backend}")


def test_waiting_poll_holds_no_database_connection(app):
    """While a poll waits, its database connection is back in the pool."""
    waiter = Waiter(app, 5)
    waiter.start()
    wait_until_listening(app)
    with app.app_context():
        checked_out = db.engine.pool.checkedout()
    ingest(app.test_client(), user_id="pool")
    join_all([waiter], 10, "long poll")
    assert checked_out == 0
    assert waiter.body is not None and waiter.body["count"] == 1


def test_long_poll_on_an_empty_queue_answers_empty_when_the_wait_ends(client):
    """Nothing arrives: the poll answers an empty batch after about ``wait`` seconds."""
    started = time.monotonic()
    response = client.get(f"{API}/packets/pending?limit=10&wait=1")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json["count"] == 0
    assert 0.9 <= elapsed < 5


def test_long_poll_returns_at_once_when_packets_wait(client):
    """A wait never delays a poll that finds packets (wait=20, the maximum)."""
    packet_id = ingest(client, user_id="ready")
    started = time.monotonic()
    response = client.get(f"{API}/packets/pending?limit=10&wait=20")
    assert response.status_code == 200
    assert [p["packet_id"] for p in response.json["packets"]] == [packet_id]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("wait", ["21", "-1", "soon"])
def test_wait_outside_0_to_20_seconds_is_rejected(client, wait):
    """``wait`` above 20 s (or not a number) is a 4xx like any other bad input."""
    response = client.get(f"{API}/packets/pending?limit=10&wait={wait}")
    assert response.status_code == 422
    assert "wait" in str(response.json["errors"])


def test_gunicorn_runs_threaded_workers_that_outlast_a_long_poll():
    """Long polls need gthread workers with threads to spare and a timeout above 20 s."""
    settings: dict = {}
    exec((ROOT / "gunicorn.conf.py").read_text(), settings)
    module, _, name = settings["worker_class"].rpartition(".")
    worker = getattr(importlib.import_module(module), name)
    assert issubclass(worker, ThreadWorker)
    assert settings["threads"] >= 4
    assert settings["timeout"] > 20
    assert "gunicorn.conf.py" in (ROOT / "Procfile").read_text()
