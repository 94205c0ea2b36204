"""A Karma Tracker consumer for the client's tests: the client's BucketConsumer with a stand-in
for Karma Tracker's business logic (every packet earns one action; a packet whose raw signals
say ``poison`` makes the logic raise)."""

from __future__ import annotations

from typing import Any

from prana_bucket_client import BucketConsumer


class KarmaTrackerConsumer(BucketConsumer):
    """Karma Tracker's subclass, as the client's README shows it."""

    def determine_karma_action(self, packet: dict[str, Any]) -> dict[str, Any] | None:
        if packet.get("raw_signals", {}).get("poison"):
            raise ValueError(f"cannot judge packet {packet['packet_id']}")
        return {"action": "completing_lessons", "intensity": 0.8, "note": "test"}
