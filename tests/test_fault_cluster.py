"""Two real instances under faults: Redis SIGKILLed and restarted empty, a worker SIGKILLed.

One fresh PostgreSQL database and a private redis-server; two gunicorn instances with two
gthread workers each. Many threads ingest like the bridge (retrying timeouts, 5xx and broken
connections with a shortened 1 s/2 s/4 s back-off, then resending later), while four consumer
threads poll both instances and always acknowledge what they processed, so any packet
processed twice is a bug, as is any acknowledged ingest never processed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import threading
import time
import traceback
import uuid
from collections import Counter

import psycopg
import pytest
import requests

from tests import servers
from tests.cluster import Instance, flask_command, migrate, service_env
from tests.concurrency import join_all, wait_until
from tests.factories import make_packet
from tests.servers import PrivateRedis

pytestmark = pytest.mark.slow

API = "/api/v1/bucket/prana"
PACKETS = int(os.environ.get("BUCKET_TEST_FAULT_PACKETS", "3000"))
INGEST_THREADS = 12
CONSUMERS = 4
LEASE_SECONDS = 5
# Long enough that, in the latency test, only a Redis wake-up can end a poll before its wait.
RECHECK_SECONDS = 10
# Broken connections, timeouts and responses cut off mid-body by a killed worker.
RETRYABLE = (requests.RequestException, ValueError)


@pytest.fixture(scope="module")
def cluster():
    """A fresh database, a private Redis and two migrated instances; torn down at the end."""
    if servers.postgres_reachable():
        servers.unavailable(servers.postgres_reachable())
    name, url = servers.create_database()
    with contextlib.ExitStack() as cleanup:  # every step is undone even if a later one fails
        cleanup.callback(servers.drop_database, name)
        redis_server = PrivateRedis()
        cleanup.callback(redis_server.stop)
        redis_server.start()
        env = service_env(
            url,
            redis_server.url,
            f"fault-{uuid.uuid4().hex[:8]}",
            BUCKET_LONG_POLL_INTERVAL=str(RECHECK_SECONDS),
            BUCKET_DB_POOL_SIZE="4",
            BUCKET_DB_MAX_OVERFLOW="6",
        )
        migrate(env)
        instances: list[Instance] = []
        for _ in range(2):
            instance = Instance(env)
            cleanup.callback(instance.stop)  # registered before it starts
            instances.append(instance.start())
        yield {"instances": instances, "redis": redis_server, "database": url}


def pg_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_long_poll_is_woken_across_real_instances(cluster):
    """A poll waiting on one instance returns a fraction of a second after the other ingests."""
    waiter_side, ingest_side = cluster["instances"]
    latencies = []
    for n in range(5):
        result: dict = {}

        def wait_for_packet(result: dict = result) -> None:
            started = time.monotonic()
            response = requests.get(
                f"{waiter_side.url}{API}/packets/pending?limit=10&wait=8", timeout=15
            )
            result.update(body=response.json(), at=time.monotonic(), started=started)

        waiter = threading.Thread(target=wait_for_packet)
        waiter.start()
        time.sleep(0.4)
        posted = requests.post(
            f"{ingest_side.url}{API}/ingest", json=make_packet(user_id=f"latency-{n}"), timeout=10
        )
        ingested_at = time.monotonic()
        assert posted.status_code == 200
        waiter.join(20)
        packet_id = posted.json()["packet_id"]
        assert [p["packet_id"] for p in result["body"]["packets"]] == [packet_id]
        assert result["at"] - result["started"] < 8, "woken only when the wait expired"
        latencies.append(result["at"] - ingested_at)
        acked = requests.post(
            f"{ingest_side.url}{API}/packets/mark-processed",
            json={"packet_id": packet_id, "success": True},
            timeout=10,
        )
        assert acked.status_code == 200
    print(
        "\ncross-instance long-poll wake-up latency over gunicorn + Redis: "
        f"min {min(latencies) * 1000:.1f} ms, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )


class Ledger:
    """What the clients saw: acknowledged ingests and consumer-side processing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # packet_id -> the identity the bridge sent
        self.processed: Counter[str] = Counter()
        self.refused_acks: list[dict] = []
        self.ingest_failures: list[str] = []
        self.ingest_retries = 0
        self.consumer_errors = 0
        self.crashes: list[str] = []

    def guard(self, target):
        """Run a client thread, recording a crash instead of losing it with the thread."""

        def run(*args):
            try:
                target(*args)
            except Exception:  # noqa: BLE001 - reported by the test's assertions
                with self.lock:
                    self.crashes.append(traceback.format_exc())

        return run

    def processed_all(self) -> bool:
        with self.lock:
            return set(self.acked) <= set(self.processed)


def post_with_retries(instances, start: int, payload: dict, ledger: Ledger) -> dict | None:
    """Send like the bridge: retry broken connections, timeouts and 5xx, switching instance."""
    for attempt in itertools.count():
        instance = instances[(start + attempt) % len(instances)]
        try:
            response = requests.post(f"{instance.url}{API}/ingest", json=payload, timeout=10)
            if response.status_code < 500:
                return (
                    response.json()
                    if response.status_code in (200, 207)
                    else {"error": response.status_code, "body": response.text}
                )
        except RETRYABLE:
            pass
        with ledger.lock:
            ledger.ingest_retries += 1
        if attempt >= 12:
            return None
        # The bridge's 1 s, 2 s, 4 s, shortened; beyond it the "offline queue" resends.
        time.sleep(min(0.1 * 2 ** min(attempt, 3), 1.0))
    return None


def ingester(instances, worker: int, count: int, ledger: Ledger) -> None:
    """Ingest ``count`` packets, singly or in small batch envelopes."""
    rng = random.Random(worker)
    sent = 0
    while sent < count:
        size = min(count - sent, rng.choice([1, 1, 1, 5]))
        packets = [make_packet(user_id=f"fault-{worker}") for _ in range(size)]
        body = packets[0] if size == 1 else {"packets": packets, "batch_size": size}
        answer = post_with_retries(instances, worker + sent, body, ledger)
        items = [answer] if size == 1 else (answer or {}).get("results", [])
        if answer is None or "error" in answer or len(items) != size:
            with ledger.lock:
                ledger.ingest_failures.append(repr(answer)[:300])
        else:
            with ledger.lock:
                for packet, item in zip(packets, items, strict=True):
                    if item.get("status") in ("ingested", "duplicate"):
                        identity = packet["timestamp"] + packet["user_id"]
                        previous = ledger.acked.setdefault(item["packet_id"], identity)
                        assert previous == identity, "two packets answered with one packet_id"
                    else:
                        ledger.ingest_failures.append(repr(item)[:300])
        sent += size


def ack_with_retries(instances, start: int, body: dict, ledger: Ledger) -> dict | None:
    """Acknowledge until some instance records it (a killed worker loses the first try)."""
    for attempt in range(20):
        instance = instances[(start + attempt) % len(instances)]
        try:
            response = requests.post(
                f"{instance.url}{API}/packets/mark-processed", json=body, timeout=10
            )
            if response.status_code < 500:
                return {"status": response.status_code, "body": response.json()}
        except RETRYABLE:
            pass
        time.sleep(0.05 * (attempt + 1))
    return None


def consumer(instances, number: int, stop: threading.Event, ledger: Ledger) -> None:
    """Poll both instances; process each packet once and always acknowledge it.

    Even-numbered consumers ack in one batch with receipts; odd ones ack one by one without a
    receipt, as the unchanged Karma Tracker poller does.
    """
    batch_acks = number % 2 == 0
    for turn in itertools.count(number):
        if stop.is_set():
            return
        instance = instances[turn % len(instances)]
        try:
            response = requests.get(
                f"{instance.url}{API}/packets/pending",
                params={"limit": 20, "visibility_timeout": LEASE_SECONDS, "wait": 1},
                timeout=10,
            )
            if response.status_code != 200:
                raise requests.ConnectionError(f"status {response.status_code}")
            packets = response.json()["packets"]
        except RETRYABLE:
            with ledger.lock:
                ledger.consumer_errors += 1
            time.sleep(0.1)
            continue
        with ledger.lock:
            for packet in packets:
                ledger.processed[packet["packet_id"]] += 1
        results = [
            {
                "packet_id": p["packet_id"],
                "success": True,
                "karma_actions": [{"n": 1}],
                **({"receipt": p["receipt"]} if batch_acks else {}),
            }
            for p in packets
        ]
        if batch_acks and results:
            outcome = ack_with_retries(instances, turn, {"results": results}, ledger)
            refused = (
                []
                if outcome is None
                else [r for r in outcome["body"].get("results", []) if r["code"] != 200]
            )
            if outcome is None or refused:
                with ledger.lock:
                    ledger.refused_acks.append({"outcome": outcome, "refused": refused})
        else:
            for result in results:
                outcome = ack_with_retries(instances, turn, result, ledger)
                if outcome is None or outcome["status"] != 200:
                    with ledger.lock:
                        ledger.refused_acks.append({"outcome": outcome, "result": result})


def run_faults(cluster, ledger: Ledger, events: list[str], started: float) -> None:
    """SIGKILL Redis at a third of the ingests (restart it empty), a worker at two thirds."""
    redis_server = cluster["redis"]
    victim_instance = cluster["instances"][0]

    def wait_for(fraction: float) -> None:
        wait_until(
            lambda: len(ledger.acked) >= PACKETS * fraction,
            120,
            f"ingest never reached {fraction:.0%} of {PACKETS} packets",
            interval=0.02,
        )

    wait_for(1 / 3)
    redis_server.kill()
    events.append(f"{time.monotonic() - started:5.1f}s redis SIGKILLed")
    time.sleep(1.5)
    redis_server.start()
    events.append(f"{time.monotonic() - started:5.1f}s redis restarted empty")
    wait_for(2 / 3)
    pid = victim_instance.kill_worker()
    events.append(f"{time.monotonic() - started:5.1f}s gunicorn worker {pid} SIGKILLed")


def test_nothing_acknowledged_is_lost_or_processed_twice_under_faults(cluster):
    """Every packet answered 200 is processed exactly once through Redis and worker crashes."""
    instances = cluster["instances"]
    with psycopg.connect(pg_url(cluster["database"]), autocommit=True) as conn:
        conn.execute(
            "TRUNCATE packets, packet_keys, packet_idempotency_keys, deliveries, "
            "packet_counters, quarantine, audit_seals, audit_purges, audit_purged_ranges, "
            "activity_minutes"
        )  # status counts from both
    ledger = Ledger()
    events: list[str] = []
    stop = threading.Event()
    started = time.monotonic()

    consumers = [
        threading.Thread(
            target=ledger.guard(consumer), args=(instances, n, stop, ledger), daemon=True
        )
        for n in range(CONSUMERS)
    ]
    share = [
        PACKETS // INGEST_THREADS + (n < PACKETS % INGEST_THREADS) for n in range(INGEST_THREADS)
    ]
    ingesters = [
        threading.Thread(
            target=ledger.guard(ingester), args=(instances, n, share[n], ledger), daemon=True
        )
        for n in range(INGEST_THREADS)
    ]
    faults = threading.Thread(
        target=ledger.guard(run_faults), args=(cluster, ledger, events, started), daemon=True
    )
    for thread in consumers + ingesters + [faults]:
        thread.start()
    try:
        join_all(ingesters, 180, "ingest client")
        ingested_in = time.monotonic() - started
        join_all([faults], 30, "fault injector")
        assert not ledger.crashes, ledger.crashes[0]
        wait_until(ledger.processed_all, 60, "acknowledged packets were never all processed", 0.2)
        time.sleep(1.0)  # let the last acknowledgements land
    finally:
        stop.set()
    join_all(consumers, 15, "consumer")
    elapsed = time.monotonic() - started

    acked = set(ledger.acked)
    processed = set(ledger.processed)
    lost = acked - processed
    duplicated = {pid: n for pid, n in ledger.processed.items() if n > 1}
    with psycopg.connect(pg_url(cluster["database"])) as conn:
        held = conn.execute("SELECT packet_id::text, delivery_state FROM deliveries")
        stored = dict(held.fetchall())
    figures = [requests.get(f"{i.url}{API}/status", timeout=10).json() for i in instances]

    print(
        f"\nfault run: {PACKETS} packets sent by {INGEST_THREADS} threads, "
        f"{CONSUMERS} consumers on {len(instances)} instances x 2 workers\n"
        + "\n".join(f"  {e}" for e in events)
        + f"\n  ingested (answered 200): {len(acked)}  ingest retries: {ledger.ingest_retries}"
        f"  ingest failures: {len(ledger.ingest_failures)}\n"
        f"  processed: {len(processed)}  lost: {len(lost)}  duplicated: {len(duplicated)}"
        f"  refused acks: {len(ledger.refused_acks)}  consumer errors: {ledger.consumer_errors}\n"
        f"  ingest phase {ingested_in:.1f} s, total {elapsed:.1f} s;"
        f" workers now {[len(i.worker_pids()) for i in instances]}"
    )
    assert not ledger.crashes, ledger.crashes[0]
    assert len(events) == 3, f"the faults did not all happen: {events}"
    assert not ledger.ingest_failures, ledger.ingest_failures[:5]
    assert len(acked) == PACKETS
    assert not lost, f"{len(lost)} acknowledged packets never processed"
    assert not duplicated, f"processed twice: {list(duplicated.items())[:10]}"
    assert processed <= acked, "a consumer processed a packet nobody was told was stored"
    assert not ledger.refused_acks, ledger.refused_acks[:5]
    assert set(stored) == acked, "the database holds exactly the acknowledged packets"
    assert Counter(stored.values()) == {"processed": PACKETS}
    for status in figures:
        assert status["total_packets"] == PACKETS
        assert status["processed_packets"] == PACKETS
        assert status["pending_packets"] == 0
        assert status["dead_packets"] == 0
        assert status["queue_size"] == 0
        assert status["redis_connected"] is True
    assert all(len(i.worker_pids()) == 2 for i in instances), "the master replaced its worker"
    # The workers sealed in the background through all of it (a killed worker's seal rolled
    # back): one chain, every packet in it once, nothing altered.
    for command in ("seal", "verify"):
        done = flask_command(instances[0].env, "bucket", command)
        assert done.returncode == 0, done.stdout + done.stderr
    assert f"and {PACKETS} packets; 0 purged by retention, 0 not sealed yet, 0 problems" in (
        done.stdout
    ), done.stdout
