"""Failures are retried after a jittered exponential back-off, then dead-lettered and requeued."""

from __future__ import annotations

import re
import time
from datetime import UTC

from sqlalchemy import text

from bucket.extensions import db
from tests.concurrency import join_all
from tests.queue_helpers import (
    Waiter,
    ack,
    expire,
    ingest,
    listing,
    poll,
    row,
    status,
    wait_until_listening,
)


def fail_once(client, packet_id: str, message: str) -> tuple[dict, float]:
    """Poll the packet and acknowledge it as failed; return the ack body and when it was sent."""
    served = poll(client)
    assert [p["packet_id"] for p in served["packets"]] == [packet_id]
    sent = time.time()
    response = ack(client, packet_id, success=False, error_message=message)
    assert response.status_code == 200, response.json
    return response.json, sent


def test_failure_returns_after_exponential_jittered_backoff(make_app):
    """Attempt n waits BUCKET_RETRY_BACKOFF × 2^(n−1) scaled by a jitter in [0.5, 1]."""
    app = make_app(BUCKET_RETRY_BACKOFF=10, BUCKET_MAX_ATTEMPTS=5)
    client = app.test_client()
    packet_id = ingest(client, user_id="backoff")
    for attempt in (1, 2, 3):
        body, sent = fail_once(client, packet_id, f"karma down #{attempt}")
        assert body["outcome"] == "retry_scheduled"
        assert body["delivery_count"] == attempt
        base = 10 * 2 ** (attempt - 1)
        delay = row(app, packet_id).visible_at - sent
        assert 0.5 * base - 0.5 <= delay <= base + 0.5, (attempt, delay)
        assert poll(client)["count"] == 0, "a backing-off packet must not be served early"
        expire(app, [packet_id])


def test_backoff_jitter_spreads_retries_of_packets_that_failed_together(make_app):
    """Thirty packets failed in one batch come back spread over [0.5, 1] × the back-off, so a
    karma outage does not return them all in the same instant."""
    app = make_app(BUCKET_RETRY_BACKOFF=100, BUCKET_MAX_ATTEMPTS=5)
    client = app.test_client()
    ids = [ingest(client, user_id="herd") for _ in range(30)]
    assert poll(client, limit=30)["count"] == 30
    sent = time.time()
    results = [{"packet_id": pid, "success": False, "error_message": "down"} for pid in ids]
    response = client.post("/api/v1/bucket/prana/packets/mark-processed", json={"results": results})
    assert response.status_code == 200
    delays = sorted(row(app, pid).visible_at - sent for pid in ids)
    assert 50 - 1 <= delays[0] and delays[-1] <= 100 + 1, delays
    assert len({round(delay, 3) for delay in delays}) >= 25, "retries were not jittered"
    assert delays[-1] - delays[0] > 10, f"jitter spread only {delays[-1] - delays[0]:.2f} s"


def test_backoff_is_capped(make_app):
    """No retry waits longer than BUCKET_RETRY_BACKOFF_MAX."""
    app = make_app(BUCKET_RETRY_BACKOFF=10, BUCKET_RETRY_BACKOFF_MAX=15, BUCKET_MAX_ATTEMPTS=9)
    client = app.test_client()
    packet_id = ingest(client, user_id="capped")
    for _ in range(4):
        _, sent = fail_once(client, packet_id, "still down")
        assert row(app, packet_id).visible_at - sent <= 15.5
        expire(app, [packet_id])


def test_packet_failed_max_attempts_times_is_dead_at_once(make_app):
    """With BUCKET_MAX_ATTEMPTS=2 and no back-off, the second failure dead-letters the packet."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_MAX_ATTEMPTS=2)
    client = app.test_client()
    packet_id = ingest(client, user_id="doomed")
    first, _ = fail_once(client, packet_id, "first failure")
    assert first["outcome"] == "retry_scheduled"
    second, _ = fail_once(client, packet_id, "second failure")
    assert second["outcome"] == "dead"
    assert second["delivery_count"] == 2

    assert poll(client)["count"] == 0, "a dead packet is never served again"
    figures = status(client)
    assert figures["dead_packets"] == 1
    assert figures["pending_packets"] == 0
    assert figures["queue_size"] == 0
    (shown,) = listing(client, "doomed")
    assert shown["delivery_state"] == "dead"
    assert shown["delivery_count"] == 2
    assert shown["last_error"] == "second failure"
    assert shown["dead_at"] is not None
    assert shown["last_delivered_at"] is not None
    assert shown["processed_by_karma"] is False


def test_acknowledging_a_dead_packet_answers_409(make_app):
    """A dead packet refuses late outcomes until an operator requeues it."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_MAX_ATTEMPTS=1)
    client = app.test_client()
    packet_id = ingest(client, user_id="late")
    fail_once(client, packet_id, "only chance")
    late = ack(client, packet_id, success=True)
    assert late.status_code == 409
    assert row(app, packet_id).delivery_state == "dead"


def test_expired_lease_counts_as_a_delivery(make_app):
    """A packet whose leases keep expiring ends dead instead of looping forever."""
    app = make_app(BUCKET_MAX_ATTEMPTS=2)
    client = app.test_client()
    packet_id = ingest(client, user_id="crashy")
    for expected in (1, 2):
        served = poll(client, visibility_timeout=30)
        assert [p["delivery_count"] for p in served["packets"]] == [expected]
        expire(app, [packet_id])
    assert poll(client)["count"] == 0
    stored = row(app, packet_id)
    assert stored.delivery_state == "dead"
    assert stored.delivery_count == 2
    assert "lease expired" in stored.last_error
    assert status(client)["dead_packets"] == 1


def test_failure_history_is_visible_in_the_user_listing(make_app):
    """Delivery count, last error and delivery time are recorded on every failed attempt."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_MAX_ATTEMPTS=5)
    client = app.test_client()
    packet_id = ingest(client, user_id="history")
    fail_once(client, packet_id, "karma 503")
    (shown,) = listing(client, "history")
    assert shown["delivery_state"] == "pending"
    assert shown["delivery_count"] == 1
    assert shown["last_error"] == "karma 503"
    assert shown["last_delivered_at"] is not None
    poll(client)
    assert ack(client, packet_id, success=True).status_code == 200
    (shown,) = listing(client, "history")
    assert shown["delivery_state"] == "processed"
    assert shown["processed_at"] is not None
    assert shown["delivery_count"] == 2


def kill_all(client, app, user_id: str, count: int) -> list[str]:
    """Ingest ``count`` packets for ``user_id`` and fail each once (max attempts is 1)."""
    ids = [ingest(client, user_id=user_id) for _ in range(count)]
    served = poll(client, limit=count)
    assert served["count"] == count
    for packet_id in ids:
        assert ack(client, packet_id, success=False, error_message="boom").json["outcome"] == "dead"
    return ids


def requeued(output: str) -> int:
    """The count the requeue command reports."""
    match = re.search(r"\d+", output)
    assert match, output
    return int(match.group())


def test_requeue_command_revives_dead_packets_by_user(make_app):
    """``flask bucket requeue --user`` revives that user's dead packets, fresh, and no others."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_MAX_ATTEMPTS=1)
    client = app.test_client()
    mine = kill_all(client, app, "alice", 2)
    kill_all(client, app, "bob", 1)

    result = app.test_cli_runner().invoke(args=["bucket", "requeue", "--user", "alice"])
    assert result.exit_code == 0, result.output
    assert requeued(result.output) == 2
    figures = status(client)
    assert figures["dead_packets"] == 1
    assert figures["queue_size"] == 2

    served = poll(client, limit=10)
    assert sorted(p["packet_id"] for p in served["packets"]) == sorted(mine)
    assert all(p["delivery_count"] == 1 for p in served["packets"]), "attempts start afresh"
    for packet_id in mine:
        assert ack(client, packet_id, success=True).status_code == 200
    assert [p["delivery_state"] for p in listing(client, "alice")] == ["processed"] * 2


def test_requeue_command_selects_by_time_range_and_all(make_app):
    """``--since/--until`` pick dead packets by arrival time; no option requeues every one."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_MAX_ATTEMPTS=1)
    client = app.test_client()
    old, recent, newest = kill_all(client, app, "carol", 3)
    with app.app_context():
        for packet_id, moment in ((old, "2020-01-01 00:00:00"), (recent, "2024-06-01 00:00:00")):
            db.session.execute(
                text("UPDATE packets SET received_at = :m WHERE packet_id = :p"),
                {"m": moment, "p": packet_id},
            )
            db.session.execute(
                text("UPDATE deliveries SET received_at = :m WHERE packet_id = :p"),
                {"m": moment, "p": packet_id},
            )
        db.session.commit()
    runner = app.test_cli_runner()

    result = runner.invoke(args=["bucket", "requeue", "--until", "2021-01-01T00:00:00"])
    assert result.exit_code == 0, result.output
    assert requeued(result.output) == 1
    assert row(app, old).delivery_state == "pending"
    assert row(app, recent).delivery_state == "dead"

    result = runner.invoke(
        args=[
            "bucket",
            "requeue",
            "--since",
            "2024-01-01T00:00:00+00:00",
            "--until",
            "2025-01-01T00:00:00+00:00",
        ]
    )
    assert requeued(result.output) == 1
    assert row(app, recent).delivery_state == "pending"
    assert row(app, newest).delivery_state == "dead"

    result = runner.invoke(args=["bucket", "requeue"])
    assert requeued(result.output) == 1
    assert status(client)["dead_packets"] == 0
    assert poll(client, limit=10)["count"] == 3


def test_a_failure_that_makes_its_packet_ready_again_wakes_a_waiting_poll(make_app):
    """With no back-off the failed packet is pending at once: a poll already waiting gets it
    then, not when its wait or the long-poll interval ends."""
    app = make_app(BUCKET_RETRY_BACKOFF=0, BUCKET_LONG_POLL_INTERVAL=30)
    client = app.test_client()
    packet_id = ingest(client, user_id="again")
    assert [p["packet_id"] for p in poll(client)["packets"]] == [packet_id]
    waiter = Waiter(app, 15)
    started = time.monotonic()
    waiter.start()
    wait_until_listening(app)
    assert ack(client, packet_id, success=False).json["outcome"] == "retry_scheduled"
    join_all([waiter], 20, "long poll")
    assert [p["packet_id"] for p in waiter.body["packets"]] == [packet_id]
    assert waiter.returned_at - started < 10, "the waiting poll was not woken"


def test_a_failure_does_not_store_the_karma_actions_sent_with_it(client, app):
    """Karma actions belong to a success: a failure that carries some leaves none stored."""
    packet_id = ingest(client, user_id="no-karma")
    poll(client)
    failed = ack(client, packet_id, success=False, karma_actions=[{"action": "half-done"}])
    assert failed.json["outcome"] == "retry_scheduled"
    assert row(app, packet_id).karma_actions is None


def test_a_finished_packet_is_stamped_when_it_finished_not_after_a_back_off(make_app):
    """Processed and dead packets keep the time they finished in ``visible_at`` (retention
    counts their age from it), whatever the back-off a failure would have waited; only a
    failure on the last allowed delivery is stamped ``dead_at`` (not a success on it, not a
    failure with tries left); a failure without a message records the default one."""
    backoff = {"BUCKET_RETRY_BACKOFF": 600, "BUCKET_RETRY_BACKOFF_MAX": 600}
    app = make_app(BUCKET_MAX_ATTEMPTS=3, **backoff)
    last_try = make_app(BUCKET_MAX_ATTEMPTS=1, **backoff).test_client()  # the same database
    client = app.test_client()
    done, dead, saved, retried = (ingest(client, user_id="stamped") for _ in range(4))
    poll(client)
    acked_at = time.time()
    assert ack(client, done).json["outcome"] == "processed"
    assert ack(last_try, dead, success=False).json["outcome"] == "dead"
    assert ack(last_try, saved).json["outcome"] == "processed"
    assert ack(client, retried, success=False).json["outcome"] == "retry_scheduled"
    for packet_id in (done, dead, saved):
        assert abs(row(app, packet_id).visible_at - acked_at) < 5, packet_id
    assert row(app, retried).visible_at > acked_at + 200  # jitter: half to all of 600 s
    assert row(app, dead).last_error == "consumer reported failure"
    dead_at = row(app, dead).dead_at
    assert (
        abs((dead_at if dead_at.tzinfo else dead_at.replace(tzinfo=UTC)).timestamp() - acked_at) < 5
    )
    assert [row(app, p).dead_at for p in (done, saved, retried)] == [None] * 3
