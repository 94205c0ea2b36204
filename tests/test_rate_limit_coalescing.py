"""Rate limits of coalesced ingests: the requests of one shared write are admitted together, in
one round trip, each exactly as if it had come alone.

The write in flight is held (tests/test_ingest_coalescing.py's ``WriteHold``), so the requests
queued behind it, one by one in a known order, share the next write and its admission. Round
trips are counted with Redis's MONITOR on a private redis-server: every command a client
sent, apart from those a script ran.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import pytest
import redis

from bucket.services.coalescing import EXTENSION_KEY
from bucket.web.ratelimit import EXTENSION_KEY as EXTENSION_KEY_LIMITS
from bucket.web.ratelimit import INGEST_ENDPOINT
from tests import servers
from tests.concurrency import join_all, wait_until
from tests.factories import make_packet
from tests.test_ingest_coalescing import WriteHold, commits, grew, post
from tests.test_rate_limit import assert_too_many
from tests.test_resilience import count_rows

INGEST = "/api/v1/bucket/prana/ingest"


def limited(make_app, coalesce: bool = True, **overrides):
    """An app with rate limits on and ingest coalescing as asked."""
    return make_app(BUCKET_RATE_LIMIT_ENABLED=True, BUCKET_INGEST_COALESCE=coalesce, **overrides)


def stored_ids(app, user_id: str) -> int:
    return count_rows(app, "user_id = :user", user=user_id)


def queued_in_order(app, first: dict, rest: list[dict]) -> list:
    """Post ``first`` and hold its write, queue ``rest`` behind it one by one, in this order,
    then let go: ``rest`` shares the next write and its admission. Every answer, ``first``'s
    first."""
    coalescer = app.extensions[EXTENSION_KEY]
    answers: list = [None] * (len(rest) + 1)

    def send(index: int, body: dict) -> None:
        answers[index] = post(app, body)

    threads = [threading.Thread(target=send, args=(0, first), daemon=True)]
    try:
        with WriteHold(app):
            threads[0].start()
            wait_until(lambda: coalescer.writing and coalescer.waiting == 0, 10, "first write")
            for index, body in enumerate(rest, start=1):
                thread = threading.Thread(target=send, args=(index, body), daemon=True)
                threads.append(thread)
                thread.start()
                wait_until(lambda n=index: coalescer.waiting == n, 10, f"request {index} queued")
    finally:
        join_all(threads, 60, "ingest")
    return answers


def test_in_a_shared_write_exactly_the_requests_over_their_users_limit_get_429(make_app):
    """Six requests queued for one write, four of one user with an allowance of two: that
    user's first two and the other user's are stored, that user's last two get 429 with
    Retry-After, and the write held exactly the requests answered 200."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute")
    rest = [make_packet(user_id=user) for user in ("noisy", "calm", "noisy", "noisy", "calm")]
    rest.append(make_packet(user_id="noisy"))
    before = commits(app)
    first, *answers = queued_in_order(app, make_packet(user_id="first"), rest)
    after = commits(app)

    assert first.status_code == 200
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 200, 429]
    for refused in (answers[3], answers[5]):
        assert_too_many(refused)
        assert "packets for this user" in refused.json["message"]
    for stored in (answers[0], answers[1], answers[2], answers[4]):
        assert count_rows(app, "packets.packet_id = :id", id=stored.json["packet_id"]) == 1
    assert stored_ids(app, "noisy") == 2
    assert stored_ids(app, "calm") == 2
    # The four admitted requests shared one write; the refused ones were not in it.
    assert grew(before, after, "_requests:shared") == 4
    assert grew(before, after, "_packets:shared") == 4


def test_a_request_refused_in_a_shared_write_spends_no_other_allowance(make_app):
    """Within one shared admission each request is all or nothing: the user over their limit
    is refused twice without spending the address's allowance, so two more users still fit
    in it, and a third is refused by the address's limit."""
    app = limited(
        make_app,
        BUCKET_RATE_LIMIT_INGEST_PER_IP="3 per minute",
        BUCKET_RATE_LIMIT_INGEST_PER_USER="1 per minute",
    )
    rest = [make_packet(user_id=user) for user in ("eager", "eager", "second", "third", "fourth")]
    first, *answers = queued_in_order(app, make_packet(user_id="eager"), rest)

    assert first.status_code == 200
    assert [a.status_code for a in answers] == [429, 429, 200, 200, 429]
    for refused in answers[:2]:
        assert_too_many(refused)
        assert "packets for this user" in refused.json["message"]
    assert_too_many(answers[4])
    assert "packets from this address" in answers[4].json["message"]
    assert count_rows(app) == 3


def test_a_refused_batch_in_a_shared_write_stores_and_quarantines_nothing(make_app):
    """A batch envelope queued with single packets is admitted with them: over its user's
    allowance it gets 429, none of its packets is stored and its invalid one is not
    quarantined; the single packets beside it are stored."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="3 per minute")
    batch = {"packets": [make_packet(user_id="bulk") for _ in range(4)] + [{"user_id": "bulk"}]}
    rest = [make_packet(user_id="single"), batch, make_packet(user_id="single")]
    first, *answers = queued_in_order(app, make_packet(user_id="first"), rest)

    assert first.status_code == 200
    assert [a.status_code for a in answers] == [200, 429, 200]
    assert_too_many(answers[1])
    assert stored_ids(app, "bulk") == 0
    assert stored_ids(app, "single") == 2
    status = app.test_client().get("/api/v1/bucket/prana/status").json
    assert status["quarantined_packets"] == 0


class Commands:
    """Every command clients send a Redis server while the block runs (MONITOR), apart from
    those scripts run: what each client paid a round trip for."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        # The command that ends the watch goes on a connection opened before it began.
        self.ender = redis.Redis.from_url(url)
        self.ender.ping()
        self.sent: list[str] = []
        self._token = f"end-{uuid.uuid4().hex}"

    def __enter__(self) -> Commands:
        self._monitor = self.client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while True:
            command = self._monitor.next_command()
            if self._token in command["command"]:
                return
            if command["client_type"] != "lua":
                self.sent.append(command["command"].split()[0].upper())

    def __exit__(self, *exc_info) -> None:
        self.ender.echo(self._token)
        join_all([self._thread], 10, "monitor")
        self._monitor.__exit__()
        self.client.close()
        self.ender.close()

    def round_trips(self) -> list[str]:
        """The commands sent, without the wake-up announcements (PUBLISH, sent by a
        background thread at most every 20 ms, never by a request) and a new connection's
        handshake (HELLO: the queue's client connects on its first announcement)."""
        return [name for name in self.sent if name not in {"PUBLISH", "HELLO"}]


@pytest.fixture
def private_redis():
    """A redis-server of the test's own: MONITOR sees only this test's commands."""
    server = servers.PrivateRedis().start()
    try:
        yield server
    finally:
        server.stop()


# Counting Redis commands needs Redis: the PostgreSQL backend pair.
@pytest.mark.parametrize("backend", ["postgres"])
def test_the_requests_of_a_shared_write_are_admitted_in_one_round_trip(
    make_app, backend, private_redis
):
    """Eight requests queued for one write, some over their limit, cost Redis one EVALSHA
    together (the write in flight before them paid its own), Retry-After included."""
    app = limited(
        make_app, REDIS_URL=private_redis.url, BUCKET_RATE_LIMIT_INGEST_PER_USER="3 per minute"
    )
    assert app.test_client().post(INGEST, json=make_packet(user_id="warm")).status_code == 200
    rest = [make_packet(user_id="many") for _ in range(5)] + [
        make_packet(user_id=f"other-{n}") for n in range(3)
    ]
    with Commands(private_redis.url) as commands:
        first, *answers = queued_in_order(app, make_packet(user_id="first"), rest)

    assert first.status_code == 200
    assert sorted(a.status_code for a in answers) == [200] * 6 + [429] * 2
    assert commands.round_trips() == ["EVALSHA", "EVALSHA"]


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("coalesce", [False, True])
def test_a_request_alone_costs_one_round_trip_admitted_or_refused(
    make_app, backend, private_redis, coalesce
):
    """Without company, a request's limits (address, bytes, user) are one EVALSHA, and a 429
    costs no second one for its Retry-After."""
    app = limited(
        make_app,
        coalesce,
        REDIS_URL=private_redis.url,
        BUCKET_RATE_LIMIT_INGEST_PER_USER="1 per minute",
    )
    client = app.test_client()
    assert client.post(INGEST, json=make_packet(user_id="warm")).status_code == 200
    with Commands(private_redis.url) as admitted:
        assert client.post(INGEST, json=make_packet(user_id="lone")).status_code == 200
    with Commands(private_redis.url) as refused:
        answer = client.post(INGEST, json=make_packet(user_id="lone"))
    assert admitted.round_trips() == ["EVALSHA"]
    assert refused.round_trips() == ["EVALSHA"]
    assert_too_many(answer)
    # The script's Retry-After is the library's reading of the window (same second or the
    # next), and within the minute.
    limits = app.extensions[EXTENSION_KEY_LIMITS]
    (item,) = limits.items["user"]
    stats = limits.primary.get_window_stats(item, INGEST_ENDPOINT, "user", "lone")
    library = max(1, math.ceil(stats.reset_time - time.time()))
    assert int(answer.headers["Retry-After"]) in {library, library + 1}
    assert 1 <= int(answer.headers["Retry-After"]) <= 60


def test_a_shared_admission_falls_back_to_memory_when_redis_is_gone(make_app, private_redis):
    """Redis killed before a shared write is admitted: its requests are counted in memory,
    the one over its user's limit still gets 429 and the others are stored (no 5xx)."""
    app = limited(
        make_app, REDIS_URL=private_redis.url, BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute"
    )
    private_redis.kill()
    rest = [make_packet(user_id="after") for _ in range(3)] + [make_packet(user_id="else")]
    first, *answers = queued_in_order(app, make_packet(user_id="first"), rest)

    assert first.status_code == 200
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 429]
    assert stored_ids(app, "after") == 2
    assert stored_ids(app, "else") == 1
