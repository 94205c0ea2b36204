"""The karma API stubs are instruments: a 10 ms stub must answer in about 10 ms.

Both the tests' stub (``tests/karma_stub.py``, a thread) and the benchmark's
(``bench/karma_server.py``, a process of its own) are called as the consumer client calls them,
over one pooled ``requests`` session; a stub that writes its headers and body apart with Nagle's
algorithm on answered in 50 ms (the client's delayed ACK), which capped the drain it measured.
"""

from __future__ import annotations

import statistics
import time

import requests

from bench.karma_server import karma_server
from tests.karma_stub import karma_stub

LOG_ACTION = "/api/v1/karma/log-action/"


def call_times(url: str, calls: int = 8) -> list[float]:
    session = requests.Session()
    times = []
    for n in range(calls):
        started = time.perf_counter()
        answer = session.post(
            url + LOG_ACTION,
            json={"user_id": "stu_1", "action": "completing_lessons", "intensity": 0.8},
            headers={"Idempotency-Key": f"key-{n}"},
            timeout=10,
        )
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200
        assert answer.json() == {"user_id": "stu_1", "intensity": 0.8}
    session.close()
    return times


def test_tests_stub_answers_in_its_latency():
    with karma_stub(latency=0.010) as stub:
        times = call_times(stub.url)
        assert stub.keys() == {f"key-{n}": 1 for n in range(8)}
    assert statistics.median(times) < 0.030, times


def test_bench_stub_answers_in_its_latency_and_counts_keys():
    with karma_server(0.010) as stub:
        times = call_times(stub.url)
        assert stub.keys() == {f"key-{n}": 1 for n in range(8)}
    assert statistics.median(times) < 0.030, times
