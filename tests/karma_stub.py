"""Local stand-ins for the consumer client's tests: a karma API and a faulty proxy.

``KarmaStub`` answers Karma Tracker's ``log-action`` endpoint from a thread, records every call
with its ``Idempotency-Key``, and can be told to answer slowly or to fail for some users.
``FaultyProxy`` sits between a consumer and the bucket and, while told to, answers some
requests itself with 429 or 503 and ``Retry-After`` (never forwarding those), or drops the
connection, to show that the consumer rides such answers out.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import requests

from tests.servers import free_port


@dataclass
class KarmaCall:
    key: str | None
    user_id: str
    action: str
    at: float  # time.time() when the call arrived


@dataclass
class KarmaStub:
    """What the stub answers: ``latency`` seconds per call (``slow_users`` overriding it), and
    ``fail_users`` answered with their status code instead of 200."""

    latency: float = 0.0
    slow_users: dict[str, float] = field(default_factory=dict)
    fail_users: dict[str, int] = field(default_factory=dict)
    calls: list[KarmaCall] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keys(self) -> Counter:
        """Calls per Idempotency-Key (a packet's id)."""
        with self.lock:
            return Counter(call.key for call in self.calls)

    def calls_of(self, key: str) -> list[KarmaCall]:
        with self.lock:
            return [call for call in self.calls if call.key == key]


def _karma_handler(stub: KarmaStub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for
        # the client's delayed ACK of the headers (40 ms on Linux), 4x the stub's latency.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            user = body.get("user_id", "")
            key = self.headers.get("Idempotency-Key")
            with stub.lock:
                stub.calls.append(KarmaCall(key, user, body["action"], time.time()))
            time.sleep(stub.slow_users.get(user, stub.latency))
            status = stub.fail_users.get(user, 200)
            answer = json.dumps({"user_id": user, "intensity": body.get("intensity")}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    # Dozens of consumer threads connect at once (the benchmark's four processes open 64
    # connections): socketserver's backlog of 5 would reset some of them.
    request_queue_size = 256
    daemon_threads = True


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on a free port from a daemon thread; yield the port."""
    port = free_port()
    server = _Server(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def karma_stub(**settings) -> Iterator[KarmaStub]:
    """A running karma API stub."""
    stub = KarmaStub(**settings)
    with serve(_karma_handler(stub)) as port:
        stub.port = port
        yield stub


@dataclass
class FaultyProxy:
    """Forwards to ``target``; while ``faults`` is on, every ``every``-th request is answered
    by the proxy itself: 429, 503 (each with ``Retry-After: 1``) or a dropped connection, in
    turn."""

    target: str
    faults: bool = True
    every: int = 2
    injected: Counter = field(default_factory=Counter)
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _proxy_handler(proxy: FaultyProxy) -> type[http.server.BaseHTTPRequestHandler]:
    session = requests.Session()
    kinds = ("429", "503", "drop")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for
        # the client's delayed ACK of the headers (40 ms on Linux), 4x the stub's latency.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args) -> None:
            pass

        def _fault(self) -> str | None:
            with proxy.lock:
                proxy.seen += 1
                if not proxy.faults or proxy.seen % proxy.every:
                    return None
                kind = kinds[sum(proxy.injected.values()) % len(kinds)]
                proxy.injected[kind] += 1
                return kind

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, method: str) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length) if length else None
            fault = self._fault()
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault:
                message = json.dumps({"code": int(fault), "message": "injected"}).encode()
                self._answer(
                    int(fault),
                    message,
                    {"Content-Type": "application/json", "Retry-After": "1"},
                )
                return
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
            }
            response = session.request(
                method, proxy.target + self.path, data=body, headers=headers, timeout=60
            )
            self._answer(
                response.status_code,
                response.content,
                {"Content-Type": response.headers.get("Content-Type", "application/json")},
            )

        def do_GET(self) -> None:
            self._forward("GET")

        def do_POST(self) -> None:
            self._forward("POST")

    return Handler


@contextlib.contextmanager
def faulty_proxy(target: str, **settings) -> Iterator[FaultyProxy]:
    """A running fault-injecting proxy in front of ``target``."""
    proxy = FaultyProxy(target, **settings)
    with serve(_proxy_handler(proxy)) as port:
        proxy.port = port
        yield proxy
