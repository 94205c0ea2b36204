"""Clock, timestamp and identifier helpers shared by the whole service."""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import UTC, datetime


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def epoch_now() -> float:
    """Return the current time in epoch seconds (the queue clock)."""
    return time.time()


def from_epoch(seconds: float | None) -> datetime | None:
    """Convert epoch seconds to an aware UTC datetime (None stays None)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC)


# The one rule for a client timestamp, enforced here and published as the OpenAPI ``pattern``:
# an ISO-8601 date and time (``T`` or a space between them) whose year is 1900–2999. Every such
# instant converts to UTC (year 0001 or 9999 with an offset would not), and no browser clock,
# however skewed, reports a time outside it.
TIMESTAMP_PATTERN = r"^(19|2[0-9])[0-9]{2}-[0-9]{2}-[0-9]{2}[T ]"
TIMESTAMP_RULE = "an ISO-8601 date and time with a year from 1900 to 2999"
_timestamp_shape = re.compile(TIMESTAMP_PATTERN)


def parse_client_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 client timestamp: ``Z`` or an offset, none meaning UTC.

    Raises ``ValueError`` for anything outside ``TIMESTAMP_PATTERN`` or not a real moment.
    """
    text = text.strip()
    if not _timestamp_shape.match(text):
        raise ValueError(f"not {TIMESTAMP_RULE}")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class _PacketIdClock:
    """Monotonic UUIDv7 parts: within one millisecond a 12-bit counter keeps ids in issue order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = 0
        self._counter = 0

    def next(self) -> tuple[int, int]:
        with self._lock:
            millis = time.time_ns() // 1_000_000
            if millis <= self._millis:
                millis = self._millis
                self._counter += 1
                if self._counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                    millis += 1
                    self._counter = 0
            else:
                self._counter = 0
            self._millis = millis
            return millis, self._counter


_packet_id_clock = _PacketIdClock()


def new_packet_id() -> str:
    """Return a time-ordered UUID (version 7): new rows land at the end of the key index, and
    packets of one batch keep their order (RFC 9562, method 1: a counter in ``rand_a``)."""
    millis, counter = _packet_id_clock.next()
    rand = int.from_bytes(os.urandom(8), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    # str(uuid.UUID(int=value)), without the object (its checks cost twice the rest).
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
