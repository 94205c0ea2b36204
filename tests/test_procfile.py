"""The README's first command, for real: ``make run`` in a fresh tree, then its curls.

``make run`` runs the Procfile's ``release`` and ``web`` lines through a shell, as a platform
does, so this starts the service exactly as a newcomer (and Render) would: migrations on the
embedded default database in ``instance/``, then gunicorn. The "Try it" commands are taken from
the README itself, so the page cannot promise answers the service does not give.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.concurrency import wait_until
from tests.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "instance", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"
)


def readme_curls(port: int) -> list[str]:
    """The shell commands of the README's "Try it" block, pointed at ``port``."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Try it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").strip().splitlines()
    return [command.replace("localhost:3000", f"localhost:{port}") for command in commands]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_make_run_is_the_procfile(tmp_path):
    """``make run`` runs the Procfile's release line, then its web line, and nothing else."""
    planned = subprocess.run(
        ["make", "-n", "-o", str(VENV / "bin" / ".installed"), f"VENV={VENV}", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        # Under `make test` this make is a sub-make: keep it from announcing its directory.
        env={k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")},
    ).stdout.splitlines()
    lines = procfile()
    assert set(lines) == {"release", "web"}
    assert len(planned) == 2
    assert planned[0].endswith(f"bash -c '{lines['release']}'")
    assert planned[1].endswith(f"bash -c '{lines['web']}'")


def test_make_run_then_the_readme_curls_answer_as_documented(tmp_path):
    """A fresh tree: make run migrates instance/bucket.sqlite3, serves, and every curl of the
    README's "Try it" answers what the README says."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    # Empty values, as a half-filled .env leaves them, must not matter.
    env.update(PORT=str(port), WEB_CONCURRENCY="", BUCKET_THREADS="", LOG_LEVEL="WARNING")
    log = (tmp_path / "run.log").open("w")
    service = subprocess.Popen(
        ["make", "-o", str(VENV / "bin" / ".installed"), f"VENV={VENV}", "run"],
        cwd=tree,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def serving() -> bool:
            assert service.poll() is None, (tmp_path / "run.log").read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(serving, 90, "make run never served /health", interval=0.2)
        assert (tree / "instance" / "bucket.sqlite3").is_file()
        answers = []
        for command in readme_curls(port):
            if "<a packet_id from pending>" in command:
                packet_id = answers[2]["packets"][0]["packet_id"]
                command = command.replace("<a packet_id from pending>", packet_id)
            done = subprocess.run(
                ["bash", "-c", command], cwd=tree, capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, (command, done.stderr)
            answers.append(json.loads(done.stdout))
        single, batch, pending, acked, status = answers
        assert single["status"] == "ingested" and single["packet_id"]
        assert batch["status"] == "ingested" and len(batch["results"]) == 3
        assert pending["count"] == 4 and pending["queue_size"] == 0
        assert acked["packet_id"] == pending["packets"][0]["packet_id"]
        assert acked["status"] == "ok" and acked["outcome"] == "processed"
        assert status["total_packets"] == 4 and status["processed_packets"] == 1
    finally:
        # A service that already died must not hide the assertion that says why.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=10)
        log.close()
