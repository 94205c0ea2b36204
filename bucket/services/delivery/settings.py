"""The delivery knobs, and the one definition of a packet a poll could take now."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import and_

from bucket.models import Delivery, DeliveryState, Packet
from bucket.services.codes import CODE_COLUMNS, field_name

T = Packet.__table__
D = Delivery.__table__
# What a consumer sees of a packet: its content, then its delivery columns, in the order the
# hand-written statements return them. raw_signals stands for the compact form too (migration
# 0020, services/signals): its key set and values are not shown themselves, nor the codes of
# the strings stored coded (migration 0022, services/codes), which their text columns stand for
# (under the fields' names).
HIDDEN = ("dedup_key", "idempotency_key", "seq", "signal_keys", "signal_values", *CODE_COLUMNS)
CONTENT_COLUMNS = [c for c in T.c if c.name not in HIDDEN]
DELIVERY_COLUMNS = [c for c in D.c if c.name not in ("packet_id", "received_at")]
PACKET_COLUMNS = CONTENT_COLUMNS + DELIVERY_COLUMNS
PACKET_COLUMN_NAMES = [field_name(c.name) for c in PACKET_COLUMNS]
DELIVERY_COLUMN_NAMES = [c.name for c in DELIVERY_COLUMNS]
EXHAUSTED_LEASE_ERROR = "lease expired without acknowledgement on the last allowed delivery"
RELEASED_LAST_ERROR = "lease released by its consumer on the last allowed delivery"


@dataclass
class DeliverySettings:
    """The delivery knobs read from config."""

    visibility_timeout: int
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    long_poll_interval: float

    @classmethod
    def from_app(cls) -> DeliverySettings:
        return cls.from_config(current_app.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeliverySettings:
        return cls(
            visibility_timeout=config["BUCKET_VISIBILITY_TIMEOUT"],
            max_attempts=config["BUCKET_MAX_ATTEMPTS"],
            retry_backoff=config["BUCKET_RETRY_BACKOFF"],
            retry_backoff_max=config["BUCKET_RETRY_BACKOFF_MAX"],
            long_poll_interval=config["BUCKET_LONG_POLL_INTERVAL"],
        )

    def backoff_for(self, attempt: int) -> float:
        """Base delay after the ``attempt``-th failed delivery, before jitter."""
        return min(self.retry_backoff_max, self.retry_backoff * 2 ** (attempt - 1))


def visible(state: str, now: float):
    """Rows of ``state`` whose clock has come (a pending packet's turn, a lease's expiry)."""
    return and_(D.c.delivery_state == state, D.c.visible_at <= now)


def ready_condition(now: float, max_attempts: int):
    """ "A poll could take it now": visible, unfinished, and not out of attempts."""
    return and_(
        D.c.delivery_state.in_(DeliveryState.UNFINISHED),
        D.c.visible_at <= now,
        D.c.delivery_count < max_attempts,
    )
