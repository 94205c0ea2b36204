"""Ingest rate limits: generous for browsers and classrooms, 429 with Retry-After beyond."""

import time

import pytest

from tests import servers
from tests.factories import make_packet

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
TOKEN = "operator-token"


def limited(make_app, **overrides):
    """An app with rate limiting on (the test config turns it off for other suites)."""
    return make_app(BUCKET_RATE_LIMIT_ENABLED=True, BUCKET_CONSUMER_TOKEN=[TOKEN], **overrides)


def from_address(address):
    return {"REMOTE_ADDR": address}


def batch(user_id, size):
    return {"packets": [make_packet(user_id=user_id) for _ in range(size)], "batch_size": size}


def post(client, packet, address=None, headers=None):
    """POST one packet or batch, optionally from another address or with headers."""
    environ = from_address(address) if address else {}
    return client.post(INGEST, json=packet, environ_base=environ, headers=headers or {})


def assert_too_many(response):
    """429 in the one error shape with a usable Retry-After."""
    assert response.status_code == 429
    assert response.json["code"] == 429 and response.json["status"] == "Too Many Requests"
    assert "limit" in response.json["message"]
    assert int(response.headers["Retry-After"]) >= 1


def test_a_real_browser_with_an_offline_backlog_is_never_limited(make_app):
    """One learner: a reconnect flushes 100 queued packets at once, then one every 5 s."""
    client = limited(make_app).test_client()
    for _ in range(100):
        assert client.post(INGEST, json=make_packet(user_id="learner")).status_code == 200
    assert client.post(INGEST, json=batch("learner", 100)).status_code == 200
    for _ in range(12):
        assert client.post(INGEST, json=make_packet(user_id="learner")).status_code == 200


def test_a_classroom_behind_one_nat_address_is_never_limited(make_app):
    """60 learners on one address: each flushes an offline queue of 100, then a minute of 5 s
    packets; every request is accepted under the default limits."""
    client = limited(make_app).test_client()
    nat = from_address("203.0.113.7")
    learners = [f"learner-{n}" for n in range(60)]
    for learner in learners:
        response = client.post(INGEST, json=batch(learner, 100), environ_base=nat)
        assert response.status_code == 200, response.json
    for _ in range(12):
        for learner in learners:
            response = client.post(INGEST, json=make_packet(user_id=learner), environ_base=nat)
            assert response.status_code == 200, response.json
    status = client.get(f"{API}/status", headers={"X-API-Key": TOKEN}).json
    assert status["total_packets"] == 60 * 112


def test_beyond_the_address_limit_ingest_gets_429_and_other_addresses_do_not(make_app):
    """Past the per-address limit: 429 JSON with Retry-After; a second address is unaffected."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_IP="5 per minute").test_client()
    for n in range(5):
        assert post(client, make_packet(user_id=f"u{n}"), "198.51.100.1").status_code == 200
    assert_too_many(post(client, make_packet(user_id="u9"), "198.51.100.1"))
    assert post(client, make_packet(user_id="u9"), "198.51.100.2").status_code == 200


def test_beyond_the_user_limit_ingest_gets_429_from_any_address(make_app):
    """The per-user limit follows the user across addresses; other users go on."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="3 per minute").test_client()
    for n in range(3):
        response = client.post(
            INGEST, json=make_packet(user_id="noisy"), environ_base=from_address(f"10.0.0.{n}")
        )
        assert response.status_code == 200
    assert_too_many(post(client, make_packet(user_id="noisy"), "10.9.9.9"))
    assert client.post(INGEST, json=make_packet(user_id="calm")).status_code == 200


def test_limits_count_packets_so_a_batch_costs_its_size(make_app):
    """A batch of 8 uses 8 of a 10-packet allowance: the next batch of 5 is refused."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="10 per minute").test_client()
    assert client.post(INGEST, json=batch("batcher", 8)).status_code == 200
    assert_too_many(client.post(INGEST, json=batch("batcher", 5)))
    assert client.post(INGEST, json=batch("batcher", 2)).status_code == 200


def test_ems_packets_are_limited_by_employee_id(make_app):
    """Without user_id the EMS employee_id is the user the limit counts."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute").test_client()
    packet = {k: v for k, v in make_packet().items() if k != "user_id"}
    for _ in range(2):
        body = {**make_packet(), "employee_id": "emp-1"}
        body.pop("user_id")
        assert client.post(INGEST, json=body).status_code == 200
    packet["employee_id"] = "emp-1"
    assert_too_many(client.post(INGEST, json=packet))


def test_forwarded_for_is_ignored_unless_proxies_are_trusted(make_app):
    """A client cannot dodge the limit by inventing X-Forwarded-For; behind a trusted proxy the
    forwarded address is the one limited."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_IP="2 per minute").test_client()
    for n in range(2):
        headers = {"X-Forwarded-For": f"192.0.2.{n}"}
        assert post(client, make_packet(user_id=f"a{n}"), headers=headers).status_code == 200
    spoofed = {"X-Forwarded-For": "192.0.2.50"}
    assert_too_many(post(client, make_packet(user_id="a3"), headers=spoofed))

    proxied = limited(
        make_app, BUCKET_RATE_LIMIT_INGEST_PER_IP="2 per minute", BUCKET_TRUSTED_PROXIES=1
    ).test_client()
    same = {"X-Forwarded-For": "192.0.2.77"}
    for n in range(2):
        assert post(proxied, make_packet(user_id=f"b{n}"), headers=same).status_code == 200
    assert_too_many(post(proxied, make_packet(user_id="b3"), headers=same))
    fresh = {"X-Forwarded-For": "192.0.2.78"}
    assert post(proxied, make_packet(user_id="b4"), headers=fresh).status_code == 200


def test_consumer_and_operator_endpoints_are_never_throttled(make_app):
    """With a 1-packet allowance, an authenticated poller still polls and acks at will."""
    client = limited(
        make_app,
        BUCKET_RATE_LIMIT_INGEST_PER_IP="1 per minute",
        BUCKET_RATE_LIMIT_INGEST_PER_USER="1 per minute",
    ).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post(INGEST, json=make_packet()).status_code == 200
    assert client.post(INGEST, json=make_packet()).status_code == 429
    for _ in range(30):
        assert client.get(f"{API}/packets/pending?limit=10", headers=auth).status_code == 200
        assert client.get(f"{API}/status", headers=auth).status_code == 200
        ack = {"packet_id": "unknown", "success": True}
        acked = client.post(f"{API}/packets/mark-processed", json=ack, headers=auth)
        assert acked.status_code == 404
        assert client.get("/metrics").status_code == 200


def test_invalid_bodies_count_against_the_address_limit(make_app):
    """Garbage costs one packet each: it cannot slip past the per-address limit."""
    client = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_IP="3 per minute").test_client()
    for body in (b"not json", b"[1, 2]", b"{}"):
        response = client.post(INGEST, data=body, content_type="application/json")
        assert 400 <= response.status_code < 500 and response.status_code != 429
    assert_too_many(client.post(INGEST, json=make_packet()))


def test_master_switch_turns_limits_off(make_app):
    """BUCKET_RATE_LIMIT_ENABLED=false: the same traffic is never refused."""
    client = make_app(
        BUCKET_RATE_LIMIT_ENABLED=False, BUCKET_RATE_LIMIT_INGEST_PER_IP="1 per minute"
    ).test_client()
    for _ in range(5):
        assert client.post(INGEST, json=make_packet()).status_code == 200


def test_the_switch_reads_its_environment_name(monkeypatch):
    """The variable is BUCKET_RATE_LIMIT_ENABLED, on by default in production settings."""
    from config import Config

    monkeypatch.delenv("BUCKET_RATE_LIMIT_ENABLED", raising=False)
    assert Config().BUCKET_RATE_LIMIT_ENABLED is True
    monkeypatch.setenv("BUCKET_RATE_LIMIT_ENABLED", "false")
    assert Config().BUCKET_RATE_LIMIT_ENABLED is False
    monkeypatch.setenv("BUCKET_RATE_LIMIT_INGEST_PER_USER", "7 per second")
    assert Config().BUCKET_RATE_LIMIT_INGEST_PER_USER == "7 per second"


# Memory counters belong to one process by design: sharing needs Redis.
@pytest.mark.parametrize("backend", ["postgres"])
def test_instances_sharing_redis_share_the_counters(make_app, backend):
    """Two instances on one Redis: the allowance is for both together, not each."""
    one = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="4 per minute").test_client()
    two = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="4 per minute").test_client()
    for client in (one, two, one, two):
        assert client.post(INGEST, json=make_packet(user_id="shared")).status_code == 200
    assert_too_many(two.post(INGEST, json=make_packet(user_id="shared")))


def test_limits_survive_redis_dying_by_falling_back_to_memory(make_app, tmp_path):
    """Redis killed mid-traffic: ingest keeps answering (no 5xx) and limits still hold."""
    private = servers.PrivateRedis().start()
    try:
        app = limited(
            make_app, REDIS_URL=private.url, BUCKET_RATE_LIMIT_INGEST_PER_USER="3 per minute"
        )
        client = app.test_client()
        assert client.post(INGEST, json=make_packet(user_id="r1")).status_code == 200
        private.kill()
        started = time.monotonic()
        for _ in range(3):
            assert client.post(INGEST, json=make_packet(user_id="r2")).status_code == 200
        assert_too_many(client.post(INGEST, json=make_packet(user_id="r2")))
        assert time.monotonic() - started < 10
    finally:
        private.stop()


def test_a_request_refused_by_one_limit_spends_no_other_allowance(make_app):
    """A user over their limit does not use up their classroom's: the address and user
    windows are checked and counted together, all or nothing (in one script on Redis)."""
    client = limited(
        make_app,
        BUCKET_RATE_LIMIT_INGEST_PER_IP="3 per minute",
        BUCKET_RATE_LIMIT_INGEST_PER_USER="1 per minute",
    ).test_client()
    assert post(client, make_packet(user_id="eager")).status_code == 200
    for _ in range(3):
        assert_too_many(post(client, make_packet(user_id="eager")))
    # Refusals cost the address nothing: two more learners still fit in its 3 per minute.
    assert post(client, make_packet(user_id="second")).status_code == 200
    assert post(client, make_packet(user_id="third")).status_code == 200
    assert_too_many(post(client, make_packet(user_id="fourth")))


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
def test_other_strategies_of_the_limits_library_work_too(make_app, strategy):
    """BUCKET_RATE_LIMIT_STRATEGY picks any strategy of ``limits``; each one limits."""
    client = limited(
        make_app,
        BUCKET_RATE_LIMIT_STRATEGY=strategy,
        BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute",
    ).test_client()
    for _ in range(2):
        assert post(client, make_packet(user_id="strategic")).status_code == 200
    assert_too_many(post(client, make_packet(user_id="strategic")))
