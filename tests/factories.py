"""Valid packets to start from; tests override the fields they care about."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

from bucket.services.audit.content import Leaves

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
_sequence = itertools.count()
# Each packet is 5 s after the one before and the suite makes hundreds of thousands, so the first
# lies a year back: the last must still be in the past (BUCKET_MAX_CLOCK_SKEW refuses the future).
_base = datetime(2025, 11, 28, 10, 0, 0, tzinfo=UTC)


def fixture(name: str) -> dict:
    """A packet from ``shared/fixtures`` (falls back to the copy in ``tests/fixtures``)."""
    path = FIXTURES / name
    if not path.exists():
        path = Path(__file__).resolve().parent / "fixtures" / name
    return json.loads(path.read_text())


def make_packet(**overrides) -> dict:
    """A valid gurukul packet with a unique timestamp (so it is not a duplicate)."""
    n = next(_sequence)
    packet = {
        "user_id": "stu_test",
        "session_id": "sess_test",
        "lesson_id": "lesson_1",
        "system_type": "gurukul",
        "role": "student",
        "timestamp": (_base + timedelta(seconds=5 * n)).isoformat().replace("+00:00", "Z"),
        "cognitive_state": "ON_TASK",
        "active_seconds": 4.0,
        "idle_seconds": 1.0,
        "away_seconds": 0.0,
        "focus_score": 70,
        "raw_signals": {"tab_visible": True, "n": n},
        "queued_at": "2026-11-28T10:00:00.001Z",
        "retry_count": 0,
    }
    packet.update(overrides)
    return packet


def another_day(received_at):
    """Where a forged copy of a row reusing its seq is received: on PostgreSQL another day,
    since a day's own unique index on seq refuses a repeat within it (migration 0017); on
    SQLite (one table, the column read back as text) the same moment."""
    return received_at - timedelta(days=1) if isinstance(received_at, datetime) else received_at


@contextlib.contextmanager
def packed_as_before_0019():
    """Seals made meanwhile keep their leaves as the code before migration 0019 packed them
    (every seq, the ids as text one a line): for tests that seal on an older layout."""

    def packed(self, after_seq: int, uuids: bytes | None = None) -> dict:
        return {
            "leaf_seqs": struct.pack(f">{len(self.seqs)}q", *self.seqs),
            "leaf_ids": "\n".join(self.ids),
            "leaf_hashes": b"".join(self.hashes),
        }

    with mock.patch.object(Leaves, "packed", packed):
        yield
