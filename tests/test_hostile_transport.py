"""Hostile transport: slow clients, bad framing, deep JSON and the headers every answer carries.

The transport tests run the Procfile's ``web`` line itself (gunicorn with the project's worker)
on a free port, with one worker of few threads so that a bounded number of connections would be
enough to starve it if slow clients could hold threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bucket.extensions import db
from bucket.models import Packet, QuarantinedPacket
from tests.browser import launch_chromium, open_page, page_log
from tests.concurrency import wait_until
from tests.factories import make_packet
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.prefix) / "bin"
INGEST = "/api/v1/bucket/prana/ingest"
THREADS = 4
SLOW_CONNECTIONS = 40
READ_TIMEOUT = 3
ERROR_KEYS = {"code", "status", "message"}


def procfile_line(name: str) -> str:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())[name]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Procfile's release then web lines, on SQLite, one worker of THREADS threads."""
    tmp = tmp_path_factory.mktemp("hostile-transport")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        PORT=str(port),
        DATABASE_URL=f"sqlite:///{tmp / 'bucket.sqlite3'}",
        WEB_CONCURRENCY="1",
        BUCKET_THREADS=str(THREADS),
        BUCKET_REQUEST_READ_TIMEOUT=str(READ_TIMEOUT),
        LOG_LEVEL="WARNING",
    )
    subprocess.run(
        ["bash", "-c", procfile_line("release")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log_path = tmp / "web.log"
    log = log_path.open("w")
    service = subprocess.Popen(
        ["bash", "-c", procfile_line("web")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        assert service.poll() is None, log_path.read_text()
        try:
            return requests.get(f"{base}/health", timeout=1).ok
        except requests.RequestException:
            return False

    try:
        wait_until(serving, 60, "the web line never served /health", interval=0.2)
        yield base, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=10)
        log.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; return everything the server answers until it
    closes the connection (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            if response_complete(received):
                break
        return received


def response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_error_shape(data: bytes, code: int) -> dict:
    status, headers, body = parse_response(data)
    assert status == code, data[:500]
    assert headers.get("content-type", "").startswith("application/json"), data[:500]
    document = json.loads(body)
    assert ERROR_KEYS <= set(document) and document["code"] == code, document
    return document


def slow_request_head(port: int) -> bytes:
    return (
        f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()


# --- finding 1: slow bodies -------------------------------------------------------------------


@pytest.mark.slow
def test_slow_bodies_do_not_starve_health(server):
    """Forty connections that send headers and 4 bytes of a 100-byte body: /health still
    answers within two seconds, on a worker of only four threads."""
    base, port = server
    slow = []
    try:
        for _ in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(slow_request_head(port) + b'{"us')
            slow.append(sock)
        time.sleep(0.5)  # every slow connection has reached the server
        started = time.monotonic()
        answer = requests.get(f"{base}/health", timeout=2)
        assert answer.status_code == 200
        assert time.monotonic() - started < 2
        # A real packet is served meanwhile too.
        stored = requests.post(f"{base}{INGEST}", json=make_packet(user_id="beside"), timeout=2)
        assert stored.status_code == 200, stored.text
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.slow
def test_a_stalled_body_is_answered_408_in_the_error_shape(server):
    """A body that stops arriving costs at most BUCKET_REQUEST_READ_TIMEOUT: then a JSON 408,
    and the connection is closed."""
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5) as sock:
        sock.sendall(slow_request_head(port) + b'{"us')
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        elapsed = time.monotonic() - started
    assert READ_TIMEOUT - 0.5 < elapsed < READ_TIMEOUT + 2.5
    document = assert_error_shape(received, 408)
    assert "BUCKET_REQUEST_READ_TIMEOUT" in document["message"]


@pytest.mark.slow
def test_a_body_trickled_in_pieces_is_served(server):
    """A slow but complete body (sent in pieces) is read in full and stored."""
    _, port = server
    body = json.dumps(make_packet(user_id="trickle")).encode()
    head = (
        f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for start in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.2)
            sock.sendall(body[start : start + len(body) // 4 + 1])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status, _, answer = parse_response(received)
    assert status == 200, received
    assert json.loads(answer)["status"] == "ingested"


@pytest.mark.slow
def test_expect_100_continue_is_answered_before_the_body(server):
    """A client that waits for ``100 Continue`` (curl does, for bodies over 1 KiB) gets it
    before it sends the body, then the answer to the whole request."""
    _, port = server
    body = json.dumps(make_packet(user_id="expect")).encode()
    head = (
        f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert parse_response(received)[0] == 200, received


@pytest.mark.slow
def test_keep_alive_and_pipelined_requests_are_served(server):
    """Two requests on one connection, the second sent with the first: both answered."""
    _, port = server
    one = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    two = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((one + two).encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2, received


# --- finding 2 (transport part) and 9: errors made before the app -----------------------------


@pytest.mark.slow
def test_a_malformed_chunked_body_is_400_in_the_error_shape(server):
    """Transfer-Encoding: chunked with chunk size ``zz``: 400 in the error shape, not 500."""
    _, port = server
    received = raw_exchange(
        port,
        (
            f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
        ).encode(),
    )
    assert_error_shape(received, 400)


@pytest.mark.slow
def test_a_malformed_chunked_body_is_400_under_plain_gthread_too(tmp_path):
    """Where the buffering worker is not in use (gthread reading bodies in threads, as with
    TLS configured in gunicorn), the app itself answers broken framing 400, not 500."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'plain.sqlite3'}", LOG_LEVEL="WARNING")
    command = [str(VENV_BIN / "gunicorn"), "-k", "gthread", "--threads", "2"]
    command += ["-b", f"127.0.0.1:{port}", "wsgi:app"]
    service = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def serving() -> bool:
            assert service.poll() is None
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            return False

        wait_until(serving, 30, "plain gunicorn never listened", interval=0.2)
        received = raw_exchange(
            port,
            (
                f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
            ).encode(),
        )
        assert_error_shape(received, 400)
    finally:
        service.terminate()
        service.wait(timeout=30)


@pytest.mark.slow
def test_a_well_formed_chunked_body_is_served(server):
    """A chunked body is still read and stored."""
    _, port = server
    body = json.dumps(make_packet(user_id="chunked")).encode()
    half = len(body) // 2
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])
    )
    received = raw_exchange(
        port,
        (
            f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n",
    )
    status, _, answer = parse_response(received)
    assert status == 200, received


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-F%d: 1\r\n" % i for i in range(120))
            + b"\r\n",
            431,
        ),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\nHost: x\n\n", 400),
        (
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
    ids=[
        "uri-too-long",
        "too-many-headers",
        "bad-header",
        "bad-request-line",
        "bare-lf",
        "two-lengths",
        "unknown-coding",
    ],
)
def test_errors_gunicorn_makes_are_in_the_error_shape(server, request_bytes, code):
    """414, 431 and 400 for bad framing come from the server, before the app: same JSON shape."""
    _, port = server
    received = raw_exchange(port, request_bytes)
    assert_error_shape(received, code)
    assert parse_response(received)[1].get("x-content-type-options") == "nosniff"


@pytest.mark.slow
def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """Content-Length above BUCKET_MAX_BODY_BYTES: 413 in the error shape at once, without
    waiting for a body that will never be read."""
    _, port = server
    started = time.monotonic()
    received = raw_exchange(
        port,
        f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n".encode(),
    )
    assert time.monotonic() - started < 2
    assert_error_shape(received, 413)


@pytest.mark.slow
def test_the_double_slash_redirect_is_in_the_error_shape(server):
    """``prana//status`` redirects to ``prana/status``; its body is JSON, not Werkzeug's HTML,
    and the Location is relative (a forged Host header does not choose it)."""
    base, _ = server
    answer = requests.get(
        f"{base}/api/v1/bucket/prana//status?x=1",
        headers={"Host": "evil.example"},
        allow_redirects=False,
        timeout=5,
    )
    assert 300 <= answer.status_code < 400
    assert answer.headers["Location"] == "/api/v1/bucket/prana/status?x=1"
    assert answer.headers["Content-Type"].startswith("application/json")
    assert ERROR_KEYS <= set(answer.json())


# --- finding 9: security headers ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console", "/health", "/api/v1/bucket/prana/nowhere"])
def test_pages_and_api_answers_carry_security_headers(client, path):
    """CSP with frame-ancestors, X-Frame-Options and nosniff, on the console and the API."""
    answer = client.get(path)
    csp = answer.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    if path == "/console":
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1]
    else:
        assert "default-src 'none'" in csp


def test_the_docs_page_keeps_working_under_its_policy(client):
    """Swagger UI's page starts itself with an inline script: its policy allows exactly that."""
    answer = client.get("/docs")
    assert answer.status_code == 200
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "rendered"),
    [("/docs", ".swagger-ui .info .title"), ("/console", "#fig-pending[data-value]")],
)
def test_the_pages_work_in_a_browser_under_their_policy(server, path, rendered):
    """Chromium renders /docs (Swagger UI) and /console with no Content-Security-Policy
    violation."""
    base, _ = server
    with launch_chromium() as browser, open_page(browser) as page:
        page.goto(f"{base}{path}")
        page.wait_for_selector(rendered)
        log = page_log(page)
        assert "Content Security Policy" not in log, log
        assert not page.page_errors(), log


# --- finding 2: deep JSON ----------------------------------------------------------------------


def nested(depth: int) -> str:
    """JSON text of an object nesting ``depth`` levels (the object itself is level 1), built as
    text: the encoders stop far short of what an attacker can send."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def packet_text(raw_signals: str, **fields) -> str:
    """A packet's JSON text with ``raw_signals`` given as JSON text."""
    packet = make_packet(**fields)
    packet["raw_signals"] = None
    return json.dumps(packet).replace('"raw_signals": null', f'"raw_signals": {raw_signals}')


def post_text(client, text: str):
    return client.post(INGEST, data=text, content_type="application/json")


def quarantined(app) -> list[QuarantinedPacket]:
    with app.app_context():
        return list(db.session.execute(db.select(QuarantinedPacket)).scalars())


def stored_count(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.count()).select_from(Packet)).scalar_one()


@pytest.mark.parametrize("depth", [33, 300, 1000])
def test_deep_raw_signals_are_refused_422_and_quarantined(app, client, depth):
    """raw_signals deeper than BUCKET_MAX_JSON_DEPTH (32): a 422 naming the limit, and the
    packet is in the quarantine; nothing is stored, no 500."""
    text = packet_text(nested(depth), user_id="deep")
    answer = post_text(client, text)
    assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
    body = answer.get_json()
    assert "BUCKET_MAX_JSON_DEPTH" in json.dumps(body["errors"])
    assert body["quarantine_id"]
    (entry,) = quarantined(app)
    assert entry.id == body["quarantine_id"] and entry.user_id == "deep"
    assert stored_count(app) == 0
    again = post_text(client, text)
    assert again.get_json()["quarantine_id"] == body["quarantine_id"]
    listed = client.get(f"/api/v1/bucket/prana/quarantine/{body['quarantine_id']}")
    assert listed.status_code == 200


def test_raw_signals_at_the_depth_limit_are_stored(app, client):
    """Exactly BUCKET_MAX_JSON_DEPTH levels is accepted, stored and served intact."""
    answer = post_text(client, packet_text(nested(32), user_id="deep"))
    assert answer.status_code == 200, answer.get_json()
    assert stored_count(app) == 1


def test_a_deep_packet_in_a_batch_is_refused_alone(app, client):
    """In a batch, the deep packet is rejected and quarantined; its neighbour is stored."""
    fine = json.dumps(make_packet(user_id="fine"))
    deep = packet_text(nested(500), user_id="deep")
    answer = post_text(client, f'{{"packets": [{fine}, {deep}], "batch_size": 2}}')
    assert answer.status_code == 207, answer.get_data(as_text=True)[:300]
    good, deep = answer.get_json()["results"]
    assert good["status"] == "ingested"
    assert deep["status"] == "rejected" and deep["quarantine_id"]
    assert stored_count(app) == 1


def test_a_body_deeper_than_the_parser_accepts_is_422_and_quarantined(app, client):
    """Nesting beyond what the JSON parser accepts at all is still a 422, kept as text."""
    text = packet_text("[" * 2000 + "]" * 2000, user_id="abyss")
    answer = post_text(client, text)
    assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
    assert answer.get_json()["quarantine_id"]
    (entry,) = quarantined(app)
    assert isinstance(entry.body, str) and '"abyss"' in entry.body


def test_unknown_fields_nested_deep_are_tolerated_and_quarantined_with_their_packet(app, client):
    """An unknown field is tolerated however deep (it is not stored); when the packet is refused
    for another reason, the quarantine keeps it whole, deep field included."""
    text = packet_text("{}", user_id="deep-extra")
    answer = post_text(client, text[:-1] + ', "extra": ' + nested(400) + "}")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    refused = packet_text("{}", user_id="deep-extra", active_seconds=-1)
    answer = post_text(client, refused[:-1] + ', "extra": ' + nested(400) + "}")
    assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
    assert answer.get_json()["quarantine_id"]
    (entry,) = quarantined(app)
    assert nested(400) in entry.body
