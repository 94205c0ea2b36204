"""Load generators that run in their own processes: lean keep-alive HTTP clients.

Each works like one real client of the bucket: the unchanged Karma Tracker poller (``limit`` 10,
one ``mark-processed`` per packet), a batch consumer (``limit`` 100, one batch ack per poll),
learners posting one packet every 5 s, or a sequential caller timing one endpoint. They use
``http.client`` on one persistent connection and orjson, so the client's own cost per call stays
small and is the same against the bucket and against the trivial ceiling app.
"""

from __future__ import annotations

import http.client
import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import orjson

API = "/api/v1/bucket/prana"


class Http:
    """One keep-alive connection; ``call`` returns (status, body) and records its latency."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            self.connection.request(method, path, body=body, headers=self.headers)
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            return 0, b""


@dataclass
class Tally:
    """What one client process did."""

    calls: int = 0
    errors: int = 0
    packets: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # the process's CPU seconds over ``elapsed``, where measured
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    def timed(self, name: str, started: float, status: int) -> None:
        self.latencies.setdefault(name, []).append(time.perf_counter() - started)
        self.calls += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status not in (200, 207):
            self.errors += 1


def packet_body(run: str, n: int) -> bytes:
    """A unique, valid single packet (user and timestamp unique per run and number)."""
    seconds = 1764324000 + 5 * n
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds % 2_000_000_000))
    return orjson.dumps(
        {
            "user_id": f"learner_{run}_{n % 1000}",
            "session_id": f"s_{run}",
            "lesson_id": "lesson_1",
            "system_type": "gurukul",
            "role": "student",
            "timestamp": f"{stamp}.{n % 1000:03d}Z",
            "cognitive_state": "ON_TASK",
            "active_seconds": 4.2,
            "idle_seconds": 0.8,
            "away_seconds": 0.0,
            "focus_score": 72,
            "raw_signals": {"dwell_time_ms": 4000, "mouse_velocity": 210.5, "tab_visible": True},
        }
    )


def karma_poller(
    port: int, token: str | None, seconds: float, max_packets: int, limit: int
) -> Tally:
    """The unchanged Karma Tracker poller, without its sleep: poll, then one ack per packet."""
    http_ = Http(port, token)
    tally = Tally()
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline and tally.packets < max_packets:
        t0 = time.perf_counter()
        status, body = http_.call("GET", f"{API}/packets/pending?limit={limit}")
        tally.timed("poll", t0, status)
        packets = orjson.loads(body)["packets"] if status == 200 else []
        for packet in packets:
            ack = {
                "packet_id": packet["packet_id"],
                "success": True,
                "karma_actions": [{"action": "noted", "packet_id": packet["packet_id"]}],
            }
            t0 = time.perf_counter()
            status, _ = http_.call("POST", f"{API}/packets/mark-processed", orjson.dumps(ack))
            tally.timed("ack", t0, status)
        tally.packets += len(packets)
        if not packets and status == 200:
            time.sleep(0.01)
    tally.elapsed = time.perf_counter() - started
    return tally


def batch_consumer(
    port: int, token: str | None, seconds: float, max_packets: int, limit: int
) -> Tally:
    """Poll ``limit`` packets and acknowledge them in one batch, as fast as possible."""
    http_ = Http(port, token)
    tally = Tally()
    started = time.perf_counter()
    deadline = started + seconds
    empty_since = None
    while time.perf_counter() < deadline and tally.packets < max_packets:
        t0 = time.perf_counter()
        status, body = http_.call("GET", f"{API}/packets/pending?limit={limit}")
        tally.timed("poll", t0, status)
        packets = orjson.loads(body)["packets"] if status == 200 else []
        if packets:
            empty_since = None
            results = [
                {"packet_id": p["packet_id"], "success": True, "karma_actions": None}
                for p in packets
            ]
            t0 = time.perf_counter()
            status, _ = http_.call(
                "POST", f"{API}/packets/mark-processed", orjson.dumps({"results": results})
            )
            tally.timed("ack", t0, status)
            tally.packets += len(packets)
        else:
            empty_since = empty_since or time.perf_counter()
            time.sleep(0.02)
    tally.elapsed = time.perf_counter() - started
    return tally


def sequential_calls(port: int, token: str | None, what: str, count: int, run: str) -> Tally:
    """``count`` calls of one kind in a row: ``status``, ``ingest`` (unique packets) or
    ``poll`` (limit 10, leases of half a day so the backlog shrinks by exactly what was taken)."""
    http_ = Http(port, token)
    tally = Tally()
    started = time.perf_counter()
    for n in range(count):
        t0 = time.perf_counter()
        if what == "status":
            status, _ = http_.call("GET", f"{API}/status")
        elif what == "ingest":
            status, _ = http_.call("POST", f"{API}/ingest", packet_body(run, n))
        elif what == "poll":
            status, _ = http_.call(
                "GET", f"{API}/packets/pending?limit=10&visibility_timeout=43200"
            )
        else:
            raise ValueError(what)
        tally.timed(what, t0, status)
    tally.elapsed = time.perf_counter() - started
    return tally


def learners(port: int, seconds: float, count: int, run: str) -> Tally:
    """``count`` learners each sending one packet every 5 s (``count`` / 5 packets per second),
    spread evenly over the interval, on a few connections."""
    connections = [Http(port) for _ in range(4)]
    tally = Tally()
    rate = count / 5.0
    started = time.perf_counter()
    for n in itertools.count():
        due = started + n / rate
        if due - started > seconds:
            break
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        t0 = time.perf_counter()
        status, _ = connections[n % 4].call("POST", f"{API}/ingest", packet_body(run, n))
        tally.timed("ingest", t0, status)
        tally.packets += 1
    tally.elapsed = time.perf_counter() - started
    return tally


def _run(target, args, queue) -> None:
    queue.put(target(*args))


def in_processes(jobs: list[tuple]) -> list[Tally]:
    """Run each ``(function, *args)`` in a process of its own, at once; return their tallies."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_run, args=(job[0], job[1:], queue), daemon=True) for job in jobs
    ]
    for process in processes:
        process.start()
    tallies = [queue.get() for _ in processes]
    for process in processes:
        process.join(30)
    return tallies


def run_id() -> str:
    """A short token that makes this run's packets unique."""
    return os.urandom(4).hex()
