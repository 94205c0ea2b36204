"""gunicorn's threaded worker, made to read each request whole before a thread serves it.

gthread hands a connection to a thread as soon as its first bytes arrive, and the thread then
blocks reading the body: a client that sends headers announcing 100 bytes and then 4 holds a
thread for as long as it likes, and a few dozen such clients hold them all (``/health``
included). This worker reads each request (head and body) in the worker's event loop, without
blocking, and gives it to a thread only once it is complete, so a thread is never parked on a
slow client. A request that is not complete ``BUCKET_REQUEST_READ_TIMEOUT`` seconds after its
connection became readable is answered 408 and closed; bad framing that can be seen while
reading (a chunk size such as ``zz``, an announced body above ``BUCKET_MAX_BODY_BYTES``) is
answered at once. Every answer the server makes itself (these, and gunicorn's own 400, 414,
431, …) is JSON in the service's error shape.

Requests are buffered in memory: at most ``BUCKET_MAX_BODY_BYTES`` plus headers per connection,
and at most ``worker_connections`` connections per worker. TLS and HTTP/2 connections are left
to gthread's own handling (the service expects TLS to end in front of it; README, "Security").
"""

from __future__ import annotations

import re
import selectors
import time
from functools import partial
from http import HTTPStatus

import orjson
from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from bucket.web.heap import HeapTrimmer
from config import Config

RECV_SIZE = 256 * 1024
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_CHUNK_LINE = 4096
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n"
    "X-Frame-Options: DENY\r\n"
    "X-Content-Type-Options: nosniff\r\n"
)


class Refusal(Exception):
    """The request can be refused from what has arrived so far."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response in the service's error shape; the connection closes."""
    phrase = HTTPStatus(status).phrase
    body = orjson.dumps({"code": status, "status": phrase, "message": message})
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{SECURITY_HEADERS}\r\n"
    )
    return head.encode("latin-1") + body


class RequestReading:
    """One request arriving: its bytes so far, and whether they make a whole request.

    Only framing is looked at (where the head ends, Content-Length or chunked); gunicorn's
    parser reads the buffered request afterwards as usual and judges everything else.
    """

    def __init__(self, deadline: float, max_body: int, max_line: int, max_head: int) -> None:
        self.deadline = deadline
        self.max_body = max_body
        self.max_line = max_line
        self.max_head = max_head
        self.buf = bytearray()
        self.body_start: int | None = None
        self.length: int | None = None  # Content-Length, when framed by it
        self.chunked = False
        self.head_scan = 0  # where the search for the end of the head resumes
        self.scan = 0  # chunked: where the next chunk-size line starts
        self.chunked_bytes = 0

    def feed(self, data: bytes) -> bool:
        """Add bytes; True once the request is complete. Raises Refusal for bad framing."""
        self.buf += data
        if self.body_start is None and not self.read_head():
            return False
        if self.chunked:
            if self.scan_chunks():
                return True
            if len(self.buf) - self.body_start > self.max_body + self.max_head:  # endless trailers
                raise Refusal(413, "The chunked body's trailer section is too large.")
            return False
        return len(self.buf) - self.body_start >= (self.length or 0)

    def read_head(self) -> bool:
        """Find the end of the head and the body's framing; False while the head is partial."""
        # Search only what arrived since the last look (a head may come a byte at a time).
        start, self.head_scan = self.head_scan, max(0, len(self.buf) - 3)
        end = self.buf.find(b"\r\n\r\n", start)
        if end < 0 and self.buf.find(b"\n\n", start) >= 0:
            raise Refusal(400, "Header lines must end with CRLF.")
        if end < 0:
            if (
                len(self.buf) > self.max_line + 2
                and self.buf.find(b"\r\n", 0, self.max_line + 2) < 0
            ):
                raise Refusal(414, f"The request line is longer than {self.max_line} bytes.")
            if len(self.buf) > self.max_head:
                raise Refusal(431, "The request's header fields are too large.")
            return False
        lines = bytes(self.buf[:end]).split(b"\r\n")
        kept, lengths, codings, expect = [lines[0]], set(), [], False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.add(value)
            elif name == b"transfer-encoding":
                codings.append(value.lower())
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
                continue  # answered here: the body is read before the app sees the request
            kept.append(line)
        self.frame_body(lengths, codings)
        if expect:
            head = b"\r\n".join(kept) + b"\r\n\r\n"
            self.buf[: end + 4] = head
            end = len(head) - 4
            self.continue_expected = True
        self.body_start = self.scan = end + 4
        return True

    continue_expected = False

    def frame_body(self, lengths: set[bytes], codings: list[bytes]) -> None:
        """How the body is framed, refusing what gunicorn would misread or never finish."""
        if codings:
            if lengths:
                raise Refusal(400, "Content-Length and Transfer-Encoding were both sent.")
            if codings != [b"chunked"]:
                raise Refusal(501, "Only Transfer-Encoding: chunked is supported.")
            self.chunked = True
            return
        if not lengths:
            return
        if len(lengths) > 1:
            raise Refusal(400, "Content-Length was sent more than once, with different values.")
        (value,) = lengths
        if not value.isdigit():
            raise Refusal(400, "Content-Length is not a number.")
        self.length = int(value)
        if self.length > self.max_body:
            raise Refusal(
                413, f"The request body exceeds {self.max_body} bytes (BUCKET_MAX_BODY_BYTES)."
            )

    def scan_chunks(self) -> bool:
        """Walk the chunks that have arrived; True after the last chunk and its trailers."""
        while True:
            line_end = self.buf.find(b"\r\n", self.scan)
            if line_end < 0:
                if len(self.buf) - self.scan > MAX_CHUNK_LINE:
                    raise Refusal(400, "A chunk-size line is too long.")
                return False
            size_text = bytes(self.buf[self.scan : line_end]).split(b";", 1)[0].strip()
            if not CHUNK_SIZE.fullmatch(size_text):
                raise Refusal(400, "The chunked body is malformed: invalid chunk size.")
            size = int(size_text, 16)
            if size == 0:
                if self.buf[line_end + 2 : line_end + 4] == b"\r\n":
                    return True
                return self.buf.find(b"\r\n\r\n", line_end) >= 0
            self.chunked_bytes += size
            if self.chunked_bytes > self.max_body:
                raise Refusal(
                    413, f"The request body exceeds {self.max_body} bytes (BUCKET_MAX_BODY_BYTES)."
                )
            data_end = line_end + 2 + size
            if len(self.buf) < data_end + 2:
                return False
            if self.buf[data_end : data_end + 2] != b"\r\n":
                raise Refusal(400, "The chunked body is malformed: a chunk lacks its CRLF.")
            self.scan = data_end + 2


class _Captured:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


class SettledConfig:
    """gunicorn's settings as one worker sees them: each looked up once, then a plain
    attribute. They cannot change in a worker (a reload starts new ones), and gunicorn reads
    several on every request through ``Config.__getattr__`` (4 % of an ingest worker's CPU)."""

    def __init__(self, cfg) -> None:
        self._cfg = cfg

    def __getattr__(self, name: str):
        value = getattr(self._cfg, name)
        setattr(self, name, value)
        return value


class BufferingThreadWorker(ThreadWorker):
    """gthread whose threads only ever see complete requests (module docstring)."""

    def init_process(self) -> None:
        self.cfg = SettledConfig(self.cfg)
        config = Config()
        self.read_timeout = config.BUCKET_REQUEST_READ_TIMEOUT
        self.max_body = config.BUCKET_MAX_BODY_BYTES
        self.readings: dict = {}  # connection -> RequestReading
        self.heap = HeapTrimmer(config.BUCKET_HEAP_TRIM_INTERVAL)
        super().init_process()

    def notify(self) -> None:
        """The heartbeat of every turn of the event loop; also gives the worker's freed heap
        back to the system when ``BUCKET_HEAP_TRIM_INTERVAL`` has passed (bucket/web/heap)."""
        super().notify()
        self.heap.tick(time.monotonic())

    def buffers(self, conn) -> bool:
        """Whether this worker reads the connection's requests itself (plain HTTP/1.x)."""
        return not (self.cfg.is_ssl or conn.is_http2 or self.cfg.http2_cleartext != "off")

    def enqueue_req(self, conn) -> None:
        """Read the next request in the event loop; a thread gets it once it is whole."""
        if not self.buffers(conn):
            super().enqueue_req(conn)
            return
        limit_line = self.cfg.limit_request_line or 1024 * 1024
        field_size = self.cfg.limit_request_field_size or 8190
        max_head = limit_line + 2 + self.cfg.limit_request_fields * (field_size + 2) + 4
        reading = RequestReading(
            time.monotonic() + self.read_timeout, self.max_body, limit_line, max_head
        )
        conn.sock.setblocking(False)
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if leftover and self.advance(conn, reading, leftover):
            return
        self.readings[conn] = reading
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))

    def on_request_bytes(self, conn, sock) -> None:
        """The connection is readable: take what has arrived."""
        reading = self.readings.get(conn)
        if reading is None:
            return
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stop_reading(conn)
            self.drop(conn)
            return
        if not data:  # the client went away before its request was whole
            self.stop_reading(conn)
            self.drop(conn)
            return
        if self.advance(conn, reading, data):
            self.stop_reading(conn)

    def advance(self, conn, reading: RequestReading, data: bytes) -> bool:
        """Feed bytes; answer bad framing or hand a whole request on. True when done with it."""
        try:
            complete = reading.feed(data)
        except Refusal as refusal:
            self.refuse(conn, refusal.status, refusal.message)
            return True
        if reading.continue_expected and not complete:
            reading.continue_expected = False
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        if not complete:
            return False
        conn.prefetched = bytes(reading.buf)
        conn.data_ready = True
        conn.sock.setblocking(True)
        super().enqueue_req(conn)
        return True

    def stop_reading(self, conn) -> None:
        self.readings.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def refuse(self, conn, status: int, message: str) -> None:
        """Answer in the error shape and close (the response is small: one non-blocking send)."""
        try:
            conn.sock.send(error_response(status, message))
        except OSError:
            pass
        self.drop(conn)

    def drop(self, conn) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self, force: bool = False) -> None:
        """Also end requests whose bytes did not all arrive in time (every loop turn)."""
        super().murder_keepalived(force)
        now = time.monotonic()
        for conn, reading in list(self.readings.items()):
            if force or reading.deadline <= now:
                self.stop_reading(conn)
                if reading.buf:
                    message = (
                        f"The request was not received within {self.read_timeout:g} s "
                        "(BUCKET_REQUEST_READ_TIMEOUT)."
                    )
                    self.refuse(conn, 408, message)
                else:  # an idle connection (a browser's preconnect): close it quietly
                    self.drop(conn)

    def handle(self, conn):
        """Serve the buffered request (in a thread): gunicorn's parser reads it from memory."""
        data = getattr(conn, "prefetched", b"")
        if data:
            conn.prefetched = b""
            conn.init()
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    def handle_error(self, req, client, addr, exc) -> None:
        """gunicorn's own error answers (400, 414, 431, 500, …) in the service's error shape."""
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        status = int(captured.data.split(b" ", 2)[1]) if captured.data else 500
        if status >= 500:
            message = "Internal server error."
        else:
            detail = str(exc)[:200]
            message = f"{HTTPStatus(status).phrase}: {detail}" if detail else ""
            message = message or HTTPStatus(status).description
        try:
            util.write_nonblock(client, error_response(status, message))
        except OSError:
            self.log.debug("Failed to send error message.")
