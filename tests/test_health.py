"""Liveness and readiness probes: fast, open, JSON; readiness fails only with the database."""

import pytest

from tests import servers

TOKEN_CONFIG = {"BUCKET_CONSUMER_TOKEN": ["secret"]}


def unreachable_database(backend, tmp_path) -> str:
    """A database URL of the backend's kind that cannot be opened."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/missing-dir/bucket.sqlite3"
    return f"postgresql+psycopg://postgres@127.0.0.1:{servers.free_port()}/gone?connect_timeout=2"


@pytest.fixture
def app_config():
    """Probes must answer without the consumer token."""
    return TOKEN_CONFIG


def test_health_answers_ok_without_a_token(client):
    """Liveness: 200 {"status": "ok"} as JSON, no token needed."""
    response = client.get("/health")
    assert response.status_code == 200
    assert response.is_json and response.json == {"status": "ok"}


def test_ready_reports_database_and_queue_backend(client, backend):
    """Readiness: 200 with the database up, and the live queue backend named."""
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ok" and body["database"] is True
    expected = "memory" if backend == "sqlite" else "redis"
    assert body["queue_backend"] == expected
    assert body["redis_connected"] is (backend == "postgres")


def test_ready_is_503_when_the_database_is_gone_but_health_stays_200(make_app, backend, tmp_path):
    """No database: readiness says 503 (take the instance out), liveness still 200."""
    make_app()  # the fixture cleans up through its first app, which must reach the database
    app = make_app(SQLALCHEMY_DATABASE_URI=unreachable_database(backend, tmp_path), **TOKEN_CONFIG)
    client = app.test_client()
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json["status"] == "unavailable" and ready.json["database"] is False
    assert client.get("/health").status_code == 200


def test_ready_survives_redis_being_down(make_app):
    """Redis unreachable is reported but not fatal: the memory fallback keeps the service up."""
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{servers.free_port()}/0", **TOKEN_CONFIG)
    response = app.test_client().get("/health/ready")
    assert response.status_code == 200
    assert response.json["redis_connected"] is False
    assert response.json["queue_backend"] == "memory"
