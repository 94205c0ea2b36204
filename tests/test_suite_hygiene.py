"""The suite itself: it ignores the developer's shell, and knows when it runs in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import in_ci

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (" Yes ", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("no", False),
    ],
)
def test_ci_is_recognised_in_every_spelling_ci_systems_use(value, expected):
    """CI=true (GitHub, GitLab), CI=1 or CI=yes all make missing servers fail instead of skip."""
    assert in_ci({"CI": value}) is expected
    assert in_ci({}) is False


def test_a_developers_exported_configuration_does_not_reach_the_tests(tmp_path):
    """With the README's .env recipe exported (a token, a short lease, a bogus database), the
    tests that depend on defaults still pass: the suite drops BUCKET_* and service variables."""
    leaked = {
        "BUCKET_CONSUMER_TOKEN": "exported-by-the-developer",
        "BUCKET_VISIBILITY_TIMEOUT": "10",
        "BUCKET_MAX_ATTEMPTS": "1",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "LOG_LEVEL": "CRITICAL",
    }
    env = {**os.environ, **leaked, "CI": ""}
    selected = [
        "tests/test_smoke.py",
        "tests/test_consumer.py::test_a_leased_packet_is_not_served_again_while_leased",
        "tests/test_retries.py::test_failure_returns_after_exponential_jittered_backoff",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "sqlite", *selected],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 passed" in done.stdout, done.stdout[-3000:]
