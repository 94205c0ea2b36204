"""The browser bridge's endpoint: one packet or a batch envelope, JSON or sendBeacon text."""

from __future__ import annotations

from collections import Counter
from typing import NoReturn

import orjson
from flask import current_app, g, jsonify, request
from flask_smorest import Blueprint, abort
from marshmallow import ValidationError

from bucket.exceptions import BodyTooDeep
from bucket.extensions import api
from bucket.schemas import (
    MAX_IDEMPOTENCY_KEY,
    BatchEnvelopeSchema,
    BatchResultSchema,
    IngestHeadersSchema,
    IngestResultSchema,
    PacketSchema,
    packet_rules,
)
from bucket.services import activity, quarantine
from bucket.services.ingest import packet_user, shares_write, store_batch, store_packets
from bucket.services.tokens import MISMATCH, REQUIRE, VERIFIED, PacketAuth, TokenCheck
from bucket.web.body import load_or_abort, read_json_object
from bucket.web.ingest_auth import challenge, request_token, verifier
from bucket.web.metrics import note_auth, note_packets
from bucket.web.ratelimit import admit_ingest, client_address

blp = Blueprint(
    "ingest",
    __name__,
    url_prefix="/api/v1/bucket/prana",
    description="Packets from PRANA browsers.",
)

envelope_schema = BatchEnvelopeSchema()


@blp.route("/ingest", methods=["POST"])
# The view reads the body itself (JSON, or sendBeacon's text/plain; one packet or an envelope,
# each packet validated on its own so a bad one cannot sink a batch), so no @blp.arguments
# declares it: its two shapes are named here from their schemas. Its headers too are
# documented from their schema and read by the view (two look-ups): loading them through
# webargs built a dictionary of every header and ran a schema over it on each request, for no
# rule (a too long Idempotency-Key is the view's 400, naming the header).
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            media: {"schema": {"oneOf": [PacketSchema, BatchEnvelopeSchema]}}
            for media in ("application/json", "text/plain")
        },
    },
    parameters=[{"in": "header", "schema": IngestHeadersSchema}],
)
@blp.response(
    200,
    {"oneOf": [IngestResultSchema, BatchResultSchema]},
    description="Stored (or recognised as a duplicate) and committed.",
)
@blp.alt_response(207, schema=BatchResultSchema, description="Batch: some packets were rejected.")
@blp.alt_response(
    401,
    schema=api.ERROR_SCHEMA,
    description="BUCKET_INGEST_AUTH=require: no valid bearer token (missing, expired, bad "
    "signature…); nothing stored or quarantined.",
)
@blp.alt_response(
    403,
    schema=api.ERROR_SCHEMA,
    description="BUCKET_INGEST_AUTH=require: a valid token of another user (or session), for "
    "one packet or every packet of a batch.",
)
@blp.alt_response(
    422,
    schema={"oneOf": [api.ERROR_SCHEMA, BatchResultSchema]},
    description="Nothing stored: one invalid packet (the error shape), or a batch whose every "
    "packet was rejected (the batch answer).",
)
def ingest():
    """Store one packet or a batch; answer only after the database committed it.

    A retried packet (same natural identity, or same ``Idempotency-Key``) is answered with its
    original ``packet_id`` and ``"duplicate": true``, and is never stored twice. With
    ``BUCKET_INGEST_AUTH=require`` a packet needs a bearer token of its own user: 401 without
    a valid one, 403 for another user's (README, "Authenticated ingest").
    """
    token = request_token()
    require = token is not None and verifier().mode == REQUIRE
    if require and token.outcome != VERIFIED:
        refuse_token(token, packets_sent())  # before judging the body: nothing of it is kept
    try:
        body = read_json_object()
    except BodyTooDeep as exc:
        keep_too_deep(exc)
    if "packets" in body:
        return ingest_batch(body, request.headers.get("X-PRANA-BATCH-ID"), token)
    idempotency_key = request.headers.get("Idempotency-Key") or None
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters."
        abort(400, message=message, errors={"headers": {"Idempotency-Key": [message]}})
    auth = verifier().judge(token, body) if token is not None else None
    if require and auth.outcome == MISMATCH:
        refuse_mismatch(auth)
    packet = load_or_quarantine(body, idempotency_key, auth)
    charges = admit_ingest(1, {packet_user(packet): 1}, shared=shares_write(1))
    (outcome,) = store_packets(
        [packet], idempotency_key, [auth] if auth is not None else None, charges
    )
    note_packets(**{"duplicate" if outcome.duplicate else "ingested": 1})
    if auth is not None and not outcome.duplicate:
        note_auth([auth.outcome], [])
    # A duplicate keeps the seed's "ingested" status (the bridge checks it) and says so aside.
    answer = {
        "status": "ingested",
        "packet_id": outcome.packet_id,
        "received_at": outcome.received_at.isoformat(),
    }
    if outcome.duplicate:
        answer["duplicate"] = True
    return jsonify(answer)


def count_refusals(reasons: dict[str, int]) -> None:
    """Refused-for-auth packets are counted (metrics, and by minute for status and the
    console), never quarantined: an attacker must not fill the quarantine."""
    note_auth([], [reason for reason, count in reasons.items() for _ in range(count)])
    activity.refused(reasons)


def packets_sent() -> int:
    """How many packets the request carries, to count a refusal by packet (1 if unreadable)."""
    body = g.get("json_body")
    if body is None:
        try:
            body = orjson.loads(request.get_data(cache=True))
        except orjson.JSONDecodeError:
            return 1
    packets = body.get("packets") if isinstance(body, dict) else None
    return len(packets) if isinstance(packets, list) and packets else 1


def refuse_token(token: TokenCheck, packets: int):
    """401 for a missing or invalid token, naming the reason (never a key or secret)."""
    count_refusals({token.outcome: packets})
    message = (
        "This packet needs 'Authorization: Bearer <token>' of its signed-in user."
        if token.outcome != "invalid"
        else f"The bearer token is not valid: {token.reason}."
    )
    abort(
        401,
        message=message,
        errors={"headers": {"Authorization": [token.outcome]}},
        headers=challenge(token.reason),
    )


def refuse_mismatch(auth: PacketAuth):
    """403 for a valid token of another user (or session)."""
    count_refusals({MISMATCH: 1})
    abort(
        403,
        message=f"The bearer token does not belong to this packet: {auth.reason}.",
        errors={"headers": {"Authorization": [MISMATCH]}},
    )


def keep_too_deep(exc: BodyTooDeep) -> NoReturn:
    """A body too deep to parse is kept in the quarantine as text, and refused with 422."""
    admit_ingest(1, {})  # its sender's address pays, like for any refused packet
    refused = quarantine.Refused(
        exc.text, {"json": [exc.message]}, request.origin, "packet", sender=client_address()
    )
    (entry_id,) = quarantine.keep_if_reachable([refused])
    abort(
        422,
        message=exc.message + (" It is kept in the quarantine." if entry_id is not None else ""),
        errors={"json": [exc.message]},
        extra={"quarantine_id": entry_id} if entry_id is not None else None,
    )


def load_or_quarantine(body: dict, idempotency_key: str | None, auth: PacketAuth | None) -> dict:
    """The packet under the rules in force; otherwise it is quarantined with its
    authentication outcome (``auth``; never the token), and the answer is a 422 naming each
    offending field and the quarantine entry."""
    try:
        return packet_rules().load(body)
    except ValidationError as exc:
        errors = exc.normalized_messages()
        admit_ingest(1, {})  # the address pays for a refused packet, not the user it names
        (entry_id,) = quarantine.keep_if_reachable(
            [
                quarantine.Refused(
                    body, errors, request.origin, "packet", idempotency_key, client_address(), auth
                )
            ]
        )
        kept = entry_id is not None
        abort(
            422,
            message="The packet is not valid"
            + ("; it is kept in the quarantine." if kept else "."),
            errors={"json": errors},
            extra={"quarantine_id": entry_id} if kept else None,
        )


def ingest_batch(body: dict, batch_id: str | None, token: TokenCheck | None):
    """Validate each packet on its own; the valid ones are stored in one statement. Under a
    token each packet is judged on its own too: under ``require`` another user's packets are
    refused individually (never quarantined)."""
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
    judge = verifier().judge if token is not None else None
    require = token is not None and verifier().mode == REQUIRE
    valid: list[tuple[int, dict]] = []
    errors: dict[int, dict] = {}
    auths: dict[int, PacketAuth] = {}
    mismatched: set[int] = set()
    for index, raw in enumerate(packets):
        if not isinstance(raw, dict):
            errors[index] = {"_schema": ["Each packet must be a JSON object."]}
            continue
        if judge is not None:
            auths[index] = auth = judge(token, raw)
            if require and auth.outcome == MISMATCH:
                errors[index] = {"auth": [f"{MISMATCH}: {auth.reason}."]}
                mismatched.add(index)
                continue
        try:
            valid.append((index, rules.load(raw)))
        except ValidationError as exc:
            errors[index] = exc.normalized_messages()
    if mismatched:
        count_refusals({MISMATCH: len(mismatched)})
        if not valid and len(mismatched) == len(errors):
            abort(
                403,
                message="The bearer token belongs to none of these packets.",
                errors={"headers": {"Authorization": [MISMATCH]}},
            )
    # Each accepted packet is charged to its own user; the address pays for every packet.
    # With coalescing, the limits are decided with the shared write's (a batch that stores
    # nothing has no write to share, and is decided at once).
    charges = admit_ingest(
        len(packets),
        Counter(packet_user(packet) for _, packet in valid),
        shared=bool(valid) and shares_write(len(valid)),
    )
    summary = store_batch(
        len(packets), valid, errors, auths if judge is not None else None, charges
    )
    if judge is not None:
        stored = [
            auths[item["index"]].outcome for item in summary.results if item["status"] == "ingested"
        ]
        note_auth(stored, [])
    refused = [
        index
        for index in sorted(errors)
        if isinstance(packets[index], dict) and index not in mismatched
    ]
    sender = client_address()
    kept = quarantine.keep_if_reachable(
        [
            quarantine.Refused(
                packets[i], errors[i], request.origin, "batch", None, sender, auths.get(i)
            )
            for i in refused
        ]
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
        "batch_id": batch_id,
        "accepted": summary.accepted,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected,
        "results": summary.results,
    }
    return jsonify(answer), summary.http_status
