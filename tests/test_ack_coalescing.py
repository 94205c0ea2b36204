"""Acknowledgement coalescing: concurrent mark-processed requests of a worker share one
statement and commit, each answered with its own outcomes (404 and 409 as without sharing).

Deterministic sharing as in tests/test_ingest_coalescing.py: the test holds the database's
writes to the deliveries table, so the first acknowledgement stays in flight while the others
queue behind it, one at a time in a known order; once it is let go they are written together.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict

import pytest
from flask_migrate import upgrade

from bucket import create_app
from bucket.services.coalescing import ACK_EXTENSION_KEY
from tests import servers
from tests.concurrency import join_all, run_threads, wait_until
from tests.queue_helpers import API, ack, expire, ingest, poll, row
from tests.test_ingest_coalescing import PausedAfterFirstWrite, WriteHold, run_ddl
from tests.test_resilience import assert_unavailable

MARK = f"{API}/packets/mark-processed"


@pytest.fixture
def app_config() -> dict:
    """Acknowledgement coalescing is off by default: these tests switch it on."""
    return {"BUCKET_ACK_COALESCE": True}


def commits(app) -> dict[str, float]:
    """The acknowledgement coalescer's counters from /metrics (compare before and after)."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    found = defaultdict(float)
    pattern = r'^bucket_ack_commit(s|_requests)_total\{kind="(\w+)"\} (\S+)$'
    for what, kind, value in re.findall(pattern, text, re.MULTILINE):
        found[f"{what or 's'}:{kind}"] = float(value)
    return found


def grew(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def leased(client, count: int, user_id: str) -> dict[str, str]:
    """Ingest and lease ``count`` packets: {packet_id: receipt}."""
    ids = [ingest(client, user_id=user_id) for _ in range(count)]
    served = poll(client, limit=count)["packets"]
    receipts = {packet["packet_id"]: packet["receipt"] for packet in served}
    assert set(receipts) == set(ids)
    return receipts


def body_of(packet_id: str, receipt: str | None, success: bool = True, **fields) -> dict:
    body = {"packet_id": packet_id, "success": success, **fields}
    if receipt is not None:
        body["receipt"] = receipt
    if success:
        body.setdefault("karma_actions", [{"action": "noted", "packet": packet_id}])
    return body


def acked_together(app, first: dict, rest: list[dict]) -> list:
    """Post ``first`` and let its write hang, queue ``rest`` behind it in this order, then let
    go. Every answer, ``first``'s first."""
    shared = app.extensions[ACK_EXTENSION_KEY]
    answers: list = [None] * (len(rest) + 1)

    def send(index: int, body: dict) -> None:
        answers[index] = app.test_client().post(MARK, json=body)

    threads = [threading.Thread(target=send, args=(0, first), daemon=True)]
    try:
        with WriteHold(app, "deliveries"):
            threads[0].start()
            wait_until(lambda: shared.writing and shared.waiting == 0, 10, "first write")
            for index, body in enumerate(rest, start=1):
                thread = threading.Thread(target=send, args=(index, body), daemon=True)
                threads.append(thread)
                thread.start()
                wait_until(lambda n=index: shared.waiting == n, 10, f"request {index} queued")
    finally:
        join_all(threads, 60, "acknowledgement")
    return answers


def test_many_threads_acknowledging_at_once_each_get_their_own_outcome(app):
    """Sixteen threads acknowledge 48 leased packets one request each: every request is
    answered 200 "processed" for its own packet, every packet is processed once, and some
    writes were shared."""
    client = app.test_client()
    receipts = leased(client, 48, "crowd")
    ids = sorted(receipts)
    before = commits(app)

    def send(index: int) -> list[tuple[str, dict]]:
        answers = []
        for packet_id in ids[index::16]:
            response = app.test_client().post(MARK, json=body_of(packet_id, receipts[packet_id]))
            assert response.status_code == 200, response.get_data(as_text=True)
            answers.append((packet_id, response.json))
        return answers

    answered = [pair for answers in run_threads(16, send) for pair in answers]
    after = commits(app)
    assert sorted(packet_id for packet_id, _ in answered) == ids
    for packet_id, answer in answered:
        assert answer["packet_id"] == packet_id
        assert answer["outcome"] == "processed"
    for packet_id in ids:
        stored = row(app, packet_id)
        assert stored.delivery_state == "processed"
        assert stored.karma_actions == [{"action": "noted", "packet": packet_id}]
    written = grew(before, after, "_requests:alone") + grew(before, after, "_requests:shared")
    assert written == 48
    assert grew(before, after, "s:shared") >= 1, after
    assert client.get(f"{API}/status").json["processed_packets"] == 48


def test_queued_acknowledgements_share_one_commit_each_with_its_own_outcome(make_app):
    """Requests queued behind an acknowledgement in flight are written by one statement: a
    success, a failure, an unknown packet (404), a stale receipt and a dead packet (409), a
    batch; a request naming a packet already in that write waits for the next one and is
    answered as it would be after it (already processed)."""
    app = make_app(BUCKET_ACK_COALESCE=True, BUCKET_MAX_ATTEMPTS=2, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    receipts = leased(client, 8, "share")
    lead, done, failed, stale, dead, one, two, _ = sorted(receipts)
    assert ack(client, dead, success=False).json["outcome"] == "retry_scheduled"
    expire(app, [stale, dead])
    receipts_now = {}
    for _ in range(2):  # the poll may serve one packet of a user at a time
        receipts_now.update({p["packet_id"]: p["receipt"] for p in poll(client)["packets"]})
    assert set(receipts_now) == {stale, dead} and receipts_now[stale] != receipts[stale]
    assert ack(client, dead, False, receipt=receipts_now[dead]).json["outcome"] == "dead"
    rest = [
        body_of(done, receipts[done]),
        body_of(failed, receipts[failed], success=False, error_message="karma 500"),
        body_of("no-such-packet", None),
        body_of(stale, receipts[stale]),  # the lease it names was taken over
        body_of(dead, None),
        {"results": [body_of(one, receipts[one]), body_of(two, None), body_of(two, None)]},
        body_of(done, receipts[done], karma_actions=[{"action": "again"}]),
    ]
    before = commits(app)
    first, *answers = acked_together(app, body_of(lead, receipts[lead]), rest)
    after = commits(app)

    assert (first.status_code, first.json["outcome"]) == (200, "processed")
    done_a, failed_a, unknown_a, stale_a, dead_a, batch_a, again_a = answers
    assert (done_a.status_code, done_a.json["outcome"]) == (200, "processed")
    assert (failed_a.status_code, failed_a.json["outcome"]) == (200, "retry_scheduled")
    assert unknown_a.status_code == 404
    assert unknown_a.headers["X-Bucket-Outcome"] == "not_found"
    assert stale_a.status_code == 409
    assert stale_a.headers["X-Bucket-Outcome"] == "stale_receipt"
    assert dead_a.status_code == 409
    assert dead_a.headers["X-Bucket-Outcome"] == "dead"
    assert batch_a.status_code == 200
    assert [(r["packet_id"], r["status"]) for r in batch_a.json["results"]] == [
        (one, "processed"),
        (two, "processed"),
        (two, "processed"),
    ]
    assert (again_a.status_code, again_a.json["outcome"]) == (200, "already_processed")
    assert row(app, done).karma_actions == [{"action": "noted", "packet": done}]
    assert row(app, failed).last_error == "karma 500"
    assert row(app, stale).lease_id == receipts_now[stale]
    assert grew(before, after, "s:shared") == 1
    assert grew(before, after, "_requests:shared") == 6
    assert grew(before, after, "s:alone") == 2  # the first, and the one naming `done` again


POISON_ACK = {
    "postgres": [
        "CREATE FUNCTION ack_poison() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'poisoned acknowledgement'; END $$",
        "CREATE TRIGGER ack_poison BEFORE UPDATE ON deliveries FOR EACH ROW "
        "WHEN (NEW.last_error = 'poison') EXECUTE FUNCTION ack_poison()",
    ],
    "sqlite": [
        "CREATE TRIGGER ack_poison BEFORE UPDATE ON deliveries "
        "WHEN NEW.last_error = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
    ],
}
CURE_ACK = {
    "postgres": [
        "DROP TRIGGER IF EXISTS ack_poison ON deliveries",
        "DROP FUNCTION IF EXISTS ack_poison()",
    ],
    "sqlite": ["DROP TRIGGER IF EXISTS ack_poison"],
}


def test_a_result_the_database_refuses_fails_only_its_own_request(app, backend):
    """A result that makes the shared statement fail: each request is retried alone, so only
    its own request fails (500) and the others are recorded and answered normally."""
    client = app.test_client()
    receipts = leased(client, 6, "poison")
    lead, *others = sorted(receipts)
    bad = others[2]
    rest = [
        body_of(pid, receipts[pid])
        if pid != bad
        else body_of(pid, receipts[pid], success=False, error_message="poison")
        for pid in others
    ]
    run_ddl(app, POISON_ACK[backend])
    try:
        before = commits(app)
        first, *answers = acked_together(app, body_of(lead, receipts[lead]), rest)
        after = commits(app)
    finally:
        run_ddl(app, CURE_ACK[backend])
    assert first.status_code == 200
    assert answers[2].status_code == 500
    mates = [answer for index, answer in enumerate(answers) if index != 2]
    assert [answer.status_code for answer in mates] == [200] * 4
    assert [answer.json["outcome"] for answer in mates] == ["processed"] * 4
    assert row(app, bad).delivery_state == "leased"
    assert all(row(app, pid).delivery_state == "processed" for pid in others if pid != bad)
    assert grew(before, after, "s:shared") == 0  # the shared write failed, so none committed
    assert grew(before, after, "s:alone") == 5  # the first, then each good mate alone


def test_database_stopped_under_a_shared_acknowledgement_answers_each_request_503(
    private_postgres,
):
    """The database stops while a shared acknowledgement is in flight: each of its requests
    is answered 503 with Retry-After and none of its results is recorded. The first write
    commits and pauses, the others queue, the deliveries table is locked, the first leader goes
    on, and the server stops once the shared write waits for that lock in the server."""
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": private_postgres.url,
            "REDIS_URL": None,
            "BUCKET_ACK_COALESCE": True,
        },
        testing=True,
    )
    shared = app.extensions[ACK_EXTENSION_KEY]
    threads: list[threading.Thread] = []
    pause = None
    try:
        with app.app_context():
            upgrade()
        client = app.test_client()
        receipts = leased(client, 9, "down")
        lead, *others = sorted(receipts)
        answers: list = [None] * 9

        def send(index: int, packet_id: str) -> None:
            answers[index] = app.test_client().post(
                MARK, json=body_of(packet_id, receipts[packet_id])
            )

        pause = PausedAfterFirstWrite(shared)
        threads = [
            threading.Thread(target=send, args=(index, pid), daemon=True)
            for index, pid in enumerate([lead, *others])
        ]
        threads[0].start()
        assert pause.committed.wait(30), "the first write did not commit"
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: shared.waiting == len(others), 30, "the others queued")
        with WriteHold(app, "deliveries") as hold:
            pause.resume()
            wait_until(
                lambda: shared.waiting == 0 and hold.blocked() == 1,
                30,
                "the shared write waiting for the lock in the server",
            )
            # Immediate: every backend quits at once without releasing its locks, so the
            # shared write cannot get the lock and finish in the moment the holder's session
            # ends (a fast stop ends the holder's session first, and sometimes it did).
            private_postgres.stop("immediate")
        join_all(threads, 60, "acknowledgement")
        assert (answers[0].status_code, answers[0].json["outcome"]) == (200, "processed")
        for answer in answers[1:]:
            assert_unavailable(answer)
        assert pause.calls == 2
        private_postgres.start()
        servers.dispose_engines(app)
        assert row(app, lead).delivery_state == "processed"
        assert [row(app, pid).delivery_state for pid in others] == ["leased"] * len(others)
        assert client.get(f"{API}/status").json["processed_packets"] == 1
        retried = client.post(MARK, json=body_of(others[0], receipts[others[0]]))
        assert (retried.status_code, retried.json["outcome"]) == (200, "processed")
    finally:
        if pause is not None:
            pause.undo()
        join_all([t for t in threads if t.ident is not None], 60, "acknowledgement")
        servers.dispose_engines(app)


def test_acknowledgement_coalescing_off_acknowledges_each_request_on_its_own(make_app):
    """BUCKET_ACK_COALESCE=false: no queue, each request its own statement, as before."""
    app = make_app(BUCKET_ACK_COALESCE=False)
    assert ACK_EXTENSION_KEY not in app.extensions
    client = app.test_client()
    receipts = leased(client, 4, "plain")
    ids = sorted(receipts)
    answers = run_threads(4, lambda n: client.post(MARK, json=body_of(ids[n], receipts[ids[n]])))
    assert [answer.json["outcome"] for answer in answers] == ["processed"] * 4


def test_a_shared_acknowledgement_write_must_hold_at_least_one_result():
    with pytest.raises(ValueError, match="BUCKET_ACK_COALESCE_MAX"):
        create_app({"BUCKET_ACK_COALESCE_MAX": 0, "REDIS_URL": None}, testing=True)
