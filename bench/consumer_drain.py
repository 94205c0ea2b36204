"""The Karma Tracker drain's consumer processes: the deployed consumer's pattern and the client.

The scenario that runs them is ``bench/scenarios/consumer.py``.

Both use Karma Tracker's default settings (``batch_size`` 10, ``poll_interval`` 5 s) against a
karma API stub answering in 10 ms, with a backlog waiting, in 1 and 4 processes:

- **the deployed pattern**, described by its behaviour (its code is Karma Tracker's): poll 10
  packets, for each call the karma API and acknowledge it on its own request, then sleep
  ``poll_interval``;
- **the client** (``client/``, ``prana_bucket_client.BucketConsumer`` with the same
  settings and its defaults beyond them: long polls, 16 packets at once, batched acks).

Each returns a ``bench.clients.Tally``: packets acknowledged, errors, seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from bench import clients

# Consumer processes import this module (spawn): it imports only what they need, not the
# harness or the scenario registry (PostgreSQL, the test servers).

API = "/api/v1/bucket/prana"
KARMA_LATENCY = 0.010
POLL_INTERVAL = 5.0
BATCH_SIZE = 10


def karma_action(packet: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's karma rule: every packet earns one action (one karma call each)."""
    return {"action": "completing_lessons", "intensity": 0.8, "note": "bench"}


def deployed_pattern(port: int, karma_port: int, token: str, seconds: float) -> clients.Tally:
    """The deployed consumer's loop: poll ``BATCH_SIZE``, karma call then one ack per packet
    (module-level ``requests`` calls, as it makes them), sleep ``POLL_INTERVAL``; cycles start
    until ``seconds`` have passed and each is counted whole."""
    bucket = f"http://127.0.0.1:{port}{API}"
    karma = f"http://127.0.0.1:{karma_port}/api/v1/karma/log-action/"
    headers = {"Authorization": f"Bearer {token}"}
    tally = clients.Tally()
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        answer = requests.get(
            f"{bucket}/packets/pending", params={"limit": BATCH_SIZE}, headers=headers, timeout=10
        )
        tally.timed("poll", t0, answer.status_code)
        packets = answer.json()["packets"] if answer.status_code == 200 else []
        for packet in packets:
            action = karma_action(packet)
            call = requests.post(karma, json={"user_id": packet["user_id"], **action}, timeout=10)
            t0 = time.perf_counter()
            ack = requests.post(
                f"{bucket}/packets/mark-processed",
                json={
                    "packet_id": packet["packet_id"],
                    "success": call.status_code == 200,
                    "karma_actions": [
                        {"action": action["action"], "packet_id": packet["packet_id"]}
                    ],
                },
                headers=headers,
                timeout=5,
            )
            tally.timed("ack", t0, ack.status_code)
            tally.packets += 1
        # The whole sleep counts: the rate is the loop's steady one, not a partial cycle's.
        time.sleep(POLL_INTERVAL)
    tally.elapsed = time.perf_counter() - started
    return tally


def client_drain(port: int, karma_port: int, token: str, seconds: float) -> clients.Tally:
    """The client's BucketConsumer with the same settings, stopped after ``seconds``."""
    from prana_bucket_client import BucketConsumer

    class BenchConsumer(BucketConsumer):
        def determine_karma_action(self, packet: dict[str, Any]) -> dict[str, Any]:
            return karma_action(packet)

    consumer = BenchConsumer(
        bucket_url=f"http://127.0.0.1:{port}",
        karma_tracker_url=f"http://127.0.0.1:{karma_port}",
        poll_interval=POLL_INTERVAL,
        batch_size=BATCH_SIZE,
        token=token,
        install_signal_handlers=False,
    )
    timer = threading.Timer(seconds, consumer.stop_consumer)
    started = time.perf_counter()
    cpu = time.process_time()
    timer.start()
    consumer.start_consumer()  # returns after the stop: handlers finished, acks flushed
    counters = consumer.consumer.counters()
    tally = clients.Tally()
    tally.elapsed = time.perf_counter() - started
    tally.cpu = time.process_time() - cpu
    tally.packets = counters.acknowledged
    tally.calls = counters.polls
    tally.errors = counters.failed + counters.crashed + counters.ack_refused + counters.unavailable
    return tally
