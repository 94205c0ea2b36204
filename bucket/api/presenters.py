"""Rows to response dicts, in the shapes the schemas in ``bucket.schemas`` document.

Datetimes stay datetimes: the JSON provider writes them (ISO-8601, naive meaning UTC).
Hand-written rather than ``Schema.dump()``: a poll can return 500 packets and dumping through
marshmallow cost several times more. ``tests/test_openapi.py`` checks real answers against the
documented schemas, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bucket.models import DeliveryState
from bucket.timeutil import from_epoch

Row = Mapping[str, Any]


def packet_out(row: Row) -> dict[str, Any]:
    """The packet fields every consumer sees; ``state`` stands in for ``cognitive_state``."""
    return {
        "packet_id": row["packet_id"],
        "user_id": row["user_id"],
        "employee_id": row["employee_id"],
        "session_id": row["session_id"],
        "lesson_id": row["lesson_id"],
        "task_id": row["task_id"],
        "system_type": row["system_type"],
        "role": row["role"],
        "cognitive_state": row["cognitive_state"] or row["state"],
        "state": row["state"],
        "focus_score": row["focus_score"],
        "integrity_score": row["integrity_score"],
        "active_seconds": row["active_seconds"],
        "idle_seconds": row["idle_seconds"],
        "away_seconds": row["away_seconds"],
        "raw_signals": row["raw_signals"],
        "client_timestamp": row["client_timestamp"],
        "received_at": row["received_at"],
        "delivery_state": row["delivery_state"],
        "delivery_count": row["delivery_count"],
        # Who sent it (README, "Authenticated ingest"): true only for a verified token of
        # this packet's user; auth_outcome is null when ingest did not check tokens.
        "authenticated": row["auth_outcome"] == "verified",
        "auth_subject": row["auth_subject"],
        "auth_outcome": row["auth_outcome"],
        "stale": bool(row["stale"]),
    }


def pending_packet_out(row: Row, receipt: str | None, suspect: bool) -> dict[str, Any]:
    """A leased packet with its receipt and lease deadline."""
    body = packet_out(row)
    body["receipt"] = receipt
    body["lease_expires_at"] = from_epoch(row["visible_at"])
    body["suspect"] = suspect
    return body


def user_packet_out(row: Row) -> dict[str, Any]:
    """A packet in the user listing, with its outcome and delivery history."""
    body = packet_out(row)
    body["processed_at"] = processed_time(row)
    body["processed_by_karma"] = bool(row["processed_by_karma"])
    body["karma_actions"] = row["karma_actions"]
    body["last_error"] = row["last_error"]
    body["dead_at"] = row["dead_at"]
    body["last_delivered_at"] = row["last_delivered_at"]
    return body


def processed_time(row: Row) -> datetime | None:
    """When the packet was processed. PostgreSQL keeps no ``processed_at`` in a processed row
    written since migration 0021: the acknowledgement set ``visible_at`` to that instant,
    which converts back to the very datetime it stored before."""
    if row["processed_at"] is not None or row["delivery_state"] != DeliveryState.PROCESSED:
        return row["processed_at"]
    return from_epoch(row["visible_at"])


def quarantine_entry_out(row: Row) -> dict[str, Any]:
    """A quarantine entry: the refused packet as received and why it was refused."""
    return {
        name: row[name]
        for name in (
            "id",
            "digest",
            "body",
            "errors",
            "user_id",
            "origin",
            "source",
            "idempotency_key",
            "size_bytes",
            "seen_count",
            "first_seen_at",
            "last_seen_at",
            "auth_outcome",
            "auth_subject",
        )
    }
