"""Receipts: stale acknowledgements are refused, batch acks, and lease extension or release."""

from __future__ import annotations

from datetime import datetime

import pytest

from bucket.extensions import db
from tests.queue_helpers import API, ack, advance, expire, ingest, poll, row, status
from tests.statements import captured_statements


def lease(client, packet_id: str, receipt: str, visibility_timeout: int):
    """POST the lease control endpoint."""
    return client.post(
        f"{API}/packets/lease",
        json={"packet_id": packet_id, "receipt": receipt, "visibility_timeout": visibility_timeout},
    )


def test_stale_receipt_is_refused_and_the_newer_outcome_stands(client, app):
    """A's lease expired and B got the packet: A's ack naming its old receipt gets 409."""
    packet_id = ingest(client, user_id="race")
    receipt_a = poll(client)["packets"][0]["receipt"]
    expire(app, [packet_id])
    receipt_b = poll(client)["packets"][0]["receipt"]
    assert receipt_b != receipt_a

    stale = ack(client, packet_id, success=True, receipt=receipt_a)
    assert stale.status_code == 409
    assert stale.headers["X-Bucket-Outcome"] == "stale_receipt"
    assert row(app, packet_id).lease_id == receipt_b, "B still holds the lease"

    outcome_b = ack(client, packet_id, success=False, receipt=receipt_b, error_message="B failed")
    assert outcome_b.status_code == 200
    assert outcome_b.json["outcome"] == "retry_scheduled"
    assert ack(client, packet_id, success=True, receipt=receipt_a).status_code == 409
    stored = row(app, packet_id)
    assert (stored.delivery_state, stored.last_error) == ("pending", "B failed")


def test_stale_success_after_the_newer_success_changes_nothing(client, app):
    """Once B's success is recorded, A's late ack is the harmless already-processed 200."""
    packet_id = ingest(client, user_id="race2")
    receipt_a = poll(client)["packets"][0]["receipt"]
    expire(app, [packet_id])
    receipt_b = poll(client)["packets"][0]["receipt"]
    b_actions = [{"action": "by-b"}]
    assert ack(client, packet_id, receipt=receipt_b, karma_actions=b_actions).status_code == 200
    late = ack(client, packet_id, receipt=receipt_a, karma_actions=[{"action": "by-a"}])
    assert late.status_code == 200
    assert late.json["outcome"] == "already_processed"
    assert row(app, packet_id).karma_actions == b_actions


def test_late_ack_with_its_own_receipt_is_accepted_before_redelivery(client, app):
    """An expired lease nobody took over can still be acknowledged by its holder."""
    packet_id = ingest(client, user_id="slow")
    receipt = poll(client)["packets"][0]["receipt"]
    expire(app, [packet_id])
    assert ack(client, packet_id, receipt=receipt).status_code == 200
    assert row(app, packet_id).delivery_state == "processed"
    assert poll(client)["count"] == 0


def test_ack_without_receipt_is_accepted_whoever_holds_the_lease(client, app):
    """The unchanged Karma Tracker poller sends no receipt and must keep working."""
    packet_id = ingest(client, user_id="legacy")
    poll(client)
    expire(app, [packet_id])
    poll(client)
    response = ack(client, packet_id, success=True)
    assert response.status_code == 200
    assert response.json["outcome"] == "processed"


def test_ack_of_a_packet_never_leased_is_accepted(client, app):
    """A packet acknowledged without being polled is processed (the contract allows it)."""
    packet_id = ingest(client, user_id="eager")
    assert ack(client, packet_id).status_code == 200
    assert poll(client)["count"] == 0
    assert status(client)["processed_packets"] == 1


def test_batch_ack_answers_per_packet_outcomes_in_one_update(make_app):
    """``{"results": [...]}`` records every outcome with one UPDATE and answers each in order."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    done, failed, stale, dead = (ingest(client, user_id="batch") for _ in range(4))
    served = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert ack(client, dead, success=False).json["outcome"] == "dead"
    expire(app, [stale])
    with app.app_context():
        db.session.execute(
            db.text("UPDATE deliveries SET lease_id = 'someone-else' WHERE packet_id = :p"),
            {"p": stale},
        )
        db.session.commit()

    results = [
        {
            "packet_id": done,
            "success": True,
            "karma_actions": [{"a": 1}],
            "receipt": served[done]["receipt"],
        },
        {"packet_id": failed, "success": False, "error_message": "karma 500"},
        {"packet_id": "no-such-packet", "success": True},
        {"packet_id": stale, "success": True, "receipt": served[stale]["receipt"]},
        {"packet_id": dead, "success": True},
    ]
    with captured_statements(app) as statements:
        response = client.post(f"{API}/packets/mark-processed", json={"results": results})
    assert response.status_code == 207
    outcomes = [(r["packet_id"], r["code"], r["status"]) for r in response.json["results"]]
    assert outcomes == [
        (done, 200, "processed"),
        (failed, 200, "dead"),
        ("no-such-packet", 404, "not_found"),
        (stale, 409, "stale_receipt"),
        (dead, 409, "dead"),
    ]
    assert sum("UPDATE deliveries" in sql for sql in statements) == 1, statements
    assert row(app, done).karma_actions == [{"a": 1}]
    assert row(app, failed).last_error == "karma 500"


def test_each_batch_outcome_names_its_packet_its_deliveries_and_why_it_was_refused(make_app):
    """A consumer matches the answers to its results by ``packet_id`` and reads the count of
    deliveries and, for a refusal, the reason: every field of every kind of outcome."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    done, failed, stale, dead, finished = (ingest(client, user_id="whole") for _ in range(5))
    served = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert ack(client, dead, success=False).json["outcome"] == "dead"
    assert ack(client, finished).json["outcome"] == "processed"
    expire(app, [stale])
    with app.app_context():  # served again to someone else (one attempt only: not re-polled)
        db.session.execute(
            db.text("UPDATE deliveries SET lease_id = 'someone-else' WHERE packet_id = :p"),
            {"p": stale},
        )
        db.session.commit()
    results = [
        {"packet_id": done, "success": True},
        {"packet_id": failed, "success": False, "error_message": "karma 500"},
        {"packet_id": "no-such-packet", "success": True},
        {"packet_id": stale, "success": True, "receipt": served[stale]["receipt"]},
        {"packet_id": dead, "success": True},
        {"packet_id": finished, "success": False},
    ]
    response = client.post(f"{API}/packets/mark-processed", json={"results": results})
    assert response.status_code == 207
    assert response.json["results"] == [
        {"packet_id": done, "status": "processed", "code": 200, "delivery_count": 1},
        {
            "packet_id": failed,
            "status": "dead",
            "code": 200,
            "delivery_count": 1,
            "message": "failed on its last allowed delivery: dead-lettered",
        },
        {
            "packet_id": "no-such-packet",
            "status": "not_found",
            "code": 404,
            "message": "Unknown packet_id no-such-packet.",
        },
        {
            "packet_id": stale,
            "status": "stale_receipt",
            "code": 409,
            "delivery_count": 1,
            "message": "The receipt is not the packet's current lease: it was redelivered.",
        },
        {
            "packet_id": dead,
            "status": "dead",
            "code": 409,
            "delivery_count": 1,
            "message": "The packet is dead-lettered; requeue it before acknowledging.",
        },
        {"packet_id": finished, "status": "already_processed", "code": 200, "delivery_count": 1},
    ]


def test_a_single_ack_answers_the_original_shape_with_the_outcome_beside_it(client, app):
    """``{"status": "ok", "message", "packet_id"}`` as the original bucket answered (deployed
    pollers check it), the outcome and the count of deliveries beside."""
    packet_id = ingest(client, user_id="single")
    poll(client)
    assert ack(client, packet_id).json == {
        "status": "ok",
        "packet_id": packet_id,
        "outcome": "processed",
        "code": 200,
        "delivery_count": 1,
        "message": "Packet marked as processed",
    }
    assert ack(client, packet_id).json == {
        "status": "ok",
        "packet_id": packet_id,
        "outcome": "already_processed",
        "code": 200,
        "delivery_count": 1,
        "message": "Packet was already processed; its stored outcome is unchanged",
    }
    retried = ingest(client, user_id="single")
    poll(client)
    answer = ack(client, retried, success=False, error_message="karma 500").json
    served_again = datetime.fromisoformat(answer.pop("next_attempt_at"))
    assert answer == {
        "status": "ok",
        "packet_id": retried,
        "outcome": "retry_scheduled",
        "code": 200,
        "delivery_count": 1,
        "message": "Failure recorded; the packet is served again after a back-off",
    }
    assert served_again.timestamp() == pytest.approx(row(app, retried).visible_at, abs=1e-3)


def test_batch_ack_of_all_successes_answers_200(client, app):
    """A fully accepted batch answers 200, and repeating it is harmless."""
    ids = [ingest(client, user_id="allgood") for _ in range(5)]
    poll(client, limit=10)
    body = {"results": [{"packet_id": pid, "success": True, "karma_actions": []} for pid in ids]}
    first = client.post(f"{API}/packets/mark-processed", json=body)
    assert first.status_code == 200
    assert [r["status"] for r in first.json["results"]] == ["processed"] * 5
    again = client.post(f"{API}/packets/mark-processed", json=body)
    assert again.status_code == 200
    assert [r["status"] for r in again.json["results"]] == ["already_processed"] * 5
    assert status(client)["processed_packets"] == 5


def test_two_results_for_one_packet_in_one_request_the_first_wins(client, app):
    """``[failure, success]`` for one packet in one ``results`` batch records the failure (and
    ``[success, failure]`` the success); both answers report what was recorded."""
    failed_first, succeeded_first = (ingest(client, user_id="twice") for _ in range(2))
    poll(client, limit=10)
    failure = {"success": False, "error_message": "first: failed"}
    success = {"success": True, "karma_actions": [{"action": "second"}]}
    results = [
        {"packet_id": failed_first, **failure},
        {"packet_id": failed_first, **success},
        {"packet_id": succeeded_first, **success},
        {"packet_id": succeeded_first, **failure},
    ]
    response = client.post(f"{API}/packets/mark-processed", json={"results": results})
    assert response.status_code == 200, response.json
    assert [(r["packet_id"], r["status"]) for r in response.json["results"]] == [
        (failed_first, "retry_scheduled"),
        (failed_first, "retry_scheduled"),
        (succeeded_first, "processed"),
        (succeeded_first, "processed"),
    ]
    stored = row(app, failed_first)
    assert (stored.delivery_state, stored.last_error, stored.karma_actions) == (
        "pending",
        "first: failed",
        None,
    )
    assert row(app, succeeded_first).delivery_state == "processed"
    assert status(client)["processed_packets"] == 1


def test_lease_can_be_extended_by_its_holder(client, app):
    """Extending a lease keeps the packet away from other consumers after the first would end."""
    packet_id = ingest(client, user_id="long-job")
    packet = poll(client, visibility_timeout=60)["packets"][0]
    extended = lease(client, packet_id, packet["receipt"], 3600)
    assert extended.status_code == 200
    assert extended.json["status"] == "extended"
    advance(app, 600)  # the 60 s lease would be long over; the extended one is not
    assert poll(client)["count"] == 0, "the extended lease still holds"
    assert ack(client, packet_id, receipt=packet["receipt"]).status_code == 200


def test_lease_release_serves_the_packet_again_at_once(client, app):
    """Visibility 0 hands the packet back; the old receipt is then stale."""
    packet_id = ingest(client, user_id="give-back")
    first = poll(client, visibility_timeout=600)["packets"][0]
    released = lease(client, packet_id, first["receipt"], 0)
    assert released.status_code == 200
    assert released.json["status"] == "released"
    again = poll(client)["packets"]
    assert [p["packet_id"] for p in again] == [packet_id]
    assert again[0]["delivery_count"] == 2
    assert ack(client, packet_id, receipt=first["receipt"]).status_code == 409


def test_lease_change_is_refused_without_a_live_lease(client, app):
    """Wrong receipt, expired lease or finished packet → 409; unknown packet → 404."""
    packet_id = ingest(client, user_id="refused")
    receipt = poll(client)["packets"][0]["receipt"]
    assert lease(client, packet_id, "not-my-receipt", 30).status_code == 409
    assert lease(client, "no-such-packet", receipt, 30).status_code == 404
    assert (
        client.post(
            f"{API}/packets/lease",
            json={"packet_id": packet_id, "receipt": receipt, "visibility_timeout": -1},
        ).status_code
        == 422
    )
    expire(app, [packet_id])
    assert lease(client, packet_id, receipt, 30).status_code == 409
    assert ack(client, packet_id, receipt=receipt).status_code == 200
    assert lease(client, packet_id, receipt, 30).status_code == 409
