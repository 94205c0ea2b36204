"""The announcer sends Redis wake-ups off the request path, coalescing bursts."""

from __future__ import annotations

import threading
import time

from bucket.queue.announcer import Announcer


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_a_request_is_sent_from_another_thread():
    """The caller returns at once; the send happens on the announcer's own thread."""
    senders: list[str] = []
    announcer = Announcer(lambda: senders.append(threading.current_thread().name))
    announcer.request()
    assert wait_until(lambda: senders)
    assert senders[0] == "bucket-announcer"


def test_a_burst_of_requests_while_sending_becomes_one_more_send():
    """Requests made while a send is in flight are folded into a single following send."""
    release = threading.Event()
    sends: list[float] = []

    def slow_send() -> None:
        sends.append(time.monotonic())
        release.wait(5)

    announcer = Announcer(slow_send)
    announcer.request()
    assert wait_until(lambda: len(sends) == 1)
    for _ in range(100):
        announcer.request()
    release.set()
    assert wait_until(lambda: len(sends) == 2)
    time.sleep(0.1)
    assert len(sends) == 2


def test_every_request_is_followed_by_a_send():
    """No request is lost: after the last request there is always a send that started later."""
    sends: list[float] = []
    announcer = Announcer(lambda: sends.append(time.monotonic()))
    for _ in range(20):
        requested = time.monotonic()
        announcer.request()
        assert wait_until(lambda requested=requested: sends and sends[-1] >= requested)


def test_a_steady_stream_of_requests_is_announced_at_a_bounded_rate():
    """A request every millisecond for 0.3 s: no more than one send per minimum interval."""
    sends: list[float] = []
    announcer = Announcer(lambda: sends.append(time.monotonic()), min_interval=0.05)
    started = time.monotonic()
    while time.monotonic() - started < 0.3:
        last = time.monotonic()
        announcer.request()
        time.sleep(0.001)
    assert wait_until(lambda: sends and sends[-1] >= last)
    assert len(sends) <= 0.3 / 0.05 + 2, len(sends)
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert min(gaps) >= 0.045, gaps
