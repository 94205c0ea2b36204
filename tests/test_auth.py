"""Consumer authentication: the token guards delivery and status, ingest and probes stay open."""

import logging

import pytest

from tests.factories import make_packet

API = "/api/v1/bucket/prana"
TOKENS = ["alpha-token-current", "beta-token-previous"]
PROTECTED = [
    ("get", f"{API}/packets/pending?limit=1", None),
    ("post", f"{API}/packets/mark-processed", {"packet_id": "nope", "success": True}),
    ("post", f"{API}/packets/lease", {"packet_id": "x", "receipt": "y", "visibility_timeout": 5}),
    ("get", f"{API}/packets/user/stu_test", None),
    ("get", f"{API}/status", None),
    ("get", f"{API}/quarantine", None),
    ("get", f"{API}/quarantine/1", None),
    ("post", f"{API}/quarantine/replay", {}),
]
OPEN = ["/health", "/health/ready", "/metrics", "/openapi.json", "/docs"]


@pytest.fixture
def app_config():
    """Two valid tokens, as during a key rotation."""
    return {"BUCKET_CONSUMER_TOKEN": list(TOKENS)}


def call(client, method, url, body, headers=None):
    return getattr(client, method)(url, json=body, headers=headers or {})


@pytest.mark.parametrize(("method", "url", "body"), PROTECTED)
def test_protected_endpoint_without_token_is_401_with_challenge(client, method, url, body):
    """No token at all: 401 in the one error shape, with a Bearer challenge."""
    response = call(client, method, url, body)
    assert response.status_code == 401
    assert response.json["code"] == 401 and response.json["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "url", "body"), PROTECTED)
def test_protected_endpoint_with_wrong_token_is_403(client, method, url, body):
    """A wrong token (also a prefix of a real one) is refused with 403 by either header."""
    for headers in (
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": TOKENS[0][:-1]},
        {"Authorization": f"Bearer {TOKENS[0]}x"},
    ):
        response = call(client, method, url, body, headers)
        assert response.status_code == 403, headers
        assert response.json["status"] == "Forbidden"


def test_every_rotated_token_works_by_either_header(client):
    """Both tokens of a rotation work, as Bearer or as X-API-Key."""
    for headers in (
        {"Authorization": f"Bearer {TOKENS[0]}"},
        {"Authorization": f"bearer {TOKENS[1]}"},
        {"X-API-Key": TOKENS[0]},
        {"X-API-Key": TOKENS[1]},
    ):
        assert client.get(f"{API}/packets/pending", headers=headers).status_code == 200
        status = client.get(f"{API}/status", headers=headers)
        assert status.status_code == 200
        assert status.json["consumer_auth"] is True


def test_authenticated_consumer_cycle_works(client):
    """Ingest without a token, then poll and acknowledge with one."""
    posted = client.post(f"{API}/ingest", json=make_packet())
    assert posted.status_code == 200
    auth = {"Authorization": f"Bearer {TOKENS[1]}"}
    polled = client.get(f"{API}/packets/pending", headers=auth).json["packets"]
    assert [p["packet_id"] for p in polled] == [posted.json["packet_id"]]
    acked = client.post(
        f"{API}/packets/mark-processed",
        json={"packet_id": polled[0]["packet_id"], "success": True},
        headers=auth,
    )
    assert acked.status_code == 200
    assert client.get(f"{API}/packets/user/stu_test", headers=auth).status_code == 200


def test_a_refused_poll_leases_nothing(client):
    """A 401/403 poll is stopped before the database: the packet stays ready for real consumers."""
    client.post(f"{API}/ingest", json=make_packet())
    assert client.get(f"{API}/packets/pending").status_code == 401
    assert client.get(f"{API}/packets/pending", headers={"X-API-Key": "bad"}).status_code == 403
    status = client.get(f"{API}/status", headers={"X-API-Key": TOKENS[0]}).json
    assert status["queue_size"] == 1 and status["leased_packets"] == 0


@pytest.mark.parametrize("path", OPEN)
def test_service_endpoints_stay_open(client, path):
    """Probes, metrics, the API document and its page need no token."""
    assert client.get(path).status_code == 200


def test_ingest_stays_open_to_browsers(client):
    """The bridge sends no token: ingest (and its CORS preflight) must not ask for one."""
    response = client.post(
        f"{API}/ingest", json=make_packet(), headers={"Origin": "http://localhost:5173"}
    )
    assert response.status_code == 200
    preflight = client.options(
        f"{API}/ingest",
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200


def test_without_a_token_the_service_is_open_warns_and_says_so(make_app, caplog):
    """No BUCKET_CONSUMER_TOKEN: it starts, logs a warning, and status reports auth off."""
    with caplog.at_level(logging.WARNING, logger="bucket.web.auth"):
        app = make_app(BUCKET_CONSUMER_TOKEN=[])
    assert any("BUCKET_CONSUMER_TOKEN is not set" in r.getMessage() for r in caplog.records)
    client = app.test_client()
    assert client.get(f"{API}/packets/pending").status_code == 200
    assert client.get(f"{API}/status").json["consumer_auth"] is False


def test_comma_separated_tokens_from_config_are_split(make_app):
    """A raw comma-separated value (as in the environment) yields each token."""
    app = make_app(BUCKET_CONSUMER_TOKEN="one, two")
    client = app.test_client()
    assert client.get(f"{API}/status", headers={"X-API-Key": "two"}).status_code == 200
    assert client.get(f"{API}/status", headers={"X-API-Key": "one, two"}).status_code == 403
