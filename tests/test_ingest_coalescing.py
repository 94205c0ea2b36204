"""Ingest coalescing: concurrent requests of a worker share one statement and one commit.

Deterministic sharing: the test holds the database's write (a table lock on PostgreSQL, the
writer's turn on SQLite), so the first request's write stays in flight while the others queue
behind it; once it is let go, the queued requests are written together.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import defaultdict

import psycopg
import pytest
import requests
from flask_migrate import upgrade

from bucket import create_app, sqlite_turns
from bucket.extensions import db
from bucket.services.coalescing import EXTENSION_KEY
from tests import servers
from tests.cluster import Instance, fresh_database_env
from tests.concurrency import join_all, run_threads, wait_until
from tests.factories import make_packet
from tests.test_resilience import assert_unavailable, count_rows

INGEST = "/api/v1/bucket/prana/ingest"


@pytest.fixture
def app_config() -> dict:
    """Coalescing is off by default (README, "How delivery works"): these tests switch it on."""
    return {"BUCKET_INGEST_COALESCE": True}


def commits(app) -> dict[str, float]:
    """The coalescer's counters from /metrics (process-wide: compare before and after)."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    found = defaultdict(float)
    pattern = r'^bucket_ingest_commit(s|_requests|_packets)_total\{kind="(\w+)"\} (\S+)$'
    for what, kind, value in re.findall(pattern, text, re.MULTILINE):
        found[f"{what or 's'}:{kind}"] = float(value)
    return found


def grew(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def postgres_dsn(app) -> str:
    with app.app_context():
        url = db.engine.url
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def blocked_by(dsn: str, pid: int) -> int:
    """How many PostgreSQL sessions wait for a lock that session ``pid`` holds."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        (count,) = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        ).fetchone()
    return count


class WriteHold:
    """Hold the database's writes from outside the app until ``release()`` (also a context
    manager: its connection is closed however the test ends)."""

    def __init__(self, app, table: str = "packets") -> None:
        with app.app_context():
            url = db.engine.url
        self.turns = None
        self.connection = None
        if url.get_backend_name() == "postgresql":
            self.connection = psycopg.connect(postgres_dsn(app))
            try:
                self.connection.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
            except BaseException:
                self.connection.close()
                raise
        else:
            self.turns = sqlite_turns.turns_for(url.database)
            assert self.turns is not None and self.turns.take()

    def blocked(self) -> int:
        """PostgreSQL: how many other sessions wait for this hold's lock."""
        return blocked_by(self.connection.info.dsn, self.connection.info.backend_pid)

    def release(self) -> None:
        if self.connection is not None:
            try:
                self.connection.rollback()
            except psycopg.OperationalError:  # the test stopped the server under it
                pass
            self.connection.close()
            self.connection = None
        if self.turns is not None:
            self.turns.give_back(self.turns.generation)
            self.turns = None

    def __enter__(self) -> WriteHold:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def post(app, body, headers=None):
    return app.test_client().post(INGEST, json=body, headers=headers or {})


def queued_together(app, first: dict, rest: list):
    """Post ``first`` and let its write hang, queue ``rest`` (bodies, or (body, headers))
    behind it, then let go: ``rest`` shares one write. Every answer, ``first``'s first."""
    coalescer = app.extensions[EXTENSION_KEY]
    answers: list = [None] * (len(rest) + 1)

    def send(index: int, item) -> None:
        body, headers = item if isinstance(item, tuple) else (item, None)
        answers[index] = post(app, body, headers)

    threads = [threading.Thread(target=send, args=(0, first), daemon=True)]
    try:
        with WriteHold(app):
            threads[0].start()
            wait_until(lambda: coalescer.writing and coalescer.waiting == 0, 10, "first write")
            for index, item in enumerate(rest, start=1):
                thread = threading.Thread(target=send, args=(index, item), daemon=True)
                threads.append(thread)
                thread.start()
            wait_until(lambda: coalescer.waiting == len(rest), 10, "the others queued")
    finally:
        # Released on any failure too, and no request outlives the test (its app's engines
        # are disposed at teardown; a late request would open a connection nobody closes).
        join_all(threads, 60, "ingest")
    return answers


def test_concurrent_ingest_of_same_and_different_packets_stores_each_once(app):
    """Sixteen threads posting overlapping packets at once: every answer names the one row of
    its packet, exactly one answer per packet says stored, and writes were shared."""
    packets = [make_packet(user_id=f"crowd-{n % 3}") for n in range(12)]
    before = commits(app)

    def send(index: int) -> list[tuple[int, dict]]:
        answers = []
        for round_ in range(6):
            which = (index * 5 + round_ * 7) % len(packets)
            response = post(app, packets[which])
            assert response.status_code == 200, response.get_data(as_text=True)
            answers.append((which, response.json))
        return answers

    by_packet = defaultdict(list)
    for answers in run_threads(16, send):
        for which, answer in answers:
            by_packet[which].append(answer)
    after = commits(app)
    for which, answers in by_packet.items():
        assert len({answer["packet_id"] for answer in answers}) == 1, which
        assert sum(1 for answer in answers if not answer.get("duplicate")) == 1, which
    assert count_rows(app) == len(by_packet) == len(packets)
    written = grew(before, after, "_requests:alone") + grew(before, after, "_requests:shared")
    assert written == 96
    assert grew(before, after, "s:shared") >= 1, after


def test_queued_requests_share_one_commit_each_with_its_own_outcome(app):
    """Requests queued behind a write in flight are written by one statement: new packets,
    duplicates of each other and of stored ones, an Idempotency-Key retry and a small batch
    each get their own answer."""
    stored = make_packet(user_id="share")
    assert post(app, stored).status_code == 200
    twin = make_packet(user_id="share")
    keyed = make_packet(user_id="share")
    retried = make_packet(user_id="share")  # another packet under the same key: a retry
    batch = [make_packet(user_id="share"), make_packet(user_id="share")]
    rest = [
        twin,
        twin,
        stored,
        (keyed, {"Idempotency-Key": "k-1"}),
        (retried, {"Idempotency-Key": "k-1"}),
        {"packets": [batch[0], batch[1], twin]},
    ]
    before = commits(app)
    first, *answers = queued_together(app, make_packet(user_id="share"), rest)
    after = commits(app)

    assert first.status_code == 200 and not first.json.get("duplicate")
    assert all(answer.status_code == 200 for answer in answers), [a.json for a in answers]
    twin_a, twin_b, again, key_a, key_b, envelope = (answer.json for answer in answers)
    assert twin_a["packet_id"] == twin_b["packet_id"]
    # The threads queue in any order: one of each pair is stored, the other is its duplicate.
    assert sorted([bool(twin_a.get("duplicate")), bool(twin_b.get("duplicate"))]) == [False, True]
    assert again["duplicate"] is True
    assert key_a["packet_id"] == key_b["packet_id"]
    assert sorted([bool(key_a.get("duplicate")), bool(key_b.get("duplicate"))]) == [False, True]
    results = envelope["results"]
    assert [r["status"] for r in results[:2]] == ["ingested", "ingested"]
    assert results[2]["packet_id"] == twin_a["packet_id"]
    assert count_rows(app, "user_id = :u", u="share") == 6  # stored, first, twin, key, batch x2
    assert grew(before, after, "s:shared") == 1
    assert grew(before, after, "_requests:shared") == len(rest)
    assert grew(before, after, "_packets:shared") == 8


POISON = {
    "postgres": [
        "CREATE FUNCTION coalescing_poison() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'poisoned row'; END $$",
        "CREATE TRIGGER coalescing_poison BEFORE INSERT ON packets FOR EACH ROW "
        "WHEN (NEW.user_id = 'poison') EXECUTE FUNCTION coalescing_poison()",
    ],
    "sqlite": [
        "CREATE TRIGGER coalescing_poison BEFORE INSERT ON packets "
        "WHEN NEW.user_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    ],
}
CURE = {
    "postgres": [
        "DROP TRIGGER IF EXISTS coalescing_poison ON packets",
        "DROP FUNCTION IF EXISTS coalescing_poison()",
    ],
    "sqlite": ["DROP TRIGGER IF EXISTS coalescing_poison"],
}


def run_ddl(app, statements: list[str]) -> None:
    from sqlalchemy import text

    with app.app_context():
        with db.engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))


def test_a_poison_row_fails_only_its_own_request(app, backend):
    """A row the database refuses sinks the shared statement; each request is then retried
    alone, so only the poisoned one fails (500) and its batch-mates are stored and answered."""
    run_ddl(app, POISON[backend])
    try:
        good = [make_packet(user_id=f"mate-{n}") for n in range(6)]
        rest = [*good[:3], make_packet(user_id="poison"), *good[3:]]
        before = commits(app)
        first, *answers = queued_together(app, make_packet(user_id="lead"), rest)
        after = commits(app)
    finally:
        run_ddl(app, CURE[backend])
    assert first.status_code == 200
    assert answers[3].status_code == 500
    assert answers[3].json["message"] == "Internal server error."
    mates = [answer for index, answer in enumerate(answers) if index != 3]
    assert all(answer.status_code == 200 for answer in mates)
    assert len({answer.json["packet_id"] for answer in mates}) == 6
    assert not any(answer.json.get("duplicate") for answer in mates)
    assert count_rows(app) == 7
    assert count_rows(app, "user_id = 'poison'") == 0
    assert grew(before, after, "s:shared") == 0  # the shared write failed, so none committed
    assert grew(before, after, "s:alone") == 7  # the first, then each good mate alone


class PausedAfterFirstWrite:
    """The coalescer's first write, once committed, waits for ``resume()`` before its leader
    answers and hands on: the requests that arrive meanwhile queue for the next write."""

    def __init__(self, coalescer) -> None:
        self.coalescer = coalescer
        self.real_write = coalescer.write
        self.committed = threading.Event()
        self.resumed = threading.Event()
        self.calls = 0
        coalescer.write = self.write

    def write(self, batch):
        self.calls += 1
        results = self.real_write(batch)
        if self.calls == 1:
            self.committed.set()
            assert self.resumed.wait(60), "the test never resumed the first write"
        return results

    def resume(self) -> None:
        self.resumed.set()

    def undo(self) -> None:
        self.resumed.set()
        self.coalescer.write = self.real_write


def test_database_stopped_under_a_shared_write_answers_each_request_503(private_postgres):
    """The database stops while a shared write is in flight: every request of it is
    answered 503 with Retry-After, none a false "ingested", and nothing of it is stored.

    No timing is guessed: the first write commits and pauses; the others queue behind it; a
    table lock is taken; the first write's leader goes on, so the shared write starts and
    waits for that lock inside the server; the server is stopped under it."""
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": private_postgres.url,
            "REDIS_URL": None,
            "BUCKET_INGEST_COALESCE": True,
        },
        testing=True,
    )
    coalescer = app.extensions[EXTENSION_KEY]
    pause = PausedAfterFirstWrite(coalescer)
    rest = [make_packet(user_id=f"down-{n}") for n in range(8)]
    answers: list = [None] * (len(rest) + 1)

    def send(index: int, body: dict) -> None:
        answers[index] = post(app, body)

    bodies = [make_packet(user_id="up"), *rest]
    threads = [
        threading.Thread(target=send, args=(index, body), daemon=True)
        for index, body in enumerate(bodies)
    ]
    try:
        with app.app_context():
            upgrade()
        threads[0].start()
        assert pause.committed.wait(30), "the first write did not commit"
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: coalescer.waiting == len(rest), 30, "the others queued")
        with WriteHold(app) as hold:
            pause.resume()
            wait_until(
                lambda: coalescer.waiting == 0 and hold.blocked() == 1,
                30,
                "the shared write waiting for the lock in the server",
            )
            # Immediate: every backend quits at once without releasing its locks, so the
            # shared write cannot get the lock and finish in the moment the holder's session
            # ends (a fast stop ends the holder's session first, and sometimes it did).
            private_postgres.stop("immediate")
        join_all(threads, 60, "ingest")
        assert answers[0].status_code == 200 and not answers[0].json.get("duplicate")
        for answer in answers[1:]:
            assert_unavailable(answer)
        assert pause.calls == 2  # the first write, then one shared by all the others
        private_postgres.start()
        servers.dispose_engines(app)
        assert count_rows(app) == 1
        assert count_rows(app, "user_id LIKE 'down-%'") == 0
        assert post(app, rest[0]).status_code == 200
    finally:
        pause.undo()
        join_all([t for t in threads if t.ident is not None], 60, "ingest")
        servers.dispose_engines(app)


def test_a_waiting_client_that_disconnects_breaks_no_other_request():
    """Under gunicorn: the client of the write in flight and one queued client hang up; the
    other queued requests are answered as usual and every packet is stored once."""
    with fresh_database_env("coalesce") as (url, env):
        env = {**env, "BUCKET_INGEST_COALESCE": "true"}
        instance = Instance(env, workers=1, threads=8).start()
        threads: list[threading.Thread] = []
        try:
            dsn = url.replace("postgresql+psycopg://", "postgresql://")
            packets = [make_packet(user_id=f"gone-{n}") for n in range(6)]
            answers: dict[int, requests.Response] = {}

            def hang_up(packet: dict) -> None:
                """Send the whole request, then close the connection without reading."""
                body = requests.Request("POST", instance.url + INGEST, json=packet).prepare()
                head = f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(body.body)}\r\n\r\n"
                with socket.create_connection(("127.0.0.1", instance.port)) as sock:
                    sock.sendall(head.encode() + body.body)

            def send(index: int) -> None:
                answers[index] = requests.post(instance.url + INGEST, json=packets[index])

            def waiting() -> float:
                text = requests.get(instance.url + "/metrics").text
                found = re.search(r'^bucket_coalesce_waiting\{kind="ingest"\} (\S+)$', text, re.M)
                return float(found.group(1)) if found else 0.0

            with psycopg.connect(dsn) as lock:
                lock.execute("LOCK TABLE packets IN SHARE ROW EXCLUSIVE MODE")
                pid = lock.info.backend_pid

                hang_up(packets[0])  # the lone write, waiting for the lock, has no client
                wait_until(
                    lambda: blocked_by(dsn, pid) == 1, 30, "the first write waiting for the lock"
                )
                threads = [threading.Thread(target=send, args=(n,)) for n in (1, 2, 4, 5)]
                for thread in threads:
                    thread.start()
                hang_up(packets[3])  # queued behind it, then gone
                wait_until(lambda: waiting() == 5, 30, "five requests queued")
                lock.rollback()
            join_all(threads, 30, "ingest")
            assert all(answers[n].status_code == 200 for n in answers), answers
            # The five queued requests shared one write, so packet 3 is stored by now.
            assert requests.post(instance.url + INGEST, json=packets[3]).json()["duplicate"]
            with psycopg.connect(dsn) as connection:
                listed = connection.execute("SELECT user_id, count(*) FROM packets GROUP BY 1")
                assert dict(listed.fetchall()) == {f"gone-{n}": 1 for n in range(6)}
            metrics = requests.get(instance.url + "/metrics").text
            assert 'bucket_ingest_commit_requests_total{kind="shared"} 5.0' in metrics, metrics
            assert waiting() == 0
        finally:
            join_all(threads, 30, "ingest")
            instance.stop()


def test_coalescing_off_writes_each_request_on_its_own(make_app):
    """BUCKET_INGEST_COALESCE=false: no queue, each request its own statement, as before."""
    app = make_app(BUCKET_INGEST_COALESCE=False)
    assert EXTENSION_KEY not in app.extensions
    packet = make_packet(user_id="plain")
    answers = run_threads(4, lambda index: post(app, packet).json)
    assert len({answer["packet_id"] for answer in answers}) == 1
    assert count_rows(app) == 1


def test_a_shared_write_must_hold_at_least_one_packet():
    with pytest.raises(ValueError, match="BUCKET_INGEST_COALESCE_MAX"):
        create_app({"BUCKET_INGEST_COALESCE_MAX": 0, "REDIS_URL": None}, testing=True)
