"""Durability under concurrency and faults: racing duplicates, no database, restarts, Redis loss."""

from __future__ import annotations

import time
import uuid

import pytest
from flask_migrate import upgrade
from sqlalchemy import create_engine, text

from bucket import create_app
from bucket.extensions import db
from tests import servers
from tests.concurrency import run_threads
from tests.factories import make_packet
from tests.queue_helpers import expire

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
PENDING = f"{API}/packets/pending"
ACK = f"{API}/packets/mark-processed"


def count_rows(app, where: str = "1=1", **params) -> int:
    """Rows in the packets table, read through a fresh connection (so only committed rows)."""
    with app.app_context():
        url = db.engine.url
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    f"SELECT count(*) FROM packets JOIN deliveries USING (packet_id) WHERE {where}"
                ),
                params,
            ).scalar()
    finally:
        engine.dispose()


# --- concurrent duplicates ----------------------------------------------------------------------


def test_concurrent_duplicate_ingest_stores_one_row(make_app):
    """Eight threads on two app instances post one packet at once: one row, one original."""
    apps = [make_app(), make_app()]
    app = apps[0]
    packet = make_packet(user_id="racer")

    def post(index: int):
        response = apps[index % 2].test_client().post(INGEST, json=packet)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.json

    answers = run_threads(8, post)
    assert len({a["packet_id"] for a in answers}) == 1
    assert sum(1 for a in answers if not a.get("duplicate")) == 1
    assert count_rows(app, "user_id = :u", u="racer") == 1
    assert app.test_client().get(f"{PENDING}?limit=50").json["count"] == 1


def test_concurrent_duplicates_as_instants_and_keys_store_one_row(make_app):
    """Racing copies differing in offset or sub-millisecond digits, with one key, are one row."""
    app = make_app()
    forms = [
        "2026-11-28T10:00:00.777Z",
        "2026-11-28T15:30:00.777+05:30",
        "2026-11-28T10:00:00.7771",
        "2026-11-28T05:00:00.777999-05:00",
    ]

    def post(index: int):
        packet = make_packet(user_id="racer2", timestamp=forms[index % len(forms)])
        response = app.test_client().post(
            INGEST, json=packet, headers={"Idempotency-Key": "same-key"}
        )
        assert response.status_code == 200
        return response.json["packet_id"]

    assert len(set(run_threads(8, post))) == 1
    assert count_rows(app) == 1


def test_concurrent_overlapping_batches_store_each_packet_once(make_app):
    """Threads posting overlapping batches: every distinct packet stored exactly once."""
    app = make_app()
    packets = [make_packet(user_id="batcher") for _ in range(30)]

    def post(index: int):
        window = packets[index * 3 : index * 3 + 12]
        response = app.test_client().post(INGEST, json={"packets": window})
        assert response.status_code == 200
        return {r["packet_id"] for r in response.json["results"]}

    results = run_threads(6, post)
    assert count_rows(app, "user_id = :u", u="batcher") == len(set().union(*results)) == 27


# --- the database is the record -----------------------------------------------------------------


def test_ingested_means_committed(client, app):
    """Every 'ingested' answer is visible to another connection at once."""
    for n in range(5):
        response = client.post(INGEST, json=make_packet(user_id="durable"))
        assert response.status_code == 200
        assert count_rows(app, "packet_id = :p", p=response.json["packet_id"]) == 1
        assert count_rows(app) == n + 1


def unreachable_url(backend: str, tmp_path) -> str:
    if backend == "postgres":
        return f"postgresql+psycopg://postgres@127.0.0.1:{servers.free_port()}/nowhere"
    return f"sqlite:///{tmp_path}/missing-dir/bucket.sqlite3"


def assert_unavailable(response) -> None:
    """503 in the one JSON shape, with Retry-After: the bridge will retry."""
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.json["code"] == 503 and response.json["message"]
    assert int(response.headers["Retry-After"]) > 0


def test_unreachable_database_answers_503_never_2xx(backend, tmp_path):
    """No database: ingest, batches, polls, acks and status all refuse with 503 + Retry-After."""
    app = create_app(
        {"SQLALCHEMY_DATABASE_URI": unreachable_url(backend, tmp_path), "REDIS_URL": None},
        testing=True,
    )
    client = app.test_client()
    try:
        assert_unavailable(client.post(INGEST, json=make_packet()))
        assert_unavailable(client.post(INGEST, json={"packets": [make_packet(), make_packet()]}))
        assert_unavailable(client.get(PENDING))
        # An id in the form the service hands out: one that is not names no packet (404)
        # without asking the database.
        unseen = "01900000-0000-7000-8000-000000000000"
        assert_unavailable(client.post(ACK, json={"packet_id": unseen, "success": True}))
        assert_unavailable(client.get(f"{API}/status"))
        # Bad input stays a 422 naming the field; the quarantine cannot keep it without a
        # database, and the bridge resends refused packets, so it is kept once one answers.
        refused = client.post(INGEST, json=make_packet(role="x"))
        assert refused.status_code == 422 and "role" in refused.json["errors"]["json"]
        assert "quarantine_id" not in refused.json
    finally:
        servers.dispose_engines(app)


@pytest.mark.parametrize("backend", ["postgres"])
def test_dropped_postgres_database_mid_test_answers_503(backend, postgres_database):
    """PostgreSQL vanishing under a running app: every later ingest is 503, none is 2xx."""
    name, url = servers.create_database()
    app = create_app({"SQLALCHEMY_DATABASE_URI": url, "REDIS_URL": None}, testing=True)
    try:
        with app.app_context():
            upgrade()
        client = app.test_client()
        assert client.post(INGEST, json=make_packet()).status_code == 200
        assert client.post(INGEST, json={"packets": [make_packet()]}).status_code == 200
        servers.drop_database(name)
        for _ in range(3):
            assert_unavailable(client.post(INGEST, json=make_packet()))
            assert_unavailable(client.post(INGEST, json={"packets": [make_packet()]}))
            assert_unavailable(client.get(PENDING))
    finally:
        servers.dispose_engines(app)
        servers.drop_database(name)


def test_restarted_app_serves_packets_ingested_before_the_restart(make_app):
    """Nothing lives only in a process: a new app on the same database serves everything."""
    before = make_app()
    client = before.test_client()
    ids = [client.post(INGEST, json=make_packet()).json["packet_id"] for _ in range(4)]
    leased = client.get(f"{PENDING}?limit=1&visibility_timeout=60").json["packets"]
    assert [p["packet_id"] for p in leased] == ids[:1]
    del client, before  # the "crash": the first process and its memory queue are gone

    restarted = make_app()
    after = restarted.test_client()
    assert [p["packet_id"] for p in after.get(f"{PENDING}?limit=10").json["packets"]] == ids[1:]
    expire(restarted, ids[:1])  # the crashed process's lease runs out
    assert [p["packet_id"] for p in after.get(f"{PENDING}?limit=10").json["packets"]] == ids[:1]
    for packet_id in ids:
        assert after.post(ACK, json={"packet_id": packet_id, "success": True}).status_code == 200
    assert after.get(f"{API}/status").json["processed_packets"] == 4


def test_a_packet_ingested_on_one_instance_is_served_by_another(make_app):
    """Two app instances (workers) on one database share the queue, memory backend or not."""
    first, second = make_app().test_client(), make_app().test_client()
    packet_id = first.post(INGEST, json=make_packet()).json["packet_id"]
    assert [p["packet_id"] for p in second.get(PENDING).json["packets"]] == [packet_id]
    assert first.get(PENDING).json["count"] == 0


# --- Redis comes and goes -----------------------------------------------------------------------


@pytest.fixture
def private_redis():
    """A redis-server of this test's own, killed and removed afterwards."""
    server = servers.PrivateRedis().start()
    yield server
    server.stop()


def test_redis_killed_mid_test_loses_nothing(make_app, private_redis):
    """Ingest and pending keep working when Redis dies; status says so; every packet is served."""
    app = make_app(
        REDIS_URL=private_redis.url,
        BUCKET_REDIS_RETRY_AFTER=0.2,
        BUCKET_REDIS_PREFIX=f"resilience-{uuid.uuid4().hex[:8]}",
    )
    client = app.test_client()
    ids = [client.post(INGEST, json=make_packet()).json["packet_id"] for _ in range(3)]
    status = client.get(f"{API}/status").json
    assert (status["redis_connected"], status["queue_backend"]) == (True, "redis")
    first = client.get(f"{PENDING}?limit=1").json["packets"]
    assert [p["packet_id"] for p in first] == ids[:1]

    private_redis.kill()
    for _ in range(3):
        response = client.post(INGEST, json=make_packet())
        assert response.status_code == 200
        ids.append(response.json["packet_id"])
    batch = client.post(INGEST, json={"packets": [make_packet(), make_packet()]})
    assert batch.status_code == 200
    ids.extend(r["packet_id"] for r in batch.json["results"])
    status = client.get(f"{API}/status").json
    assert status["redis_connected"] is False
    assert status["queue_backend"] == "memory"
    assert status["total_packets"] == 8

    waited = client.get(f"{PENDING}?limit=50&wait=1")
    assert waited.status_code == 200
    served = [p["packet_id"] for p in waited.json["packets"]]
    assert sorted(served) == sorted(ids[1:])  # a batch shares one arrival time: any order
    assert client.get(f"{PENDING}?limit=50&wait=0.2").json["count"] == 0
    for packet_id in ids:
        assert client.post(ACK, json={"packet_id": packet_id, "success": True}).status_code == 200
    status = client.get(f"{API}/status").json
    assert (status["processed_packets"], status["pending_packets"]) == (8, 0)
    assert count_rows(app, "delivery_state = 'processed'") == 8


def test_redis_coming_back_is_used_again(make_app, private_redis):
    """After Redis restarts, status reports it connected again and packets keep flowing."""
    app = make_app(
        REDIS_URL=private_redis.url,
        BUCKET_REDIS_RETRY_AFTER=0.2,
        BUCKET_REDIS_PREFIX=f"resilience-{uuid.uuid4().hex[:8]}",
    )
    client = app.test_client()
    private_redis.kill()
    assert client.post(INGEST, json=make_packet()).status_code == 200
    assert client.get(f"{API}/status").json["redis_connected"] is False
    private_redis.start()
    time.sleep(0.3)
    status = client.get(f"{API}/status").json
    assert (status["redis_connected"], status["queue_backend"]) == (True, "redis")
    assert client.post(INGEST, json=make_packet()).status_code == 200
    assert client.get(f"{PENDING}?limit=10").json["count"] == 2
