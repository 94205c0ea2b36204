"""The consumer client (``client/``, ``prana_bucket_client``) against the real service.

Each backend pair gets one bucket for the module (gunicorn started by the Procfile's web line:
SQLite + memory, PostgreSQL + Redis) and each test runs the client's command,
``python -m prana_bucket_client``, as Karma Tracker would (``tests/karma_consumer.py`` stands
in for its business logic), against a karma API stub (``tests/karma_stub.py``). What the
deployed consumer does instead (one poll of 10, one request per acknowledgement, a 5 s sleep, no
lease kept) is described in the README, "Sizing Karma Tracker"; its code is not here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import create_engine, select

from bucket.services.delivery.actions import stored_actions
from bucket.services.delivery.settings import D
from tests import servers
from tests.cluster import Instance, fresh_database_env, migrate, service_env
from tests.concurrency import wait_until
from tests.factories import make_packet
from tests.karma_stub import faulty_proxy, karma_stub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1/bucket/prana"
MAX_ATTEMPTS = 3
CONSUMER = "tests.karma_consumer:KarmaTrackerConsumer"


@dataclass
class Bucket:
    url: str
    database_url: str

    def rows(self, packet_ids: list[str]) -> dict[str, dict]:
        """Each packet's delivery row, read from the database (its karma actions as the
        listing reads them: migration 0021 marks the packet's own id in them on PostgreSQL)."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    select(
                        D.c.packet_id,
                        D.c.delivery_state,
                        D.c.delivery_count,
                        D.c.visible_at,
                        D.c.last_error,
                        stored_actions().label("karma_actions"),
                    ).where(D.c.packet_id.in_(packet_ids))
                )
                # str(): a uuid column (PostgreSQL, migration 0016) reads back as uuid.UUID here.
                return {str(row.packet_id): dict(row._mapping) for row in found}
        finally:
            engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def bucket(request, tmp_path_factory) -> Iterator[Bucket]:
    """One running bucket per backend pair, shared by the module's tests."""
    extra = {
        "BUCKET_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "BUCKET_RETRY_BACKOFF": "0",
        "BUCKET_AUDIT_SEAL_INTERVAL": "0",
    }
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path_factory.mktemp("client") / "bucket.sqlite3"
            database_url = f"sqlite:///{path}"
            env = service_env(database_url, "", f"client-{uuid.uuid4().hex[:8]}", **extra)
            migrate(env)
        else:
            database_url, env = stack.enter_context(fresh_database_env("client", **extra))
            stack.callback(forget_redis_keys, env["BUCKET_REDIS_PREFIX"])
        instance = Instance(env, workers=2, threads=8)
        stack.callback(instance.stop)
        instance.start()
        yield Bucket(instance.url, database_url)


def forget_redis_keys(prefix: str) -> None:
    client = redis.Redis.from_url(servers.REDIS_TEST_URL, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def ingest(bucket: Bucket, packets: list[dict]) -> list[str]:
    """Store ``packets`` (batches of 500); their packet ids, in order."""
    ids = []
    for start in range(0, len(packets), 500):
        answer = requests.post(
            f"{bucket.url}{API}/ingest", json={"packets": packets[start : start + 500]}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        ids += [result["packet_id"] for result in answer.json()["results"]]
    return ids


def learners(count: int, **overrides) -> list[dict]:
    """``count`` packets of distinct users of this test run."""
    run = uuid.uuid4().hex[:8]
    return [make_packet(user_id=f"u_{run}_{n}", **overrides) for n in range(count)]


class ConsumerProcess:
    """``python -m prana_bucket_client`` with the test consumer class, logging to a file."""

    def __init__(self, bucket_url: str, karma_url: str, **settings: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bucket-consumer-", suffix=".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "CONSUMER_"))}
        env.update(
            BUCKET_API_BASE_URL=bucket_url,
            KARMA_TRACKER_API_BASE_URL=karma_url,
            POLL_INTERVAL_SECONDS="1",
            BATCH_SIZE="10",
            CONSUMER_CONCURRENCY="8",
            CONSUMER_VISIBILITY_TIMEOUT="3",
            CONSUMER_WAIT_SECONDS="1",
            CONSUMER_SHUTDOWN_SECONDS="10",
            PYTHONUNBUFFERED="1",
        )
        env.update(settings)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prana_bucket_client", "--consumer", CONSUMER],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait for the clean stop; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"consumer did not stop on SIGTERM:\n{self.output()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self.log.close()


@contextlib.contextmanager
def consumers(count: int, bucket_url: str, karma_url: str, **settings: str):
    started = [ConsumerProcess(bucket_url, karma_url, **settings) for _ in range(count)]
    try:
        yield started
    finally:
        for consumer in started:
            consumer.close()


def settled(bucket: Bucket, ids: list[str]) -> bool:
    """Every packet processed or dead."""
    rows = bucket.rows(ids)
    return len(rows) == len(ids) and all(
        row["delivery_state"] in ("processed", "dead") for row in rows.values()
    )


def wait_settled(bucket: Bucket, ids: list[str], timeout: float, processes) -> None:
    try:
        wait_until(lambda: settled(bucket, ids), timeout, "packets left unprocessed", 0.2)
    except AssertionError:
        raise AssertionError("\n---\n".join(p.output() for p in processes)) from None


def test_a_drain_calls_karma_once_per_packet(bucket):
    """Two consumer processes drain 300 packets: each packet is processed once, with exactly
    one karma call carrying its packet_id as Idempotency-Key, and its karma action stored."""
    ids = ingest(bucket, learners(300))
    with karma_stub(latency=0.005) as karma, consumers(2, bucket.url, karma.url) as running:
        wait_settled(bucket, ids, 60, running)
        assert [p.terminate() for p in running] == [0, 0]
    rows = bucket.rows(ids)
    assert {row["delivery_state"] for row in rows.values()} == {"processed"}
    assert {row["delivery_count"] for row in rows.values()} == {1}
    calls = karma.keys()
    assert set(calls) == set(ids) and set(calls.values()) == {1}
    actions = rows[ids[0]]["karma_actions"]
    actions = actions if isinstance(actions, list) else json.loads(actions)
    assert actions == [{"action": "completing_lessons", "packet_id": ids[0], "intensity": 0.8}]


def test_a_consumer_killed_mid_drain_loses_only_what_it_held(bucket):
    """SIGKILL mid-drain: only the packets the dead consumer held come back, once their lease
    has run out; the next consumer finishes everything."""
    ids = ingest(bucket, learners(300))
    with karma_stub(latency=0.02) as karma:
        with consumers(1, bucket.url, karma.url) as (first,):
            wait_until(lambda: len(karma.keys()) >= 40, 30, "first consumer never got going")
            first.kill()
        # An acknowledgement the consumer sent just before it died may still be committing:
        # what it held is what stays leased once the leased set stops changing.
        held, previous = {}, None
        while previous is None or set(held) != set(previous):
            previous = held
            time.sleep(0.5)
            held = {
                pid: row
                for pid, row in bucket.rows(ids).items()
                if row["delivery_state"] == "leased"
            }
        assert 0 < len(held) <= 3 * 8, len(held)  # flow control: about max_in_flight
        with consumers(1, bucket.url, karma.url) as running:
            wait_settled(bucket, ids, 60, running)
            assert running[0].terminate() == 0
    rows = bucket.rows(ids)
    assert {row["delivery_state"] for row in rows.values()} == {"processed"}
    redelivered = {pid for pid, row in rows.items() if row["delivery_count"] > 1}
    assert redelivered == set(held)
    assert all(rows[pid]["delivery_count"] == 2 for pid in held)
    calls = karma.keys()
    assert set(calls) == set(ids)
    assert {pid for pid, n in calls.items() if n > 1} <= set(held)
    for pid, row in held.items():  # served again only once the lease it held had run out
        assert karma.calls_of(pid)[-1].at >= row["visible_at"] - 0.05, pid


def test_sigterm_mid_drain_leaves_nothing_to_redeliver(bucket):
    """SIGTERM mid-drain: the consumer finishes what it holds, flushes its acks and exits 0;
    no packet is leased afterwards and none is ever delivered or sent to karma twice."""
    ids = ingest(bucket, learners(300))
    with karma_stub(latency=0.02) as karma:
        with consumers(1, bucket.url, karma.url) as (first,):
            wait_until(lambda: len(karma.keys()) >= 40, 30, "first consumer never got going")
            assert first.terminate() == 0, first.output()
            assert "stopped:" in first.output()
        after_stop = bucket.rows(ids)
        assert not [pid for pid, row in after_stop.items() if row["delivery_state"] == "leased"]
        assert any(row["delivery_state"] == "pending" for row in after_stop.values())
        with consumers(1, bucket.url, karma.url) as running:
            wait_settled(bucket, ids, 60, running)
            assert running[0].terminate() == 0
    rows = bucket.rows(ids)
    assert {row["delivery_count"] for row in rows.values()} == {1}
    assert set(karma.keys().values()) == {1} and set(karma.keys()) == set(ids)


def test_a_slow_handler_keeps_its_lease(bucket):
    """A karma call taking three leases' time (3 × 2 s) is made once: the client extends the
    lease while it runs, so the packet is never served again meanwhile."""
    packets = learners(10)
    slow_user = packets[0]["user_id"]
    ids = ingest(bucket, packets)
    with (
        karma_stub(latency=0.005, slow_users={slow_user: 6.0}) as karma,
        consumers(1, bucket.url, karma.url, CONSUMER_VISIBILITY_TIMEOUT="2") as running,
    ):
        wait_settled(bucket, ids, 30, running)
        assert running[0].terminate() == 0
        log = running[0].output()
    rows = bucket.rows(ids)
    assert rows[ids[0]]["delivery_state"] == "processed"
    assert rows[ids[0]]["delivery_count"] == 1
    assert len(karma.calls_of(ids[0])) == 1
    assert "'extended': 0" not in log and "'extended':" in log


def test_poison_packets_are_dead_lettered_without_harming_batch_mates(bucket):
    """In one batch, packets whose handler raises and one whose karma call fails are
    acknowledged as failures until they are dead; their batch-mates are processed once."""
    packets = learners(30)
    for n in (3, 11, 19):
        packets[n]["raw_signals"] = {"poison": True}
    failing_user = packets[25]["user_id"]
    ids = ingest(bucket, packets)
    poison = {ids[3], ids[11], ids[19]}
    with (
        karma_stub(latency=0.005, fail_users={failing_user: 500}) as karma,
        consumers(1, bucket.url, karma.url) as running,
    ):
        wait_settled(bucket, ids, 60, running)
        assert running[0].terminate() == 0
    rows = bucket.rows(ids)
    for pid in poison:
        assert rows[pid]["delivery_state"] == "dead"
        assert rows[pid]["delivery_count"] == MAX_ATTEMPTS
        assert rows[pid]["last_error"].startswith("ValueError: cannot judge packet")
    assert rows[ids[25]]["delivery_state"] == "dead"
    assert rows[ids[25]]["last_error"] == "karma_api_error_500"
    assert len(karma.calls_of(ids[25])) == MAX_ATTEMPTS
    healthy = set(ids) - poison - {ids[25]}
    assert all(rows[pid]["delivery_state"] == "processed" for pid in healthy)
    assert all(rows[pid]["delivery_count"] == 1 for pid in healthy)
    calls = karma.keys()
    assert all(calls[pid] == 1 for pid in healthy) and not poison & set(calls)


def test_429_503_and_dropped_connections_are_ridden_out(bucket):
    """Behind a proxy answering every third request with 429, 503 (Retry-After: 1) or a
    dropped connection, the consumer backs off and still processes every packet once: its acks
    are retried and its leases (10 s) kept meanwhile."""
    ids = ingest(bucket, learners(60))
    with (
        karma_stub(latency=0.005) as karma,
        faulty_proxy(bucket.url, every=3) as proxy,
        consumers(
            1,
            proxy.url,
            karma.url,
            CONSUMER_CONCURRENCY="16",
            BATCH_SIZE="50",
            CONSUMER_VISIBILITY_TIMEOUT="10",
        ) as running,
    ):
        wait_settled(bucket, ids, 60, running)
        proxy.faults = False
        assert running[0].terminate() == 0
        log = running[0].output()
    assert set(proxy.injected) == {"429", "503", "drop"}, proxy.injected
    rows = bucket.rows(ids)
    assert {row["delivery_count"] for row in rows.values()} == {1}, log
    assert set(karma.keys().values()) == {1} and set(karma.keys()) == set(ids)
    assert "HTTP 429" in log and "HTTP 503" in log


def test_bucket_consumer_keeps_the_deployed_interface(bucket):
    """The deployed consumer's constructor, attributes and methods: poll_and_process answers
    its stats dict, mark_packet_processed its bool, stop_consumer ends start_consumer after
    flushing; karma_tracker_url falls back to the bucket's URL."""
    from prana_bucket_client import BucketConsumer

    class Consumer(BucketConsumer):
        def determine_karma_action(self, packet):
            return {"action": "completing_lessons"}

    assert Consumer(f"{bucket.url}/", None).karma_tracker_url == bucket.url
    ids = ingest(bucket, learners(13))
    with karma_stub() as karma:
        consumer = Consumer(bucket.url, karma.url, install_signal_handlers=False, wait=1)
        assert (consumer.bucket_url, consumer.poll_interval, consumer.batch_size) == (
            bucket.url,
            5,
            10,
        )
        assert consumer.running is False
        first = consumer.poll_and_process()
        assert first == {
            "processed": 10,
            "errors": 0,
            "total": 10,
            "queue_size": 3,
            "karma_actions": 10,
        }
        # The bucket need not deliver a batch's packets in the batch's order: acknowledge by
        # hand one that the first round left waiting.
        by_hand = next(pid for pid in reversed(ids) if pid not in karma.keys())
        assert consumer.mark_packet_processed(by_hand, True, [{"action": "x"}]) is True
        runner = threading.Thread(target=consumer.start_consumer, daemon=True)
        runner.start()
        wait_until(lambda: settled(bucket, ids), 20, "start_consumer did not drain")
        consumer.stop_consumer(timeout=15)
        runner.join(5)
        assert not runner.is_alive() and consumer.running is False
    assert set(karma.keys()) == set(ids) - {by_hand}
    assert consumer.stats["succeeded"] == 12


def test_the_command_names_its_environment():
    """``prana-bucket-consumer --help`` lists the deployed consumer's variables and the new."""
    answer = subprocess.run(
        [sys.executable, "-m", "prana_bucket_client", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert answer.returncode == 0
    for name in ("BUCKET_API_BASE_URL", "KARMA_TRACKER_API_BASE_URL", "POLL_INTERVAL_SECONDS"):
        assert name in answer.stdout
    assert "BATCH_SIZE" in answer.stdout and "CONSUMER_CONCURRENCY" in answer.stdout


@pytest.mark.parametrize(
    "header, expected",
    [("3", 3.0), ("0.5", 0.5), (None, None), ("soon", None), ("-4", 0.0)],
)
def test_retry_after_is_read_as_seconds(header, expected):
    """Retry-After in delta-seconds (or an HTTP date) becomes a pause; garbage is ignored."""
    from prana_bucket_client.transport import retry_after_seconds

    assert retry_after_seconds(header) == expected


def test_backoff_grows_with_jitter_and_honours_retry_after():
    """Full-jitter exponential pauses, capped, never below what Retry-After asked."""
    from prana_bucket_client import Backoff

    backoff = Backoff(base=0.1, cap=1.0)
    pauses = [backoff.delay() for _ in range(8)]
    assert all(0.05 <= p <= 1.0 for p in pauses) and max(pauses) > 0.5
    assert Backoff(base=0.1, cap=1.0).delay(retry_after=2.0) >= 2.0


def test_a_stop_releases_at_once_what_it_will_not_start(bucket):
    """With more leased than workers (max_in_flight 3, concurrency 1), a stop gives the two
    queued packets back at once (visibility 0) while the running one finishes and is acked."""
    from prana_bucket_client import Consumer

    ids = ingest(bucket, learners(3))
    gate = threading.Event()
    consumer = Consumer(
        bucket.url,
        lambda packet: gate.wait(20),
        concurrency=1,
        max_in_flight=3,
        batch_size=3,
        wait=1,
        install_signal_handlers=False,
    )
    runner = threading.Thread(target=consumer.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: consumer.counters().leased == 3, 15, "three packets never leased")
        consumer.stop()
        wait_until(lambda: consumer.counters().released == 2, 10, "queued packets kept")
        states = sorted(row["delivery_state"] for row in bucket.rows(ids).values())
        assert states == ["leased", "pending", "pending"]
    finally:
        gate.set()
    assert consumer.wait_stopped(15)
    runner.join(5)
    rows = bucket.rows(ids)
    assert sorted(row["delivery_state"] for row in rows.values()) == [
        "pending",
        "pending",
        "processed",
    ]
    assert consumer.counters().succeeded == 1


def test_the_package_says_one_version():
    """The installed metadata (client/pyproject.toml) and ``__version__`` agree."""
    import importlib.metadata

    import prana_bucket_client

    assert importlib.metadata.version("prana-bucket-client") == prana_bucket_client.__version__
