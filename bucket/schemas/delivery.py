"""Karma Tracker's side: polls, acknowledgements, leases, user listings and status."""

from __future__ import annotations

from typing import Any

from marshmallow import (
    fields,
    validate,
)

from bucket.models import DeliveryState
from bucket.schemas.base import BaseSchema, Moment, Text

MAX_ACK_BATCH = 500


class PendingQuerySchema(BaseSchema):
    """Query string of ``pending``."""

    limit = fields.Integer(load_default=10, validate=validate.Range(min=1, max=500))
    visibility_timeout = fields.Integer(validate=validate.Range(min=1, max=43200))
    wait = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=20))


class PacketOutSchema(BaseSchema):
    """A stored packet as consumers see it."""

    packet_id = fields.String()
    user_id = fields.String()
    employee_id = fields.String(allow_none=True)
    session_id = fields.String(allow_none=True)
    lesson_id = fields.String(allow_none=True)
    task_id = fields.String(allow_none=True)
    system_type = fields.String(allow_none=True)
    role = fields.String(allow_none=True)
    cognitive_state = fields.String(allow_none=True)
    state = fields.String(allow_none=True)
    focus_score = fields.Float(allow_none=True)
    integrity_score = fields.Float(allow_none=True)
    active_seconds = fields.Float()
    idle_seconds = fields.Float()
    away_seconds = fields.Float()
    raw_signals = fields.Dict()
    client_timestamp = fields.String()
    received_at = fields.String()
    delivery_state = fields.String(metadata={"enum": list(DeliveryState.ALL)})
    delivery_count = fields.Integer()
    authenticated = fields.Boolean(
        metadata={"description": "Sent with a verified bearer token of this packet's user."}
    )
    auth_subject = fields.String(
        allow_none=True, metadata={"description": "The valid token's subject, if any."}
    )
    auth_outcome = fields.String(
        allow_none=True,
        metadata={
            "enum": ["verified", "missing", "invalid", "mismatch", None],
            "description": "How ingest judged its token; null when it did not check tokens.",
        },
    )
    stale = fields.Boolean(
        metadata={"description": "Its client timestamp lay over BUCKET_STALE_AFTER before arrival."}
    )


class PendingPacketSchema(PacketOutSchema):
    """A leased packet: the receipt identifies this delivery in ``mark-processed``."""

    receipt = fields.String()
    lease_expires_at = fields.String()
    suspect = fields.Boolean(
        metadata={"description": "A previous lease of this packet expired unacknowledged."}
    )


class PendingResponseSchema(BaseSchema):
    """The answer to ``pending``."""

    packets = fields.List(fields.Nested(PendingPacketSchema))
    count = fields.Integer()
    queue_size = fields.Integer(
        metadata={"description": "Packets a poll could take right now, beyond these."}
    )
    queue_size_exact = fields.Boolean(
        metadata={
            "description": "False when more than 10,000 packets are leased or retrying: "
            "queue_size then counts those beyond 10,000 as ready (README, Status figures)."
        }
    )


class AckSchema(BaseSchema):
    """One consumer result for one packet."""

    packet_id = Text(required=True, validate=validate.Length(min=1, max=64))
    success = fields.Boolean(required=True)
    karma_actions = fields.List(fields.Dict(), allow_none=True, load_default=None)
    error_message = Text(allow_none=True, load_default=None)
    receipt = Text(allow_none=True, load_default=None)


def _plain_text(value: Any) -> bool:
    return type(value) is str and "\x00" not in value


def fast_load_ack(data: Any) -> dict[str, Any] | None:
    """``AckSchema().load(data)`` for results that pass it, or None (then AckSchema judges);
    like ``fast_load_packet``, and held to the same answers by tests/test_fast_validation.py.
    Loading a batch of 100 results through marshmallow took 2 ms."""
    if type(data) is not dict:
        return None
    packet_id, success = data.get("packet_id"), data.get("success")
    if not _plain_text(packet_id) or not 1 <= len(packet_id) <= 64 or type(success) is not bool:
        return None
    out: dict[str, Any] = {"packet_id": packet_id, "success": success}
    for name in ("error_message", "receipt"):
        value = data.get(name)
        if value is not None and not _plain_text(value):
            return None
        out[name] = value
    actions = data.get("karma_actions")
    if actions is not None:
        if type(actions) is not list or any(type(action) is not dict for action in actions):
            return None
        actions = [dict(action) for action in actions]
    out["karma_actions"] = actions
    return out


def fast_load_acks(data: Any) -> list[dict[str, Any]] | None:
    """``AckBatchSchema().load(data)["results"]`` when every result passes, or None."""
    results = data.get("results") if type(data) is dict else None
    if type(results) is not list or not 1 <= len(results) <= MAX_ACK_BATCH:
        return None
    loaded = [fast_load_ack(item) for item in results]
    return None if None in loaded else loaded


class AckBatchSchema(BaseSchema):
    """Many results at once."""

    results = fields.List(
        fields.Nested(AckSchema), required=True, validate=validate.Length(min=1, max=MAX_ACK_BATCH)
    )


class AckResultSchema(BaseSchema):
    """What happened to one acknowledged packet."""

    packet_id = fields.String()
    # Every AckOutcome status: acks (incl. refusals inside a 207 batch) and lease changes.
    status = fields.String(
        metadata={
            "enum": [
                "processed",
                "retry_scheduled",
                "dead",
                "already_processed",
                "not_found",
                "stale_receipt",
                "released",
                "extended",
                "not_leased",
            ]
        }
    )
    delivery_count = fields.Integer()
    next_attempt_at = fields.String(allow_none=True)
    code = fields.Integer()
    message = fields.String()


class AcknowledgementSchema(BaseSchema):
    """A successful single acknowledgement, in the original bucket's shape."""

    status = fields.String(
        required=True,
        metadata={"enum": ["ok"], "description": 'Always "ok", as the original answered.'},
    )
    message = fields.String(required=True, metadata={"example": "Packet marked as processed"})
    packet_id = fields.String(required=True)
    outcome = fields.String(
        required=True,
        metadata={
            "enum": ["processed", "already_processed", "retry_scheduled", "dead"],
            "description": "What this service recorded.",
        },
    )
    code = fields.Integer()
    delivery_count = fields.Integer()
    next_attempt_at = fields.String(allow_none=True)


class AckBatchResultSchema(BaseSchema):
    """The answer to a batch acknowledgement."""

    results = fields.List(fields.Nested(AckResultSchema))


class UserQuerySchema(BaseSchema):
    """Query string of the user listing."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    processed_only = fields.Boolean(load_default=False)
    status = fields.String(validate=validate.OneOf(DeliveryState.ALL))
    cursor = fields.String()
    since = Moment(metadata={"description": "Received at or after (ISO-8601)."})
    until = Moment(metadata={"description": "Received before (ISO-8601)."})


class UserPacketSchema(PacketOutSchema):
    """A packet in the user listing, with its outcome."""

    processed_at = fields.String(allow_none=True)
    processed_by_karma = fields.Boolean()
    karma_actions = fields.Raw(allow_none=True)
    last_error = fields.String(allow_none=True)
    dead_at = fields.String(allow_none=True)


class StatusSchema(BaseSchema):
    """Queue and storage figures."""

    queue_size = fields.Integer()
    queue_size_exact = fields.Boolean()
    redis_connected = fields.Boolean()
    queue_backend = fields.String()
    total_packets = fields.Integer()
    processed_packets = fields.Integer()
    pending_packets = fields.Integer()
    leased_packets = fields.Integer()
    retrying_packets = fields.Integer()
    dead_packets = fields.Integer()
    oldest_pending_age_seconds = fields.Float(allow_none=True)
    oldest_pending_age_exact = fields.Boolean()
    quarantined_packets = fields.Integer(metadata={"description": "Refused packets kept."})
    quarantine_bytes = fields.Integer(metadata={"description": "Their bodies' size."})
    quarantine_evicted = fields.Integer(
        metadata={"description": "Entries dropped so far to stay within the bounds."}
    )
    quarantine_expired = fields.Integer(
        metadata={"description": "Entries dropped so far after the retention period."}
    )
    default_partition_deliveries = fields.Integer(
        allow_none=True,
        metadata={
            "description": "PostgreSQL: processed deliveries in the default partition of the "
            "processed deliveries, which no day partition covered when they finished (0 in "
            "normal operation; the workers move them into their day's partition). Null on "
            "SQLite."
        },
    )
    default_partition_keys = fields.Integer(
        allow_none=True,
        metadata={
            "description": "PostgreSQL: packet keys in the default partition of packet_keys, "
            "whose client day has no partition: a day not created yet (the workers move them "
            "into it), or one already dropped by retention (a packet resent after the "
            "retention period; retention removes them once their packets are gone). Null on "
            "SQLite."
        },
    )
    default_partition_packets = fields.Integer(
        allow_none=True,
        metadata={
            "description": "PostgreSQL: packets in the default partition of the packets table, "
            "which no day partition covered when they arrived (0 in normal operation; the "
            "workers move them into their day's partition). Null on SQLite."
        },
    )
    partition_days_ahead = fields.Integer(
        allow_none=True,
        metadata={
            "description": "PostgreSQL: days after today whose day partition exists already "
            "(-1: not even today's). Null on SQLite."
        },
    )
    consumer_auth = fields.Boolean()
    ingest_auth = fields.String(
        metadata={"enum": ["off", "observe", "require"], "description": "BUCKET_INGEST_AUTH."}
    )
    auth_refused = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={
            "description": "Packets refused by authenticated ingest over the last 24 hours, "
            "by reason (missing, invalid, mismatch); never quarantined."
        },
    )


class LeaseChangeSchema(BaseSchema):
    """Change the visibility of a leased packet (SQS ChangeMessageVisibility)."""

    packet_id = Text(required=True, validate=validate.Length(min=1, max=64))
    receipt = Text(required=True, validate=validate.Length(min=1, max=64))
    visibility_timeout = fields.Integer(required=True, validate=validate.Range(min=0, max=43200))
