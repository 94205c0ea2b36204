"""Configuration comes from the environment, by the names the README documents.

Every variable in the README's configuration table is set here through the real environment
(never through a config key the environment cannot produce), and the service is checked to have
read it; an empty value must behave exactly like an unset one, in ``config.py`` and in
``gunicorn.conf.py`` alike; ``.env.example`` lists the same variables and pins no value that
contradicts a documented default.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from bucket import create_app
from bucket.extensions import db
from config import Config
from tests.conftest import clean_state, is_service_variable
from tests.factories import make_packet
from tests.servers import dispose_engines

ROOT = Path(__file__).resolve().parent.parent


def readme_variables() -> list[str]:
    """The variable names of the README's "Configuration" table, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names += re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell)
    return names


def env_example() -> dict[str, str]:
    """``.env.example`` loaded the way the README says (``set -a; . ./.env.example``)."""
    script = "set -a; . ./.env.example; set +a; env -0"
    output = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env={}, capture_output=True, check=True
    ).stdout
    pairs = (item.split("=", 1) for item in output.decode().split("\0") if "=" in item)
    return {name: value for name, value in pairs if is_service_variable(name)}


def gunicorn_settings() -> dict:
    """``gunicorn.conf.py`` evaluated as gunicorn evaluates it, under the current environment."""
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


# Each documented variable: a value other than its default, and what the service makes of it.
# ``config`` names the config key that must hold the parsed value; ``gunicorn`` a setting.
CASES: dict[str, dict] = {
    "DATABASE_URL": {
        "value": "postgres://someone@db.example:5432/bucket",
        "config": (
            "SQLALCHEMY_DATABASE_URI",
            "postgresql+psycopg://someone@db.example:5432/bucket",
        ),
    },
    "REDIS_URL": {"value": "redis://cache.example:6380/2", "config": ("REDIS_URL", None)},
    "BUCKET_REDIS_PREFIX": {"value": "tenant-7", "config": ("BUCKET_REDIS_PREFIX", None)},
    "BUCKET_REDIS_RETRY_AFTER": {"value": "2.5", "config": ("BUCKET_REDIS_RETRY_AFTER", 2.5)},
    "PORT": {"value": "4123", "gunicorn": ("bind", "0.0.0.0:4123")},
    "WEB_CONCURRENCY": {"value": "5", "gunicorn": ("workers", 5)},
    "BUCKET_THREADS": {
        "value": "9",
        "gunicorn": ("threads", 9),
        "config": ("BUCKET_DB_POOL_SIZE", 9),  # the pool follows the threads by default
    },
    "BUCKET_DB_POOL_SIZE": {"value": "7", "config": ("BUCKET_DB_POOL_SIZE", 7)},
    "BUCKET_DB_MAX_OVERFLOW": {"value": "3", "config": ("BUCKET_DB_MAX_OVERFLOW", 3)},
    "BUCKET_CORS_ORIGINS": {
        "value": "https://a.example, https://b.example",
        "config": ("BUCKET_CORS_ORIGINS", ["https://a.example", "https://b.example"]),
    },
    "BUCKET_CONSUMER_TOKEN": {
        "value": "first,second",
        "config": ("BUCKET_CONSUMER_TOKEN", ["first", "second"]),
    },
    "BUCKET_METRICS_TOKEN": {
        "value": "scraper-one,scraper-two",
        "config": ("BUCKET_METRICS_TOKEN", ["scraper-one", "scraper-two"]),
    },
    "BUCKET_METRICS_REQUIRE_TOKEN": {
        "value": "true",
        "config": ("BUCKET_METRICS_REQUIRE_TOKEN", True),
    },
    "BUCKET_VISIBILITY_TIMEOUT": {"value": "17", "config": ("BUCKET_VISIBILITY_TIMEOUT", 17)},
    "BUCKET_MAX_ATTEMPTS": {"value": "8", "config": ("BUCKET_MAX_ATTEMPTS", 8)},
    "BUCKET_RETRY_BACKOFF": {"value": "2.5", "config": ("BUCKET_RETRY_BACKOFF", 2.5)},
    "BUCKET_RETRY_BACKOFF_MAX": {"value": "99", "config": ("BUCKET_RETRY_BACKOFF_MAX", 99.0)},
    "BUCKET_MAX_BODY_BYTES": {"value": "2048", "config": ("MAX_CONTENT_LENGTH", 2048)},
    "BUCKET_MAX_BATCH_SIZE": {"value": "50", "config": ("BUCKET_MAX_BATCH_SIZE", 50)},
    "BUCKET_INGEST_COALESCE": {"value": "false", "config": ("BUCKET_INGEST_COALESCE", False)},
    "BUCKET_INGEST_COALESCE_MAX": {"value": "16", "config": ("BUCKET_INGEST_COALESCE_MAX", 16)},
    "BUCKET_ACK_COALESCE": {"value": "true", "config": ("BUCKET_ACK_COALESCE", True)},
    "BUCKET_ACK_COALESCE_MAX": {"value": "16", "config": ("BUCKET_ACK_COALESCE_MAX", 16)},
    "BUCKET_MAX_JSON_DEPTH": {"value": "8", "config": ("BUCKET_MAX_JSON_DEPTH", 8)},
    "BUCKET_REQUEST_READ_TIMEOUT": {
        "value": "4.5",
        "config": ("BUCKET_REQUEST_READ_TIMEOUT", 4.5),
    },
    "BUCKET_HEAP_TRIM_INTERVAL": {"value": "7.5", "config": ("BUCKET_HEAP_TRIM_INTERVAL", 7.5)},
    "BUCKET_COGNITIVE_STATES": {
        "value": "ON_TASK, FATIGUED",
        "config": ("BUCKET_COGNITIVE_STATES", ["ON_TASK", "FATIGUED"]),
    },
    "BUCKET_QUARANTINE_MAX_ROWS": {"value": "10", "config": ("BUCKET_QUARANTINE_MAX_ROWS", 10)},
    "BUCKET_QUARANTINE_MAX_BYTES": {
        "value": "4096",
        "config": ("BUCKET_QUARANTINE_MAX_BYTES", 4096),
    },
    "BUCKET_QUARANTINE_RETENTION_DAYS": {
        "value": "1.5",
        "config": ("BUCKET_QUARANTINE_RETENTION_DAYS", 1.5),
    },
    "BUCKET_LONG_POLL_INTERVAL": {"value": "0.25", "config": ("BUCKET_LONG_POLL_INTERVAL", 0.25)},
    "BUCKET_RETENTION_DAYS": {"value": "9", "config": ("BUCKET_RETENTION_DAYS", 9)},
    "BUCKET_PURGE_BATCH_SIZE": {"value": "250", "config": ("BUCKET_PURGE_BATCH_SIZE", 250)},
    "BUCKET_PARTITION_DAYS_AHEAD": {
        "value": "3",
        "config": ("BUCKET_PARTITION_DAYS_AHEAD", 3),
    },
    "BUCKET_BOOKKEEPING_INTERVAL": {
        "value": "0.5",
        "config": ("BUCKET_BOOKKEEPING_INTERVAL", 0.5),
    },
    "BUCKET_AUDIT_SEAL_INTERVAL": {
        "value": "2.5",
        "config": ("BUCKET_AUDIT_SEAL_INTERVAL", 2.5),
    },
    "BUCKET_AUDIT_SEAL_MAX_PACKETS": {
        "value": "1000",
        "config": ("BUCKET_AUDIT_SEAL_MAX_PACKETS", 1000),
    },
    "BUCKET_TRUSTED_PROXIES": {"value": "1", "config": ("BUCKET_TRUSTED_PROXIES", 1)},
    "BUCKET_RATE_LIMIT_ENABLED": {
        "value": "false",
        "config": ("BUCKET_RATE_LIMIT_ENABLED", False),
    },
    "BUCKET_RATE_LIMIT_INGEST_PER_IP": {
        "value": "5 per second",
        "config": ("BUCKET_RATE_LIMIT_INGEST_PER_IP", None),
    },
    "BUCKET_RATE_LIMIT_INGEST_PER_USER": {
        "value": "3 per second",
        "config": ("BUCKET_RATE_LIMIT_INGEST_PER_USER", None),
    },
    "BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP": {
        "value": "4096 per second",
        "config": ("BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP", None),
    },
    "BUCKET_RAW_SIGNALS_MAX_BYTES": {
        "value": "2048",
        "config": ("BUCKET_RAW_SIGNALS_MAX_BYTES", 2048),
    },
    "BUCKET_SIGNAL_KEY_SETS_MAX": {
        "value": "50",
        "config": ("BUCKET_SIGNAL_KEY_SETS_MAX", 50),
    },
    "BUCKET_RATE_LIMIT_STRATEGY": {
        "value": "fixed-window",
        "config": ("BUCKET_RATE_LIMIT_STRATEGY", None),
    },
    "BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT": {
        "value": "7 per second",
        "config": ("BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT", None),
    },
    "BUCKET_INGEST_AUTH": {
        "value": "observe",
        "config": ("BUCKET_INGEST_AUTH", None),
        "with": {"BUCKET_INGEST_JWT_SECRET": "s" * 32},  # observe without a key stops the start
    },
    "BUCKET_INGEST_JWT_SECRET": {
        "value": "shared-secret",
        "config": ("BUCKET_INGEST_JWT_SECRET", None),
    },
    "BUCKET_INGEST_JWT_PUBLIC_KEY": {
        "value": "/keys/gurukul.pem",
        "config": ("BUCKET_INGEST_JWT_PUBLIC_KEY", None),
    },
    "BUCKET_INGEST_JWKS_URL": {
        "value": "https://id.example/.well-known/jwks.json",
        "config": ("BUCKET_INGEST_JWKS_URL", None),
    },
    "BUCKET_INGEST_JWKS_TIMEOUT": {
        "value": "1.5",
        "config": ("BUCKET_INGEST_JWKS_TIMEOUT", 1.5),
    },
    "BUCKET_INGEST_JWKS_CACHE_SECONDS": {
        "value": "60",
        "config": ("BUCKET_INGEST_JWKS_CACHE_SECONDS", 60.0),
    },
    "BUCKET_INGEST_JWT_ALGORITHMS": {
        "value": "RS256,ES256",
        "config": ("BUCKET_INGEST_JWT_ALGORITHMS", ["RS256", "ES256"]),
    },
    "BUCKET_INGEST_JWT_USER_CLAIM": {
        "value": "uid",
        "config": ("BUCKET_INGEST_JWT_USER_CLAIM", None),
    },
    "BUCKET_INGEST_JWT_SESSION_CLAIM": {
        "value": "session_id",
        "config": ("BUCKET_INGEST_JWT_SESSION_CLAIM", None),
    },
    "BUCKET_INGEST_JWT_AUDIENCE": {
        "value": "prana-bucket",
        "config": ("BUCKET_INGEST_JWT_AUDIENCE", None),
    },
    "BUCKET_INGEST_JWT_ISSUER": {
        "value": "https://gurukul.example",
        "config": ("BUCKET_INGEST_JWT_ISSUER", None),
    },
    "BUCKET_INGEST_JWT_LEEWAY": {"value": "5", "config": ("BUCKET_INGEST_JWT_LEEWAY", 5.0)},
    "BUCKET_MAX_CLOCK_SKEW": {"value": "600", "config": ("BUCKET_MAX_CLOCK_SKEW", 600.0)},
    "BUCKET_STALE_AFTER": {"value": "120", "config": ("BUCKET_STALE_AFTER", 120.0)},
    "BUCKET_RAW_SIGNALS_KEYS": {
        "value": "tab_visible,dwell_time_ms",
        "config": ("BUCKET_RAW_SIGNALS_KEYS", ["tab_visible", "dwell_time_ms"]),
    },
    "BUCKET_REQUEST_LOG": {"value": "false", "config": ("BUCKET_REQUEST_LOG", False)},
    "LOG_LEVEL": {"value": "WARNING", "config": ("LOG_LEVEL", None)},
    "LOG_FORMAT": {"value": "text", "config": ("LOG_FORMAT", None)},
    "BUCKET_SWAGGER_UI_URL": {
        "value": "https://assets.example/swagger/",
        "config": ("OPENAPI_SWAGGER_UI_URL", None),
    },
    "PROMETHEUS_MULTIPROC_DIR": {"value": "", "gunicorn_dir": True},
}


def test_every_readme_variable_has_a_case_here_and_a_line_in_env_example():
    """README, .env.example and this test name the same variables (a new one needs all three)."""
    documented = readme_variables()
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert set(documented) == set(CASES)
    assert set(env_example()) == set(documented)


def test_the_test_suite_scrubs_every_documented_variable():
    """Every documented variable is one the suite removes from a developer's environment."""
    assert all(is_service_variable(name) for name in readme_variables())


def build_config(monkeypatch, tmp_path, environ: dict[str, str]) -> dict:
    """The config of an app created from ``environ`` alone.

    Without a DATABASE_URL in ``environ`` a scratch SQLite file stands in for the default one
    in ``instance/``, unless ``tmp_path`` is None.
    """
    for name in CASES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if "DATABASE_URL" not in environ and tmp_path is not None:
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/config.sqlite3")
    app = create_app()
    try:
        return dict(app.config)
    finally:
        dispose_engines(app)


@pytest.mark.parametrize("name", sorted(n for n in CASES if "config" in CASES[n]))
def test_each_variable_is_read_from_the_environment_by_its_documented_name(
    name, monkeypatch, tmp_path
):
    """Setting the documented variable, and nothing else, changes what the app runs with."""
    case = CASES[name]
    key, expected = case["config"]
    expected = case["value"] if expected is None else expected
    needed = case.get("with", {})  # what the variable cannot start without
    default = build_config(monkeypatch, tmp_path, needed)
    configured = build_config(monkeypatch, tmp_path, {**needed, name: case["value"]})
    assert configured[key] == expected
    assert configured[key] != default[key], f"{case['value']!r} is {name}'s default"


@pytest.mark.parametrize("name", sorted(n for n in CASES if "gunicorn" in CASES[n]))
def test_gunicorn_reads_its_variables_from_the_environment(name, monkeypatch):
    """PORT, WEB_CONCURRENCY and BUCKET_THREADS set gunicorn's bind, workers and threads."""
    setting, expected = CASES[name]["gunicorn"]
    monkeypatch.setenv(name, CASES[name]["value"])
    assert gunicorn_settings()[setting] == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_empty_variable_behaves_like_an_unset_one(name, monkeypatch, tmp_path):
    """``NAME=`` (as an empty .env line exports it) changes nothing and crashes nothing."""
    if name == "DATABASE_URL":
        tmp_path = None  # compare with the real default: the SQLite file in instance/
    unset_config = build_config(monkeypatch, tmp_path, {})
    for variable in CASES:
        monkeypatch.delenv(variable, raising=False)
    unset_gunicorn = {k: v for k, v in gunicorn_settings().items() if k.isidentifier()}
    empty_config = build_config(monkeypatch, tmp_path, {name: ""})
    empty_gunicorn = {k: v for k, v in gunicorn_settings().items() if k.isidentifier()}
    assert empty_config == unset_config
    for setting in ("bind", "workers", "threads", "timeout"):
        assert empty_gunicorn[setting] == unset_gunicorn[setting]


def test_env_example_pins_no_value_that_contradicts_a_default(monkeypatch, tmp_path):
    """Loading .env.example as the README says runs the service exactly as with no variables."""
    example = env_example()
    assert example["DATABASE_URL"] == ""  # the embedded default, so compare with it
    assert build_config(monkeypatch, None, example) == build_config(monkeypatch, None, {})
    # A default that follows another variable must not be pinned to today's value of it.
    threads = {"BUCKET_THREADS": "5"}
    assert build_config(monkeypatch, None, {**example, **threads}) == build_config(
        monkeypatch, None, threads
    )
    for name, value in example.items():
        monkeypatch.setenv(name, value)
    example_gunicorn = gunicorn_settings()
    for name in example:
        monkeypatch.delenv(name)
    plain_gunicorn = gunicorn_settings()
    for setting in ("bind", "workers", "threads"):
        assert example_gunicorn[setting] == plain_gunicorn[setting]


def test_gunicorn_points_workers_at_the_metrics_directory_it_names(monkeypatch, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR is used when set (emptied of old files), created when unset."""
    settings = gunicorn_settings()
    chosen = tmp_path / "metrics"
    chosen.mkdir()
    (chosen / "counter_123.db").write_bytes(b"old")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(chosen))
    settings["on_starting"](None)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(chosen)
    assert list(chosen.iterdir()) == []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    fresh = gunicorn_settings()
    fresh["on_starting"](None)
    created = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        assert created != chosen and created.is_dir()
    finally:
        fresh["on_exit"](None)
    assert not created.exists()


def test_default_database_is_a_sqlite_file_in_the_instance_folder(monkeypatch):
    """No DATABASE_URL: the embedded default, ``instance/bucket.sqlite3`` beside the package."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    app = create_app()
    try:
        expected = f"sqlite:///{ROOT / 'instance' / 'bucket.sqlite3'}"
        assert app.config["SQLALCHEMY_DATABASE_URI"] == expected
        assert Path(app.instance_path) == ROOT / "instance"
    finally:
        dispose_engines(app)


def test_config_is_read_when_the_app_is_built_not_at_import(monkeypatch):
    """Two apps built under different environments differ: nothing is frozen at import."""
    monkeypatch.setenv("BUCKET_MAX_ATTEMPTS", "3")
    first = Config().BUCKET_MAX_ATTEMPTS
    monkeypatch.setenv("BUCKET_MAX_ATTEMPTS", "4")
    assert (first, Config().BUCKET_MAX_ATTEMPTS) == (3, 4)


API = "/api/v1/bucket/prana"


def test_consumer_token_from_the_environment_guards_the_consumer_endpoints(monkeypatch, make_app):
    """BUCKET_CONSUMER_TOKEN exported: status needs the token; ingest stays open."""
    monkeypatch.setenv("BUCKET_CONSUMER_TOKEN", "env-secret, env-next")
    client = make_app().test_client()
    assert client.get(f"{API}/status").status_code == 401
    assert client.get(f"{API}/status", headers={"X-API-Key": "wrong"}).status_code == 403
    for token in ("env-secret", "env-next"):
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get(f"{API}/status", headers=headers).status_code == 200
    assert client.post(f"{API}/ingest", json=make_packet()).status_code == 200


def test_visibility_timeout_from_the_environment_sets_the_lease(monkeypatch, make_app):
    """BUCKET_VISIBILITY_TIMEOUT exported: a poll's lease lasts that many seconds."""
    monkeypatch.setenv("BUCKET_VISIBILITY_TIMEOUT", "321")
    client = make_app().test_client()
    client.post(f"{API}/ingest", json=make_packet())
    before = time.time()
    (packet,) = client.get(f"{API}/packets/pending").json["packets"]
    deadline = datetime.fromisoformat(packet["lease_expires_at"]).timestamp()
    assert before + 320 <= deadline <= time.time() + 322


@pytest.mark.parametrize("backend", ["postgres"])
def test_renders_postgres_url_reaches_the_database(backend, monkeypatch, postgres_database):
    """DATABASE_URL=postgres://… (as Render sets it) is served through psycopg 3."""
    render_url = postgres_database.replace("postgresql+psycopg://", "postgres://", 1)
    assert render_url.startswith("postgres://")
    monkeypatch.setenv("DATABASE_URL", render_url)
    app = create_app(testing=True)
    try:
        client = app.test_client()
        posted = client.post(f"{API}/ingest", json=make_packet(user_id="render"))
        assert posted.status_code == 200, posted.json
        served = client.get(f"{API}/packets/pending").json["packets"]
        assert [p["packet_id"] for p in served] == [posted.json["packet_id"]]
        with app.app_context():
            assert db.engine.dialect.name == "postgresql"
            assert db.engine.dialect.driver == "psycopg"
            clean_state(app)
    finally:
        dispose_engines(app)
