"""The browser bridge's endpoint: one packet or a batch envelope, JSON or sendBeacon text."""

from __future__ import annotations

from typing import NoReturn

from flask import current_app, jsonify, request
from flask_smorest import Blueprint, abort
from marshmallow import ValidationError

from bucket.exceptions import BodyTooDeep
from bucket.schemas import BatchEnvelopeSchema, packet_rules
from bucket.services import quarantine
from bucket.services.ingest import store_batch, store_packets
from bucket.web.body import load_or_abort, read_json_object
from bucket.web.metrics import note_packets

blp = Blueprint(
    "ingest",
    __name__,
    url_prefix="/api/v1/bucket/prana",
    description="Packets from PRANA browsers.",
)

envelope_schema = BatchEnvelopeSchema()
MAX_IDEMPOTENCY_KEY = 255


@blp.route("/ingest", methods=["POST"])
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            media: {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/Packet"},
                        {"$ref": "#/components/schemas/BatchEnvelope"},
                    ]
                }
            }
            for media in ("application/json", "text/plain")
        },
    },
    parameters=[
        {"in": "header", "name": "Idempotency-Key", "schema": {"type": "string", "maxLength": 255}},
        {"in": "header", "name": "X-PRANA-BATCH-ID", "schema": {"type": "string"}},
        {"in": "header", "name": "X-CLIENT-TIMESTAMP", "schema": {"type": "string"}},
    ],
    responses={
        "200": {
            "description": "Stored (or recognised as a duplicate) and committed.",
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/IngestResult"},
                            {"$ref": "#/components/schemas/BatchResult"},
                        ]
                    }
                }
            },
        },
        "207": {
            "description": "Batch: some packets were rejected.",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/BatchResult"}}
            },
        },
        "422": {"$ref": "#/components/responses/UNPROCESSABLE_CONTENT"},
        "503": {"$ref": "#/components/responses/DEFAULT_ERROR"},
    },
)
def ingest():
    """Store one packet or a batch; answer only after the database committed it.

    A retried packet (same natural identity, or same ``Idempotency-Key``) is answered with its
    original ``packet_id`` and ``"duplicate": true``, and is never stored twice.
    """
    try:
        body = read_json_object()
    except BodyTooDeep as exc:
        keep_too_deep(exc)
    if "packets" in body:
        return ingest_batch(body)
    idempotency_key = request.headers.get("Idempotency-Key") or None
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters."
        abort(400, message=message, errors={"headers": {"Idempotency-Key": [message]}})
    packet = load_or_quarantine(body, idempotency_key)
    (outcome,) = store_packets([packet], idempotency_key)
    note_packets(**{"duplicate" if outcome.duplicate else "ingested": 1})
    # A duplicate keeps the seed's "ingested" status (the bridge checks it) and says so aside.
    answer = {
        "status": "ingested",
        "packet_id": outcome.packet_id,
        "received_at": outcome.received_at.isoformat(),
    }
    if outcome.duplicate:
        answer["duplicate"] = True
    return jsonify(answer)


def keep_too_deep(exc: BodyTooDeep) -> NoReturn:
    """A body too deep to parse is kept in the quarantine as text, and refused with 422."""
    (entry_id,) = quarantine.keep_if_reachable(
        [quarantine.Refused(exc.text, {"json": [exc.message]}, request.origin, "packet")]
    )
    abort(
        422,
        message=exc.message + (" It is kept in the quarantine." if entry_id is not None else ""),
        errors={"json": [exc.message]},
        extra={"quarantine_id": entry_id} if entry_id is not None else None,
    )


def load_or_quarantine(body: dict, idempotency_key: str | None) -> dict:
    """The packet under the rules in force; otherwise it is quarantined, and the answer is a
    422 naming each offending field and the quarantine entry."""
    try:
        return packet_rules().load(body)
    except ValidationError as exc:
        errors = exc.normalized_messages()
        (entry_id,) = quarantine.keep_if_reachable(
            [quarantine.Refused(body, errors, request.origin, "packet", idempotency_key)]
        )
        kept = entry_id is not None
        abort(
            422,
            message="The packet is not valid"
            + ("; it is kept in the quarantine." if kept else "."),
            errors={"json": errors},
            extra={"quarantine_id": entry_id} if kept else None,
        )


def ingest_batch(body: dict):
    """Validate each packet on its own; the valid ones are stored in one statement."""
    envelope = load_or_abort(envelope_schema, body)
    packets = envelope["packets"]
    limit = current_app.config["BUCKET_MAX_BATCH_SIZE"]
    if not packets:
        abort(
            422, message="The batch is empty.", errors={"json": {"packets": ["Must not be empty."]}}
        )
    if len(packets) > limit:
        abort(
            422,
            message=f"The batch holds {len(packets)} packets; at most {limit} are accepted.",
            errors={"json": {"packets": [f"At most {limit} packets per batch."]}},
        )
    rules = packet_rules()
    valid: list[tuple[int, dict]] = []
    errors: dict[int, dict] = {}
    for index, raw in enumerate(packets):
        if not isinstance(raw, dict):
            errors[index] = {"_schema": ["Each packet must be a JSON object."]}
            continue
        try:
            valid.append((index, rules.load(raw)))
        except ValidationError as exc:
            errors[index] = exc.normalized_messages()
    summary = store_batch(len(packets), valid, errors)
    refused = [index for index in sorted(errors) if isinstance(packets[index], dict)]
    kept = quarantine.keep_if_reachable(
        [quarantine.Refused(packets[i], errors[i], request.origin, "batch") for i in refused]
    )
    for index, entry_id in zip(refused, kept, strict=True):
        if entry_id is not None:
            summary.results[index]["quarantine_id"] = entry_id
    note_packets(
        ingested=summary.accepted - summary.duplicates,
        duplicate=summary.duplicates,
        rejected=summary.rejected,
    )
    answer = {
        "status": summary.status,
        "batch_id": request.headers.get("X-PRANA-BATCH-ID"),
        "accepted": summary.accepted,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected,
        "results": summary.results,
    }
    return jsonify(answer), summary.http_status
