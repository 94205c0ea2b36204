"""PostgreSQL goes away under load and comes back: nothing acknowledged is lost or doubled.

A private PostgreSQL (initdb + pg_ctl on a free port) and a private Redis serve one instance
started by the Procfile's web line with two gunicorn workers. Ingest clients (single packets
and batch envelopes) and four consumers (long polls, single and batch acks) run throughout,
while PostgreSQL is stopped with a fast shutdown and started again, then killed with SIGKILL
(crash recovery), then restarted while a long poll waits on an empty queue. Every answer is
recorded by the phase its request started in, so the test can say what each outage looked
like from outside and check that:

- while the database is down, ingest answers 503 with Retry-After (never 200 or 500, never a
  hung request), polls answer 503 or nothing, acks 503; /health stays up, /health/ready not;
- once it is back, everything works within seconds without restarting gunicorn;
- at the end every packet answered "ingested" is stored once and processed once, every 200
  acknowledgement stuck, and status counts equal the rows.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import pytest
import requests

from tests.cluster import Instance, migrate, service_env
from tests.concurrency import join_all, wait_until
from tests.factories import make_packet
from tests.servers import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.slow

API = "/api/v1/bucket/prana"
CLIENT_TIMEOUT = 10.0  # the bridge's
DOWNTIME = 3.0
INGESTERS = 6
CONSUMERS = 4
LEASE = 60  # longer than any outage: a packet leased before one is not served again
CUT = (requests.ConnectionError, requests.Timeout, ValueError)


class Phases:
    """The current phase, and every answer recorded by the phase its request started in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.name = "warm-up"
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.timeouts = 0
        self.crashes: list[str] = []

    def enter(self, name: str) -> None:
        with self.lock:
            self.name = name

    def now(self) -> str:
        return self.name

    def record(self, phase: str, what: str, answer: str) -> None:
        with self.lock:
            self.answers[phase][f"{what} {answer}"] += 1

    def guard(self, target):
        def run(*args):
            try:
                target(*args)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                with self.lock:
                    self.crashes.append(f"{target.__name__}: {exc!r}")

        return run


def call(phases: Phases, what: str, method: str, url: str, **kwargs):
    """One request, its answer recorded under the phase it started in; None when cut."""
    phase = phases.now()
    try:
        response = requests.request(method, url, timeout=CLIENT_TIMEOUT, **kwargs)
    except requests.Timeout:
        with phases.lock:
            phases.timeouts += 1
        phases.record(phase, what, "timeout")
        return phase, None
    except CUT:
        phases.record(phase, what, "cut")
        return phase, None
    label = str(response.status_code)
    if response.status_code == 503 and what != "ready" and "Retry-After" not in response.headers:
        label = "503-without-retry-after"
    if what == "poll" and response.status_code == 200:
        label = "200-packets" if response.json()["packets"] else "200-empty"
    phases.record(phase, what, label)
    return phase, response


class Ledger:
    """What the clients were told: ingested packets and each packet's processing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ingested: dict[str, str] = {}  # packet_id -> identity sent
        self.processed: Counter[str] = Counter()
        self.acked: set[str] = set()
        self.pause = threading.Event()
        self.stop = threading.Event()


def ingester(base: str, number: int, phases: Phases, ledger: Ledger) -> None:
    """Send packets like the bridge: retry 503s and cut connections until answered."""
    rng = random.Random(number)
    for sent in itertools.count():
        if ledger.stop.is_set():
            return
        if ledger.pause.is_set():
            time.sleep(0.05)
            continue
        size = rng.choice([1, 1, 1, 5])
        packets = [make_packet(user_id=f"restart-{number}") for _ in range(size)]
        body = packets[0] if size == 1 else {"packets": packets, "batch_size": size}
        for _ in range(200):
            _, response = call(phases, "ingest", "POST", f"{base}{API}/ingest", json=body)
            if response is not None and response.status_code in (200, 207):
                break
            assert response is None or response.status_code == 503, response.text
            time.sleep(0.2)
        else:
            raise AssertionError(f"packet {sent} of ingester {number} was never accepted")
        items = [response.json()] if size == 1 else response.json()["results"]
        with ledger.lock:
            for packet, item in zip(packets, items, strict=True):
                assert item["status"] in ("ingested", "duplicate"), item
                identity = packet["timestamp"] + packet["user_id"]
                previous = ledger.ingested.setdefault(item["packet_id"], identity)
                assert previous == identity, "two packets answered with one packet_id"


def acknowledge(base: str, phases: Phases, body: dict) -> dict:
    """Retry an acknowledgement until the service records it."""
    for _ in range(200):
        _, response = call(phases, "ack", "POST", f"{base}{API}/packets/mark-processed", json=body)
        if response is not None and response.status_code in (200, 207):
            return response.json()
        assert response is None or response.status_code == 503, response.text
        time.sleep(0.2)
    raise AssertionError("an acknowledgement was never recorded")


def consumer(base: str, number: int, phases: Phases, ledger: Ledger) -> None:
    """Long-poll and process every packet once; even consumers ack in batches with receipts."""
    batch = number % 2 == 0
    while not ledger.stop.is_set():
        _, response = call(
            phases,
            "poll",
            "GET",
            f"{base}{API}/packets/pending",
            params={"limit": 20, "wait": 1, "visibility_timeout": LEASE},
        )
        if response is None or response.status_code != 200:
            assert response is None or response.status_code == 503, response.text
            time.sleep(0.2)
            continue
        packets = response.json()["packets"]
        with ledger.lock:
            for packet in packets:
                ledger.processed[packet["packet_id"]] += 1
        results = [
            {"packet_id": p["packet_id"], "success": True, "karma_actions": [{"n": 1}]}
            | ({"receipt": p["receipt"]} if batch else {})
            for p in packets
        ]
        if batch and results:
            answers = acknowledge(base, phases, {"results": results})["results"]
            assert all(a["code"] == 200 for a in answers), answers
        else:
            for result in results:
                assert acknowledge(base, phases, result)["status"] == "ok"
        with ledger.lock:
            ledger.acked.update(r["packet_id"] for r in results)


def prober(base: str, phases: Phases, ledger: Ledger) -> None:
    """Ask the load balancer's questions ten times a second."""
    while not ledger.stop.is_set():
        call(phases, "health", "GET", f"{base}/health")
        call(phases, "ready", "GET", f"{base}/health/ready")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def system():
    """A private PostgreSQL and Redis, migrated, and one instance of two workers."""
    with contextlib.ExitStack() as cleanup:
        database = PrivatePostgres()
        cleanup.callback(database.destroy)
        database.start()
        redis_server = PrivateRedis()
        cleanup.callback(redis_server.stop)
        redis_server.start()
        env = service_env(
            database.url,
            redis_server.url,
            f"restart-{uuid.uuid4().hex[:8]}",
            BUCKET_BOOKKEEPING_INTERVAL="1",
        )
        migrate(env)
        instance = Instance(env, workers=2, threads=8)
        cleanup.callback(instance.stop)
        instance.start()
        yield {"database": database, "instance": instance}


def outage(phases: Phases, database: PrivatePostgres, name: str, down) -> None:
    """Take the database down with ``down()``, keep it down a while, start it again."""
    phases.enter(f"{name}: stopping")
    down()
    phases.enter(f"{name}: down")
    time.sleep(DOWNTIME)
    phases.enter(f"{name}: starting")
    database.start()
    phases.enter(f"{name}: back")


def first_success_after(phases: Phases, phase: str) -> bool:
    with phases.lock:
        return phases.answers[phase]["ingest 200"] + phases.answers[phase]["ingest 207"] > 0


def test_postgres_restarts_and_crashes_lose_nothing(system):
    """Fast shutdown, SIGKILL, restart under a waiting long poll: see the module docstring."""
    database, instance = system["database"], system["instance"]
    base = instance.url
    phases, ledger = Phases(), Ledger()
    threads = [
        threading.Thread(target=phases.guard(ingester), args=(base, n, phases, ledger), daemon=True)
        for n in range(INGESTERS)
    ]
    threads += [
        threading.Thread(target=phases.guard(consumer), args=(base, n, phases, ledger), daemon=True)
        for n in range(CONSUMERS)
    ]
    threads.append(
        threading.Thread(target=phases.guard(prober), args=(base, phases, ledger), daemon=True)
    )
    for thread in threads:
        thread.start()
    recovery: dict[str, float] = {}
    long_poll: dict = {}
    try:

        def ingested_at_least(count: int) -> None:
            wait_until(lambda: len(ledger.ingested) >= count, 60, f"ingest never reached {count}")

        def recovered(name: str) -> None:
            back = time.monotonic()
            wait_until(
                lambda: first_success_after(phases, f"{name}: back"),
                30,
                f"{name}: nothing was ingested after the database came back",
                interval=0.02,
            )
            recovery[name] = time.monotonic() - back
            # Two seconds whose requests must all succeed (checked below); after them, requests
            # may be caught by the next outage.
            phases.enter(f"{name}: settled")
            time.sleep(2.0)
            phases.enter(f"{name}: up")

        phases.enter("up")
        ingested_at_least(300)
        outage(phases, database, "fast shutdown", lambda: database.stop("fast"))
        recovered("fast shutdown")
        ingested_at_least(len(ledger.ingested) + 300)
        outage(phases, database, "crash", database.kill)
        recovered("crash")
        ingested_at_least(len(ledger.ingested) + 300)

        # A long poll waits on an empty queue while the database restarts under it.
        ledger.pause.set()
        wait_until(lambda: set(ledger.ingested) <= ledger.acked, 60, "the queue never drained")

        def wait_long() -> None:
            started = time.monotonic()
            phase, response = call(
                phases,
                "long poll",
                "GET",
                f"{base}{API}/packets/pending",
                params={"limit": 5, "wait": 8, "visibility_timeout": LEASE},
            )
            long_poll.update(
                seconds=time.monotonic() - started,
                status=None if response is None else response.status_code,
                packets=[]
                if response is None or response.status_code != 200
                else response.json()["packets"],
            )

        waiter = threading.Thread(target=phases.guard(wait_long), daemon=True)
        waiter.start()
        time.sleep(1.0)
        outage(phases, database, "restart under a long poll", lambda: database.stop("fast"))
        join_all([waiter], CLIENT_TIMEOUT + 5, "long poll")
        with ledger.lock:
            for packet in long_poll["packets"]:  # it is a consumer too: its packets need acks
                ledger.processed[packet["packet_id"]] += 1
        for packet in long_poll["packets"]:
            acknowledge(base, phases, {"packet_id": packet["packet_id"], "success": True})
            ledger.acked.add(packet["packet_id"])
        ledger.pause.clear()
        recovered("restart under a long poll")
        ingested_at_least(len(ledger.ingested) + 200)
        phases.enter("finishing")
    finally:
        ledger.pause.clear()
        ledger.stop.set()
        join_all(threads, CLIENT_TIMEOUT + 30, "client")
    assert not phases.crashes, phases.crashes
    # Drain what the last ingests left.
    ledger.stop.clear()
    drainers = [
        threading.Thread(target=phases.guard(consumer), args=(base, n, phases, ledger), daemon=True)
        for n in range(2)
    ]
    for thread in drainers:
        thread.start()
    try:
        wait_until(lambda: set(ledger.ingested) <= ledger.acked, 60, "not everything was acked")
    finally:
        ledger.stop.set()
        join_all(drainers, CLIENT_TIMEOUT + 5, "drainer")

    with psycopg.connect(database.dsn) as conn:
        held = conn.execute("SELECT packet_id::text, delivery_state FROM deliveries")
        stored = dict(held.fetchall())
        packets = conn.execute("SELECT count(*) FROM packets").fetchone()[0]
    status = requests.get(f"{base}{API}/status", timeout=CLIENT_TIMEOUT).json()
    lost = set(ledger.ingested) - set(stored)
    unprocessed = {pid for pid, state in stored.items() if state != "processed"}
    doubled = {pid: n for pid, n in ledger.processed.items() if n > 1}
    report = ["", "PostgreSQL restart fault run: answers by the phase their request started in"]
    for phase, answers in phases.answers.items():
        report.append(
            f"  {phase:32s} " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
        )
    report.append(
        "  recovery (server up -> first ingest answered 200): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in recovery.items())
    )
    report.append(
        f"  long poll through the restart: {long_poll}\n"
        f"  ingested {len(ledger.ingested)}, stored {len(stored)} ({packets} packets), "
        f"processed {sum(1 for n in ledger.processed.values() if n)}, lost {len(lost)}, "
        f"unprocessed {len(unprocessed)}, processed twice {len(doubled)}, "
        f"timeouts {phases.timeouts}"
    )
    causes = Counter(
        line.rsplit('"message":"', 1)[1].rstrip('"}').rsplit(": ", 1)[-1]
        for line in Path(instance.log.name).read_text(errors="replace").splitlines()
        if "database unavailable" in line
    )
    report.append(
        "  why the service answered 503 (its log): "
        + "; ".join(f"{count}x {cause}" for cause, count in causes.most_common(8))
    )
    print("\n".join(report))

    for phase, answers in phases.answers.items():
        assert not any(k.endswith(" 500") for k in answers), (phase, answers)
        assert not answers["ingest 503-without-retry-after"], (phase, answers)
        if phase.endswith(": down"):
            assert not answers["ingest 200"] and not answers["ingest 207"], (phase, answers)
            assert not answers["poll 200-packets"], (phase, answers)
            assert answers["health 200"] > 0 and not answers["health 503"], (phase, answers)
            assert answers["ready 503"] > 0 and not answers["ready 200"], (phase, answers)
        if phase.endswith(": settled"):
            failed = {k: v for k, v in answers.items() if k.split()[-1] in ("503", "cut")}
            assert not failed, (phase, answers)
            assert answers["ready 200"] > 0, (phase, answers)
    down = [answers for phase, answers in phases.answers.items() if phase.endswith(": down")]
    assert sum(answers["ingest 503"] for answers in down) > 0, "no ingest met an outage"
    assert phases.timeouts == 0, "a request hung past the client's timeout"
    assert all(seconds < 5 for seconds in recovery.values()), recovery
    assert long_poll["status"] in (200, 503) and long_poll["seconds"] < CLIENT_TIMEOUT, long_poll
    assert not lost, f"{len(lost)} packets answered 'ingested' were not stored"
    assert len(stored) == packets == len(ledger.ingested), "stored more than was ingested"
    assert not unprocessed, f"{len(unprocessed)} packets never processed"
    assert not doubled, f"processed twice: {list(doubled.items())[:5]}"
    assert set(ledger.processed) == set(ledger.ingested)
    assert status["total_packets"] == status["processed_packets"] == len(stored)
    assert status["pending_packets"] == status["dead_packets"] == status["queue_size"] == 0
