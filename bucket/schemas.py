"""Marshmallow schemas: request validation and response documentation at the HTTP edge."""

from __future__ import annotations

import math
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

from bucket.models import DeliveryState
from bucket.timeutil import TIMESTAMP_RULE, parse_client_timestamp

# The contract's states; BUCKET_COGNITIVE_STATES replaces them (config.py).
COGNITIVE_STATES = ("DEEP_FOCUS", "ON_TASK", "THINKING", "IDLE", "DISTRACTED", "AWAY", "OFF_TASK")
# Legacy EMS states, accepted in ``state`` and, as the original did, in ``cognitive_state``.
EMS_STATES = ("WORKING", "IDLE", "AWAY", "DISTRACTED", "FAKING")
SYSTEM_TYPES = ("gurukul", "ems")
ROLES = ("student", "employee")
MAX_ACK_BATCH = 500
WINDOW_SECONDS = 5.0
WINDOW_TOLERANCE = 0.1


class BaseSchema(Schema):
    """Unknown fields are tolerated everywhere: clients add transport fields we do not own."""

    class Meta:
        unknown = EXCLUDE


class StrictNumber(fields.Float):
    """A finite JSON number: strings, booleans, NaN and infinities are refused."""

    default_error_messages = {"invalid": "Not a valid number.", "special": "Not a finite number."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if not math.isfinite(value):
            raise self.make_error("special")
        return float(value)


class Text(fields.String):
    """A string without NUL characters: PostgreSQL text cannot hold them, so refuse them here."""

    default_error_messages = {"nul": "Must not contain NUL characters."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise self.make_error("nul")
        return text


class ClientTimestamp(fields.Field):
    """An ISO-8601 timestamp string, normalised to aware UTC."""

    default_error_messages = {"invalid": f"Not {TIMESTAMP_RULE}."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any):
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            return parse_client_timestamp(value)
        except (ValueError, OverflowError) as exc:  # year 1 or 9999 with an offset overflows UTC
            raise self.make_error("invalid") from exc

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any):
        return None if value is None else value.isoformat()


def identifier(required: bool = False) -> fields.String:
    """A 1–256 character identifier, nullable unless required."""
    return Text(
        required=required, allow_none=not required, validate=validate.Length(min=1, max=256)
    )


class PacketSchema(BaseSchema):
    """One PRANA packet as the browser bridge sends it (CONTRACT.md, "Packets")."""

    # Null counts as absent for the identity and state pairs; the cross-field check below
    # requires one of each pair (an EMS client may send ``user_id: null`` next to employee_id).
    user_id = Text(allow_none=True, validate=validate.Length(min=1, max=256))
    employee_id = Text(allow_none=True, validate=validate.Length(min=1, max=256))
    session_id = identifier()
    lesson_id = identifier()
    task_id = identifier()
    system_type = fields.String(allow_none=True, validate=validate.OneOf(SYSTEM_TYPES))
    role = fields.String(allow_none=True, validate=validate.OneOf(ROLES))
    timestamp = ClientTimestamp(required=True)
    cognitive_state = fields.String(allow_none=True)
    state = fields.String(allow_none=True, validate=validate.OneOf(EMS_STATES))
    active_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    idle_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    away_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    focus_score = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=100))
    integrity_score = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=1))
    raw_signals = fields.Dict(required=True)

    def __init__(self, cognitive_states: tuple[str, ...] = COGNITIVE_STATES, **kwargs: Any):
        super().__init__(**kwargs)
        self.cognitive_states = accepted_cognitive_states(cognitive_states)

    @validates("cognitive_state")
    def check_cognitive_state(self, value: str | None, **kwargs: Any) -> None:
        """One of the configured states, or a legacy EMS state."""
        if value is not None and value not in self.cognitive_states:
            raise ValidationError(f"Must be one of: {', '.join(sorted(self.cognitive_states))}.")

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def check_cross_field_rules(self, data: dict, original: Any, **kwargs: Any) -> None:
        """Identity, state and the 5-second window, each reported under its own field."""
        errors: dict[str, list[str]] = {}
        sent = original if isinstance(original, dict) else {}
        if sent.get("user_id") is None and sent.get("employee_id") is None:
            errors["user_id"] = ["Missing data for required field (or give employee_id)."]
        if sent.get("cognitive_state") is None and sent.get("state") is None:
            errors["cognitive_state"] = ["Missing data for required field (or give state)."]
        split = [data.get(name) for name in ("active_seconds", "idle_seconds", "away_seconds")]
        if all(isinstance(part, float) for part in split):
            total = sum(split)
            if abs(total - WINDOW_SECONDS) > WINDOW_TOLERANCE + 1e-9:
                errors["active_seconds"] = [
                    f"active_seconds + idle_seconds + away_seconds must be {WINDOW_SECONDS} "
                    f"(±{WINDOW_TOLERANCE}), got {round(total, 6)}."
                ]
        if errors:
            raise ValidationError(errors)


_IDENTIFIERS = ("user_id", "employee_id", "session_id", "lesson_id", "task_id")
_DURATIONS = ("active_seconds", "idle_seconds", "away_seconds")
_CHOICES = (
    ("system_type", frozenset(SYSTEM_TYPES)),
    ("role", frozenset(ROLES)),
    ("state", frozenset(EMS_STATES)),
)
_DEFAULT_STATES = frozenset(COGNITIVE_STATES) | frozenset(EMS_STATES)


def accepted_cognitive_states(configured: tuple[str, ...]) -> frozenset[str]:
    """What ``cognitive_state`` may hold: the configured states and the legacy EMS ones."""
    return frozenset(configured) | frozenset(EMS_STATES)


_SCORES = (("focus_score", 100.0), ("integrity_score", 1.0))


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def fast_load_packet(
    data: Any, cognitive_states: frozenset[str] = _DEFAULT_STATES
) -> dict[str, Any] | None:
    """``PacketSchema().load(data)`` for the packets that pass it, in a fraction of the time;
    None whenever the packet might not pass, and then ``PacketSchema`` judges it and names
    every problem. Validation took a tenth of a single ingest's CPU; nearly every packet is
    valid. ``tests/test_fast_validation.py`` holds the two to the same answers.
    """
    if type(data) is not dict:
        return None
    out: dict[str, Any] = {}
    for name in _IDENTIFIERS:
        if name in data:
            value = data[name]
            if value is not None and (
                type(value) is not str or not 1 <= len(value) <= 256 or "\x00" in value
            ):
                return None
            out[name] = value
    if out.get("user_id") is None and out.get("employee_id") is None:
        return None
    for name, allowed in (*_CHOICES, ("cognitive_state", cognitive_states)):
        if name in data:
            value = data[name]
            if value is not None and (type(value) is not str or value not in allowed):
                return None
            out[name] = value
    if out.get("cognitive_state") is None and out.get("state") is None:
        return None
    total = 0.0
    for name in _DURATIONS:
        value = data.get(name)
        if not _finite_number(value) or value < 0:
            return None
        out[name] = float(value)
        total += out[name]
    if abs(total - WINDOW_SECONDS) > WINDOW_TOLERANCE + 1e-9:
        return None
    for name, top in _SCORES:
        if name in data:
            value = data[name]
            if value is not None:
                if not _finite_number(value) or not 0 <= value <= top:
                    return None
                value = float(value)
            out[name] = value
    timestamp, signals = data.get("timestamp"), data.get("raw_signals")
    if type(timestamp) is not str or type(signals) is not dict:
        return None
    try:
        out["timestamp"] = parse_client_timestamp(timestamp)
    except (ValueError, OverflowError):
        return None
    out["raw_signals"] = dict(signals)
    return out


class PacketRules:
    """The packet rules in force for one application: its accepted cognitive states."""

    def __init__(self, cognitive_states: tuple[str, ...]) -> None:
        self.schema = PacketSchema(cognitive_states=tuple(cognitive_states))
        self.cognitive_states = self.schema.cognitive_states

    def load(self, data: Any) -> dict[str, Any]:
        """The validated packet; ``ValidationError`` naming each problem otherwise."""
        packet = fast_load_packet(data, self.cognitive_states)
        return packet if packet is not None else self.schema.load(data)


def packet_rules() -> PacketRules:
    """The current application's packet rules (built from BUCKET_COGNITIVE_STATES)."""
    from flask import current_app

    return current_app.extensions["bucket.packet_rules"]


class BatchEnvelopeSchema(BaseSchema):
    """The batching bridge's envelope; each packet is validated on its own."""

    packets = fields.List(fields.Raw(), required=True)
    # Transport fields: described, never a reason to refuse the packets they carry.
    batch_size = fields.Raw(load_default=None, metadata={"description": "Packets the bridge sent."})
    sent_at = fields.Raw(load_default=None, metadata={"description": "When the bridge sent it."})


class IngestResultSchema(BaseSchema):
    """The answer to one stored (or recognised) packet."""

    status = fields.String(required=True, metadata={"enum": ["ingested"]})
    packet_id = fields.String(required=True)
    received_at = fields.String(required=True)
    duplicate = fields.Boolean()


class BatchItemResultSchema(BaseSchema):
    """One packet's outcome inside a batch answer, in request order."""

    index = fields.Integer()
    status = fields.String(metadata={"enum": ["ingested", "duplicate", "rejected"]})
    packet_id = fields.String()
    errors = fields.Dict()
    quarantine_id = fields.Integer(
        metadata={"description": "A rejected packet's entry in the quarantine."}
    )


class BatchResultSchema(BaseSchema):
    """The answer to a batch envelope."""

    status = fields.String(required=True, metadata={"enum": ["ingested", "partial", "rejected"]})
    batch_id = fields.String(allow_none=True)
    accepted = fields.Integer(required=True)
    duplicates = fields.Integer(required=True)
    rejected = fields.Integer(required=True)
    results = fields.List(fields.Nested(BatchItemResultSchema), required=True)


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
    since = fields.AwareDateTime(
        default_timezone=None, metadata={"description": "Received at or after (ISO-8601)."}
    )
    until = fields.AwareDateTime(
        default_timezone=None, metadata={"description": "Received before (ISO-8601)."}
    )


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
    consumer_auth = fields.Boolean()


class LeaseChangeSchema(BaseSchema):
    """Change the visibility of a leased packet (SQS ChangeMessageVisibility)."""

    packet_id = Text(required=True, validate=validate.Length(min=1, max=64))
    receipt = Text(required=True, validate=validate.Length(min=1, max=64))
    visibility_timeout = fields.Integer(required=True, validate=validate.Range(min=0, max=43200))


# --- the quarantine of refused packets (services/quarantine.py) ----------------------------


class QuarantineFiltersSchema(BaseSchema):
    """Which quarantine entries are meant (all filters optional, combined with AND)."""

    user_id = Text(metadata={"description": "The user (or EMS employee) named."})
    origin = Text(metadata={"description": "The Origin the packet came from."})
    field = Text(data_key="field", metadata={"description": "Only entries refused for this field."})
    since = fields.AwareDateTime(
        default_timezone=None, metadata={"description": "Last seen at or after (ISO-8601)."}
    )
    until = fields.AwareDateTime(
        default_timezone=None, metadata={"description": "Last seen before (ISO-8601)."}
    )


class QuarantineQuerySchema(QuarantineFiltersSchema):
    """Which quarantine entries to list, one page at a time."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(metadata={"description": "From a previous page's Link header."})


class QuarantineEntrySchema(BaseSchema):
    """One refused packet, as received, with why it was refused."""

    id = fields.Integer()
    digest = fields.String(metadata={"description": "SHA-256 of the content."})
    body = fields.Raw(metadata={"description": "The packet's JSON as received."})
    errors = fields.Dict(metadata={"description": "Each offending field and what is wrong."})
    user_id = fields.String(allow_none=True)
    origin = fields.String(allow_none=True)
    source = fields.String(metadata={"enum": ["packet", "batch"]})
    idempotency_key = fields.String(allow_none=True)
    size_bytes = fields.Integer()
    seen_count = fields.Integer(metadata={"description": "Copies received (resends count)."})
    first_seen_at = fields.String()
    last_seen_at = fields.String()


ENTRY_IDS = validate.Range(min=1, max=2**63 - 1)


class QuarantineReplaySchema(QuarantineFiltersSchema):
    """What to replay: the entries matching the filters (every entry, without any) and, when
    given, named by ``ids``; in id order after ``after``, up to ``limit``. Replaying is safe
    to repeat: deduplication absorbs what was stored before."""

    ids = fields.List(fields.Integer(validate=ENTRY_IDS), validate=validate.Length(min=1, max=500))
    after = fields.Integer(
        validate=ENTRY_IDS, metadata={"description": "Continue after this entry (next_after)."}
    )
    limit = fields.Integer(load_default=500, validate=validate.Range(min=1, max=5000))


class QuarantineReplayItemSchema(BaseSchema):
    """What became of one replayed entry."""

    id = fields.Integer()
    status = fields.String(metadata={"enum": ["ingested", "duplicate", "rejected"]})
    packet_id = fields.String()
    errors = fields.Dict()


class QuarantineReplayResultSchema(BaseSchema):
    """What a replay did."""

    replayed = fields.Integer()
    ingested = fields.Integer()
    duplicates = fields.Integer()
    still_refused = fields.Integer()
    remaining = fields.Integer(
        metadata={"description": "Matching entries this replay did not reach."}
    )
    next_after = fields.Integer(
        allow_none=True, metadata={"description": "Send as ``after`` to continue; null when done."}
    )
    results = fields.List(fields.Nested(QuarantineReplayItemSchema))


# --- the audit log (services/audit) ---------------------------------------------------------


class SealSchema(BaseSchema):
    """One seal: the Merkle root over packets ``after_seq`` < seq <= ``last_seq``, chained."""

    seq = fields.Integer(metadata={"description": "The seal's number, from 1."})
    sealed_at = fields.String()
    after_seq = fields.Integer()
    last_seq = fields.Integer()
    packet_count = fields.Integer()
    root = fields.String(metadata={"description": "RFC 9162 Merkle tree hash, hex."})
    previous_hash = fields.String(metadata={"description": "The previous seal's hash."})
    hash = fields.String(metadata={"description": "SHA-256 of this seal's canonical header."})


class LatestHashSchema(BaseSchema):
    """The head of the audit log."""

    latest_hash = fields.String(allow_none=True, metadata={"description": "The head seal's hash."})
    seal = fields.Nested(SealSchema, allow_none=True)
    packets_sealed = fields.Integer()


class SealsQuerySchema(BaseSchema):
    """Which seals, by number."""

    first = fields.Integer(data_key="from", validate=validate.Range(min=1, max=2**62))
    last = fields.Integer(data_key="to", validate=validate.Range(min=1, max=2**62))


class ArtifactSchema(BaseSchema):
    """A stored packet, its provenance and its inclusion proof."""

    artifact_id = fields.String()
    data = fields.Dict(metadata={"description": "The packet as stored: every field hashed."})
    canonical = fields.String(metadata={"description": "The exact bytes its leaf hashes."})
    provenance = fields.Dict(
        metadata={
            "description": "current_hash (its leaf), previous_hash (the leaf before it, or the "
            "previous seal's hash), sealed, and when sealed: leaf_index, tree_size, "
            "inclusion_proof (RFC 9162 audit path) and the seal."
        }
    )


# --- operators' actions and the console's charts (api/operations.py) ------------------------


class TimeseriesQuerySchema(BaseSchema):
    window = fields.String(load_default="1h", validate=validate.OneOf(["1h", "24h"]))


class TimeseriesSchema(BaseSchema):
    """Packets ingested and processed per minute, and the mix of cognitive states."""

    window = fields.String()
    minute_seconds = fields.Integer()
    minutes = fields.List(fields.String(), metadata={"description": "Each minute's start."})
    ingested = fields.List(fields.Integer())
    processed = fields.List(fields.Integer())
    totals = fields.Dict(keys=fields.String(), values=fields.Integer())
    states = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(keys=fields.String(), values=fields.Integer()),
        metadata={"description": "Packets ingested in the window by system, then state."},
    )


class DeadQuerySchema(BaseSchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(metadata={"description": "From a previous page's Link header."})


class RequeueSchema(BaseSchema):
    """Which dead packets to serve again: those named, or one user's, or (neither) all."""

    packet_ids = fields.List(
        Text(validate=validate.Length(min=1, max=64)), validate=validate.Length(min=1, max=500)
    )
    user_id = Text(validate=validate.Length(min=1, max=256))


class ReplaySchema(BaseSchema):
    """One user's packets to serve again (processed, dead and retrying ones)."""

    user_id = Text(required=True, validate=validate.Length(min=1, max=256))
    since = fields.AwareDateTime(default_timezone=None)
    until = fields.AwareDateTime(default_timezone=None)


class MovedSchema(BaseSchema):
    """How many packets an action put back in the queue."""

    requeued = fields.Integer()
