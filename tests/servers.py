"""Reaching the real PostgreSQL and Redis servers, and starting private ones for fault tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from bucket.extensions import db

PG_ADMIN_URL = os.environ.get("BUCKET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("BUCKET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# How CI systems say "this is CI": GitHub, GitLab and most others set CI=true, some CI=1 or yes.
CI_VALUES = frozenset({"1", "true", "yes"})
# Every skip for a missing server starts with this, so the summary can count them.
MISSING_SERVER = "missing server:"


def in_ci(environ=os.environ) -> bool:
    """True when ``CI`` says we run in CI, where every server the suite needs must answer."""
    return environ.get("CI", "").strip().lower() in CI_VALUES


def unavailable(reason: str) -> None:
    """Skip with a visible reason on a developer machine; fail in CI, where servers must exist."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: required servers must be running)")
    pytest.skip(f"{MISSING_SERVER} {reason}")


def postgres_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}"


def redis_reachable(url: str = REDIS_TEST_URL) -> str | None:
    """None when Redis answers, else why not."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return None
    except redis.RedisError as exc:
        return f"Redis at {url} is unreachable: {exc}"


def with_database(url: str, name: str) -> str:
    """The admin URL pointed at another database."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def create_database() -> tuple[str, str]:
    """Create a uniquely named PostgreSQL database; return (name, SQLAlchemy URL)."""
    name = f"bucket_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(PG_ADMIN_URL, name).replace("postgresql://", "postgresql+psycopg://", 1)
    return name, url


def drop_database(name: str) -> None:
    """Drop a test database, disconnecting whoever still holds it."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dispose_engines(app) -> None:
    """Close the pooled connections of every engine of ``app``.

    On PostgreSQL the app has two: the default one and ingest's autocommit bind.
    ``db.engine.dispose()`` alone leaves the bind's connections open until the garbage
    collector finds them, and psycopg then warns that they were never closed.
    """
    with app.app_context():
        db.session.remove()
        for engine in db.engines.values():
            engine.dispose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bucket-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while redis_reachable(self.url) is not None:
            if time.monotonic() > deadline:
                self.kill()  # a start that failed leaves no redis-server behind
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, no persistence."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl), from PATH or Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own (``initdb`` + ``pg_ctl`` on a free port).

    Fault tests stop, crash and restart it; the machine's shared server is never touched. As
    root (CI), the server runs as the ``postgres`` user, since PostgreSQL refuses to run as root.
    ``settings`` are passed to the server as ``-c name=value``.
    """

    def __init__(self, **settings: str) -> None:
        self.port = free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "fsync": "on", **settings}
        self.root = Path(tempfile.mkdtemp(prefix="bucket-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """The libpq URL of its ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str, check: bool = True, timeout: float = 60) -> None:
        if self.as_postgres:
            command = ("runuser", "-u", "postgres", "--", *command)
        subprocess.run(
            command, check=check, timeout=timeout, capture_output=True, cwd=str(self.root)
        )

    def start(self) -> PrivatePostgres:
        """initdb on first start (trust auth, user postgres), then start and wait for it."""
        initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            unavailable("PostgreSQL's initdb and pg_ctl are not installed")
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        if not self.data.exists():
            self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        options += f" -p {self.port} -k {self.root}"
        try:
            self._run(
                pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"private PostgreSQL did not start:\n{self.server_log()}") from exc
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (or smart/immediate); nothing happens if it is not running."""
        self._run(
            postgres_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def postmaster_pid(self) -> int | None:
        """The server's main process, while it runs."""
        pid_file = self.data / "postmaster.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would: the next start runs crash recovery."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        # Its children (backends) notice the dead postmaster and exit; wait for the port.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop it (immediately) and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
