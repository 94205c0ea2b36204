"""Structured request logs: one JSON line per request, with a request id and no secrets."""

import json
import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bucket.web.request_log import json_formatter
from tests.factories import make_packet

ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1/bucket/prana"
TOKEN = "log-test-secret-token"


@pytest.fixture
def app_config():
    return {"BUCKET_CONSUMER_TOKEN": [TOKEN]}


@pytest.fixture
def request_lines(caplog):
    """The request log records of the test, as the JSON lines the service would print."""
    caplog.set_level(logging.INFO, logger="bucket.request")
    formatter = json_formatter()

    def lines():
        records = [r for r in caplog.records if r.name == "bucket.request"]
        return [json.loads(formatter.format(record)) for record in records]

    return lines


def test_one_json_line_per_request_with_the_essentials(client, request_lines):
    """method, path, status, duration_ms and request_id, on one line per request."""
    client.get("/health")
    client.get("/no/such/path")
    first, second = request_lines()
    assert first["method"] == "GET" and first["path"] == "/health" and first["status"] == 200
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert first["level"] == "INFO" and first["logger"] == "bucket.request"
    assert len(first["request_id"]) == 16 and first["request_id"] != second["request_id"]
    assert second["status"] == 404


def test_each_line_is_stamped_in_utc_to_the_millisecond(client, request_lines):
    """ISO 8601 with a Z, whatever the machine's time zone; the time the request ended."""
    before = datetime.now(UTC)
    client.get("/health")
    after = datetime.now(UTC)
    (line,) = request_lines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
    stamped = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert before - timedelta(milliseconds=1) <= stamped <= after
    record = logging.makeLogRecord({"msg": "m", "created": 1_764_712_624.0305})
    assert json.loads(json_formatter().format(record))["time"] == "2025-12-02T21:57:04.030Z"


def test_request_id_is_taken_from_the_caller_and_echoed(client, request_lines):
    """A plain X-Request-ID is kept; otherwise one is generated; both come back in the header."""
    given = client.get("/health", headers={"X-Request-ID": "trace-42.abc"})
    assert given.headers["X-Request-ID"] == "trace-42.abc"
    generated = client.get("/health")
    assert len(generated.headers["X-Request-ID"]) == 16
    assert [line["request_id"] for line in request_lines()] == [
        "trace-42.abc",
        generated.headers["X-Request-ID"],
    ]


def test_a_forged_request_id_is_replaced(client):
    """Ids with spaces, quotes or over 128 characters cannot smuggle text into the logs."""
    for forged in ('a" "injected', "x" * 129, "a b"):
        echoed = client.get("/health", headers={"X-Request-ID": forged}).headers["X-Request-ID"]
        assert echoed != forged and len(echoed) == 16


def test_refused_requests_are_logged_and_carry_an_id(client, request_lines):
    """401s from the token check are logged with their id like any other answer."""
    response = client.get(f"{API}/packets/pending")
    assert response.status_code == 401 and response.headers["X-Request-ID"]
    (line,) = request_lines()
    assert line["status"] == 401 and line["request_id"] == response.headers["X-Request-ID"]


def test_packet_counts_are_logged_without_bodies_or_tokens(client, request_lines):
    """Ingest and ack lines count packets; no packet field, signal or token appears."""
    marker = "very-private-signal-value"
    first = make_packet(raw_signals={"note": marker}, user_id="private-user")
    client.post(f"{API}/ingest", json={"packets": [first, make_packet(), {"bad": True}]})
    client.post(f"{API}/ingest", json=first)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    packets = client.get(f"{API}/packets/pending?limit=10", headers=auth).json["packets"]
    client.post(
        f"{API}/packets/mark-processed",
        json={"results": [{"packet_id": p["packet_id"], "success": True} for p in packets]},
        headers=auth,
    )
    client.get(f"{API}/status", headers={"X-API-Key": TOKEN})
    lines = request_lines()
    assert lines[0]["packets"] == {"ingested": 2, "rejected": 1}
    assert lines[1]["packets"] == {"duplicate": 1}
    assert lines[3]["packets"] == {"processed": 2}
    text = "\n".join(json.dumps(line) for line in lines)
    for secret in (marker, TOKEN, "raw_signals", "private-user", "limit=10"):
        assert secret not in text


def test_the_request_log_can_be_turned_off(make_app, caplog):
    """BUCKET_REQUEST_LOG=false silences the lines; the request id header stays."""
    caplog.set_level(logging.INFO, logger="bucket.request")
    client = make_app(BUCKET_REQUEST_LOG=False).test_client()
    assert client.get("/health").headers["X-Request-ID"]
    assert not [r for r in caplog.records if r.name == "bucket.request"]


def run_service_process(tmp_path, **environ: str) -> list[str]:
    """Serve two requests in a fresh interpreter importing ``wsgi`` (as gunicorn's workers
    do, no test logging in the way); return the lines it wrote to stderr."""
    script = (
        "from wsgi import app\n"
        "client = app.test_client()\n"
        "assert client.get('/health').status_code == 200\n"
        "assert client.get('/no/such/path').status_code == 404\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": f"sqlite:///{tmp_path}/log.sqlite3",
        "BUCKET_CONSUMER_TOKEN": TOKEN,  # no start-up warning in the way
        **environ,
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_log_format_json_by_default_in_a_real_process(tmp_path):
    """Unset LOG_FORMAT: every request is one JSON object on stderr."""
    lines = [json.loads(line) for line in run_service_process(tmp_path)]
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/health", 200),
        ("/no/such/path", 404),
    ]
    assert all(line["logger"] == "bucket.request" for line in lines)


def test_log_format_text_in_a_real_process(tmp_path):
    """LOG_FORMAT=text: plain lines (time, level, logger, message), not JSON."""
    lines = run_service_process(tmp_path, LOG_FORMAT="text")
    assert len(lines) == 2
    for line in lines:
        assert " INFO bucket.request request" in line
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


def test_log_level_hides_request_lines_in_a_real_process(tmp_path):
    """LOG_LEVEL=WARNING: request lines (INFO) are not written; warnings still are."""
    assert run_service_process(tmp_path, LOG_LEVEL="WARNING") == []
    warned = run_service_process(tmp_path, LOG_LEVEL="WARNING", BUCKET_CONSUMER_TOKEN="")
    assert len(warned) == 1 and "BUCKET_CONSUMER_TOKEN is not set" in warned[0]
