"""Fixtures: an isolated app per test on each backend (SQLite + memory, PostgreSQL + Redis)."""

from __future__ import annotations

import os

# Variables of the service that are not BUCKET_*; with every BUCKET_* one (except the tests' own
# BUCKET_TEST_*) they are dropped before anything reads them, so a developer's exported
# configuration (the README's .env recipe) never leaks into a test. Tests that need one set it.
SERVICE_VARIABLES = frozenset(
    {
        "DATABASE_URL",
        "REDIS_URL",
        "PORT",
        "WEB_CONCURRENCY",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "PROMETHEUS_MULTIPROC_DIR",
    }
)


def is_service_variable(name: str) -> bool:
    """Whether ``name`` configures the service (and so must not reach a test unasked)."""
    if name.startswith("BUCKET_"):
        return not name.startswith("BUCKET_TEST_")
    return name in SERVICE_VARIABLES or name.startswith("FLASK_")


for _name in [name for name in os.environ if is_service_variable(name)]:
    del os.environ[_name]

# BUCKET_TEST_INGEST_COALESCE=true|false (BUCKET_TEST_ACK_COALESCE=true|false) runs the tests
# with ingest (acknowledgement) coalescing on or off: every app a test creates, and the gunicorn
# instances of tests/cluster.py; unset, the defaults. What the tests assert holds either way.
COALESCING_SWITCHES = {
    "BUCKET_TEST_INGEST_COALESCE": "BUCKET_INGEST_COALESCE",
    "BUCKET_TEST_ACK_COALESCE": "BUCKET_ACK_COALESCE",
}
for _switch, _setting in COALESCING_SWITCHES.items():
    _choice = os.environ.get(_switch, "").strip().lower()
    if _choice in {"1", "true", "yes"}:
        os.environ[_setting] = "true"
    elif _choice in {"0", "false", "no"}:
        os.environ[_setting] = "false"

import shutil  # noqa: E402 - after the scrub: nothing may read the environment before it
import uuid  # noqa: E402

import pytest  # noqa: E402
from flask_migrate import upgrade  # noqa: E402

from bucket import create_app  # noqa: E402
from bucket.extensions import db, queue  # noqa: E402
from tests import servers  # noqa: E402

BACKENDS = ["sqlite", "postgres"]


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many tests were skipped because a server did not answer (never in CI)."""
    missing = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if servers.MISSING_SERVER in str(report.longrepr)
    ]
    if missing:
        terminalreporter.write_line(
            f"{len(missing)} tests skipped for a missing server (PostgreSQL, Redis or a binary); "
            "set CI=true to make them fail instead",
            yellow=True,
        )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """A migrated SQLite file, copied for each test (migrations run once, not per test)."""
    path = tmp_path_factory.mktemp("template") / "bucket.sqlite3"
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"}, testing=True)
    with app.app_context():
        upgrade()
        db.engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_database():
    """One migrated PostgreSQL database for the session, dropped at the end."""
    reason = servers.postgres_reachable()
    if reason:
        servers.unavailable(reason)
    name, url = servers.create_database()
    app = create_app({"SQLALCHEMY_DATABASE_URI": url}, testing=True)
    with app.app_context():
        upgrade()
        db.engine.dispose()
    yield url
    servers.drop_database(name)


@pytest.fixture(scope="session")
def redis_url():
    """The machine's shared Redis (tests use their own key prefix on it)."""
    reason = servers.redis_reachable()
    if reason:
        servers.unavailable(reason)
    return servers.REDIS_TEST_URL


def backend_config(request, backend: str, tmp_path) -> dict:
    """Config overrides selecting the backend pair for one test."""
    prefix = f"bucket-test-{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        path = tmp_path / "bucket.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
            "REDIS_URL": None,
            "BUCKET_REDIS_PREFIX": prefix,
        }
    return {
        "SQLALCHEMY_DATABASE_URI": request.getfixturevalue("postgres_database"),
        "REDIS_URL": request.getfixturevalue("redis_url"),
        "BUCKET_REDIS_PREFIX": prefix,
    }


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The backend pair under test: ``sqlite`` (+ memory) or ``postgres`` (+ Redis)."""
    return request.param


@pytest.fixture
def app_config() -> dict:
    """Extra config for the ``app`` fixture; override in a test module or with indirect params."""
    return {}


@pytest.fixture
def make_app(request, backend, tmp_path):
    """Build apps sharing this test's database and queue (a "restart" builds another)."""
    base = backend_config(request, backend, tmp_path)
    built = []

    def build(**overrides):
        app = create_app({**base, **overrides}, testing=True)
        built.append(app)
        return app

    yield build
    for app in built:
        if app is built[0]:
            with app.app_context():
                clean_state(app)
        servers.dispose_engines(app)


def clean_state(app) -> None:
    """Empty the shared PostgreSQL tables and this test's Redis keys."""
    if db.engine.dialect.name == "postgresql":
        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "TRUNCATE packets, packet_keys, packet_idempotency_keys, deliveries, "
                "packet_counters, quarantine, audit_seals, audit_purges, audit_purged_ranges, "
                "activity_minutes"
            )
    queue.flush()


@pytest.fixture
def empty_database(backend, tmp_path, request):
    """A database with no tables at all, on the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.sqlite3"
        return
    request.getfixturevalue("postgres_database")  # skips (or fails in CI) without PostgreSQL
    name, url = servers.create_database()
    try:
        yield url
    finally:
        servers.drop_database(name)


@pytest.fixture
def private_postgres():
    """A started PostgreSQL server of this test's own (it may stop it), destroyed afterwards."""
    if servers.postgres_binary("initdb") is None:
        servers.unavailable("PostgreSQL's initdb and pg_ctl are not installed")
    database = servers.PrivatePostgres()
    try:
        yield database.start()
    finally:
        database.destroy()


@pytest.fixture
def app(make_app, app_config):
    """The application under test, on the parametrized backend."""
    return make_app(**app_config)


@pytest.fixture
def client(app):
    """A test client of ``app``."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """A CLI runner of ``app``."""
    return app.test_cli_runner()
