"""Clock, timestamp and identifier helpers shared by the whole service."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def epoch_now() -> float:
    """Return the current time in epoch seconds (the queue clock)."""
    return time.time()


def to_epoch(moment: datetime) -> float:
    """Convert an aware datetime to epoch seconds."""
    return moment.timestamp()


def from_epoch(seconds: float | None) -> datetime | None:
    """Convert epoch seconds to an aware UTC datetime (None stays None)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc)


def parse_client_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 client timestamp: ``Z`` or an offset, none meaning UTC."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def isoformat(moment: datetime | None) -> str | None:
    """Render an aware datetime as ISO-8601 with its offset (None stays None)."""
    return None if moment is None else moment.isoformat()


def new_packet_id() -> str:
    """Return a time-ordered UUID (version 7) so new rows land at the end of the key index."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
