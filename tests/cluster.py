"""Real service instances for fault tests: migrations, gunicorn masters and their workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from tests import servers
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def service_env(database_url: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of one instance: shared database and Redis, no rate limits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    for setting in ("BUCKET_INGEST_COALESCE", "BUCKET_ACK_COALESCE"):  # conftest's switches
        if setting in os.environ:
            env[setting] = os.environ[setting]
    for name in ("WEB_CONCURRENCY", "PORT", "DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        BUCKET_REDIS_PREFIX=prefix,
        BUCKET_RATE_LIMIT_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def fresh_database_env(prefix: str, **extra: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A new migrated database on the shared PostgreSQL and the environment of instances
    sharing it and the shared Redis under a key prefix of their own: (database URL, env).
    Skips (fails in CI) without either server; the database is dropped afterwards."""
    for reason in (servers.postgres_reachable(), servers.redis_reachable()):
        if reason:
            servers.unavailable(reason)
    name, url = servers.create_database()
    try:
        prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        env = service_env(url, servers.REDIS_TEST_URL, prefix, **extra)
        migrate(env)
        yield url, env
    finally:
        servers.drop_database(name)


def migrate(env: dict[str, str]) -> None:
    """``flask db upgrade`` against the instance's database, as the Procfile's release step."""
    flask_command(env, "db", "upgrade").check_returncode()


def flask_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``flask --app wsgi …`` as an operator runs it beside the instances."""
    return subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (gunicorn's workers under its master)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is parenthesised and may hold spaces: the ppid follows the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return sorted(children)


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM ``process`` and wait; if it lingers, SIGKILL its children and then it.

    The children (gunicorn workers) are killed while the master still holds them, so their
    pids cannot have been reused by then.
    """
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in child_pids(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        process.wait(timeout=10)


def procfile_web() -> str:
    """The Procfile's web command, as a platform runs it (through a shell)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web: "):
            return line[len("web: ") :]
    raise RuntimeError("the Procfile has no web line")


class Instance:
    """One service instance started by the Procfile's web line: a gunicorn master with
    gthread workers, on a free port."""

    def __init__(self, env: dict[str, str], workers: int = 2, threads: int = 8) -> None:
        self.env = env
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="bucket-gunicorn-", suffix=".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Instance:
        """Start gunicorn and wait until every worker has booted and /health answers.

        A start that fails stops what it started before raising, so no gunicorn outlives it.
        """
        env = {
            **self.env,
            "PATH": f"{BIN}:{self.env.get('PATH', os.environ['PATH'])}",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(self.workers),
            "BUCKET_THREADS": str(self.threads),
        }
        self.process = subprocess.Popen(
            ["bash", "-c", procfile_web()],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.output()}")
            try:
                if (
                    requests.get(f"{self.url}/health", timeout=1).status_code == 200
                    and len(self.worker_pids()) == self.workers
                ):
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{self.output()}")
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        """The worker processes the master runs right now."""
        return child_pids(self.process.pid) if self.process else []

    def kill_worker(self) -> int:
        """SIGKILL one worker (the master replaces it); return its pid."""
        victim = self.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        return victim

    def output(self) -> str:
        """What gunicorn and the app logged so far."""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM the master (graceful), SIGKILL it and its workers if it lingers."""
        process, self.process = self.process, None
        try:
            if process is not None:
                stop_process(process)
        finally:
            self.log.close()
