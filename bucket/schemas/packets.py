"""Packets as the PRANA bridge sends them, and the answers to ingest."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import orjson
from marshmallow import (
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

from bucket.jsonutil import deeper_than
from bucket.schemas.base import BaseSchema, ClientTimestamp, StrictNumber, Text, identifier
from bucket.timeutil import TIMESTAMP_PATTERN, parse_client_timestamp, utc_now

# The contract's states; BUCKET_COGNITIVE_STATES replaces them (config.py).
COGNITIVE_STATES = ("DEEP_FOCUS", "ON_TASK", "THINKING", "IDLE", "DISTRACTED", "AWAY", "OFF_TASK")
# Legacy EMS states, accepted in ``state`` and, as the original did, in ``cognitive_state``.
EMS_STATES = ("WORKING", "IDLE", "AWAY", "DISTRACTED", "FAKING")
SYSTEM_TYPES = ("gurukul", "ems")
ROLES = ("student", "employee")
WINDOW_SECONDS = 5.0
WINDOW_TOLERANCE = 0.1
# One packet's raw_signals as JSON, at most (BUCKET_RAW_SIGNALS_MAX_BYTES replaces it).
RAW_SIGNALS_MAX_BYTES = 16384
MAX_IDEMPOTENCY_KEY = 255
DEFAULT_MAX_DEPTH = 32  # BUCKET_MAX_JSON_DEPTH


class PacketSchema(BaseSchema):
    """One PRANA packet as the browser bridge sends it (CONTRACT.md, "Packets")."""

    class Meta(BaseSchema.Meta):
        description = (
            "One 5-second window. user_id (or employee_id) and cognitive_state (or state) are "
            "required; active_seconds + idle_seconds + away_seconds must be 5.0 (±0.1)."
        )

    # Null counts as absent for the identity and state pairs; the cross-field check below
    # requires one of each pair (an EMS client may send ``user_id: null`` next to employee_id).
    user_id = Text(allow_none=True, validate=validate.Length(min=1, max=256))
    employee_id = Text(allow_none=True, validate=validate.Length(min=1, max=256))
    session_id = identifier()
    lesson_id = identifier()
    task_id = identifier()
    system_type = fields.String(allow_none=True, validate=validate.OneOf(SYSTEM_TYPES))
    role = fields.String(allow_none=True, validate=validate.OneOf(ROLES))
    timestamp = ClientTimestamp(
        required=True,
        metadata={
            "type": "string",
            "format": "date-time",
            "pattern": TIMESTAMP_PATTERN,
            "description": "ISO-8601 client time with a year from 1900 to 2999; Z or an offset "
            "(none means UTC). A space may stand for the T.",
        },
    )
    cognitive_state = fields.String(
        allow_none=True,
        metadata={"description": "BUCKET_COGNITIVE_STATES, or a legacy EMS state."},
    )
    state = fields.String(allow_none=True, validate=validate.OneOf(EMS_STATES))
    active_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    idle_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    away_seconds = StrictNumber(required=True, validate=validate.Range(min=0))
    focus_score = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=100))
    integrity_score = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=1))
    raw_signals = fields.Dict(required=True)

    def __init__(
        self,
        cognitive_states: tuple[str, ...] = COGNITIVE_STATES,
        raw_signals_max_bytes: int = RAW_SIGNALS_MAX_BYTES,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.cognitive_states = accepted_cognitive_states(cognitive_states)
        self.raw_signals_max_bytes = raw_signals_max_bytes

    @validates("raw_signals")
    def check_raw_signals_size(self, value: dict, **kwargs: Any) -> None:
        """No bigger than the configured bytes as JSON: refused whole, never trimmed."""
        size = json_size(value)
        if size is not None and size > self.raw_signals_max_bytes:
            raise ValidationError(
                f"Larger than {self.raw_signals_max_bytes} bytes as JSON ({size}); "
                "BUCKET_RAW_SIGNALS_MAX_BYTES bounds it."
            )

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


def json_size(value: Any) -> int | None:
    """Bytes of ``value`` as compact JSON; None when it cannot be encoded (other rules judge)."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return None


def accepted_cognitive_states(configured: tuple[str, ...]) -> frozenset[str]:
    """What ``cognitive_state`` may hold: the configured states and the legacy EMS ones."""
    return frozenset(configured) | frozenset(EMS_STATES)


_SCORES = (("focus_score", 100.0), ("integrity_score", 1.0))


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def fast_load_packet(
    data: Any,
    cognitive_states: frozenset[str] = _DEFAULT_STATES,
    raw_signals_max_bytes: int = RAW_SIGNALS_MAX_BYTES,
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
    size = json_size(signals)
    if size is None or size > raw_signals_max_bytes:
        return None
    try:
        out["timestamp"] = parse_client_timestamp(timestamp)
    except (ValueError, OverflowError):
        return None
    out["raw_signals"] = dict(signals)
    return out


class PacketRules:
    """The packet rules in force for one application: its accepted cognitive states, the size
    of raw_signals and how deep a field may nest, when restricted the keys raw_signals may
    carry (BUCKET_RAW_SIGNALS_KEYS), and how far ahead a client clock may be
    (BUCKET_MAX_CLOCK_SKEW)."""

    def __init__(
        self,
        cognitive_states: tuple[str, ...],
        raw_signals_max_bytes: int = RAW_SIGNALS_MAX_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_clock_skew: float | None = None,
        raw_signals_keys: tuple[str, ...] = (),
    ) -> None:
        self.schema = PacketSchema(
            cognitive_states=tuple(cognitive_states), raw_signals_max_bytes=raw_signals_max_bytes
        )
        self.cognitive_states = self.schema.cognitive_states
        self.raw_signals_max_bytes = raw_signals_max_bytes
        self.max_depth = max_depth
        self.max_clock_skew = None if max_clock_skew is None else timedelta(seconds=max_clock_skew)
        self.raw_signals_keys = frozenset(raw_signals_keys) or None

    def load(self, data: Any) -> dict[str, Any]:
        """The validated packet; ``ValidationError`` naming each problem otherwise."""
        check_depth(data, self.max_depth)
        packet = fast_load_packet(data, self.cognitive_states, self.raw_signals_max_bytes)
        if packet is None:
            packet = self.schema.load(data)
        if self.max_clock_skew is not None or self.raw_signals_keys is not None:
            self.check_content(packet)
        return packet

    def check_content(self, packet: dict[str, Any]) -> None:
        """A timestamp too far in the future (no clock is that wrong, and it would sort ahead
        of every real packet), or signals outside the allowed keys (a page leaking a token or
        a file name): refused for content, never silently trimmed."""
        errors: dict[str, list[str]] = {}
        if self.max_clock_skew is not None:
            ahead = packet["timestamp"] - utc_now()
            if ahead > self.max_clock_skew:
                errors["timestamp"] = [
                    f"Lies {int(ahead.total_seconds())} s in the future; at most "
                    f"{int(self.max_clock_skew.total_seconds())} s are accepted "
                    "(BUCKET_MAX_CLOCK_SKEW)."
                ]
        if self.raw_signals_keys is not None:
            extra = sorted(set(packet["raw_signals"]) - self.raw_signals_keys)
            if extra:
                errors["raw_signals"] = [
                    f"Keys not allowed (BUCKET_RAW_SIGNALS_KEYS): {', '.join(extra)}."
                ]
        if errors:
            raise ValidationError(errors)


def check_depth(data: Any, max_depth: int) -> None:
    """Refuse a packet whose ``raw_signals`` nests deeper than ``max_depth`` (the object itself
    is level 1): the encoders that store and serve packets stop at 254 levels, and every layer
    honours this smaller limit instead (README, "Hostile transport"). The other known fields
    hold scalars; unknown fields are tolerated and never stored, so their depth is no matter
    (the quarantine keeps a refused packet however deep it nests)."""
    if type(data) is not dict:
        return
    signals = data.get("raw_signals")
    if isinstance(signals, dict | list) and deeper_than(signals, max_depth):
        message = f"Nests deeper than {max_depth} levels (BUCKET_MAX_JSON_DEPTH)."
        raise ValidationError({"raw_signals": [message]})


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


class IngestHeadersSchema(BaseSchema):
    """The headers the bridge may send with a packet or a batch (CONTRACT.md)."""

    # No validator: an over-long key is the view's 400 naming the header (the contract's answer),
    # not the 422 a failed header argument would give; maxLength documents the same limit.
    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        metadata={
            "maxLength": MAX_IDEMPOTENCY_KEY,
            "description": "A single packet's retry key: a repeat gets the original answer.",
        },
    )
    batch_id = fields.String(
        data_key="X-PRANA-BATCH-ID",
        metadata={"description": "The bridge's batch id, echoed as batch_id."},
    )
    client_timestamp = fields.String(
        data_key="X-CLIENT-TIMESTAMP",
        metadata={"description": "When the bridge sent the request; informational, not stored."},
    )
    authorization = fields.String(
        data_key="Authorization",
        metadata={
            "description": "Bearer <JWT> of the signed-in user, checked and bound to each packet "
            'per BUCKET_INGEST_AUTH (README, "Authenticated ingest").'
        },
    )


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
