"""Karma Tracker's endpoints: poll, acknowledge, change a lease, list a user's packets."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint, abort

from bucket.api.paging import page_response, refuse_cursor
from bucket.api.presenters import pending_packet_out, user_packet_out
from bucket.exceptions import BadCursor
from bucket.schemas import (
    AckBatchResultSchema,
    AckBatchSchema,
    AcknowledgementSchema,
    AckResultSchema,
    AckSchema,
    LeaseChangeSchema,
    PendingQuerySchema,
    PendingResponseSchema,
    UserPacketSchema,
    UserQuerySchema,
    fast_load_ack,
    fast_load_acks,
)
from bucket.services import delivery
from bucket.services.listing import user_packets
from bucket.web.body import load_or_abort, read_json_object
from bucket.web.methods import refuse_head
from bucket.web.metrics import note_acks

blp = Blueprint(
    "consumer",
    __name__,
    url_prefix="/api/v1/bucket/prana",
    description="Delivery of stored packets to Karma Tracker.",
)

ack_schema = AckSchema()
ack_batch_schema = AckBatchSchema()
lease_schema = LeaseChangeSchema()
# An instance, not the class: webargs would build a schema from a class on every request.
pending_query_schema = PendingQuerySchema()


@blp.route("/packets/pending", methods=["GET"])
@refuse_head  # HEAD would lease packets and throw their receipts away
@blp.arguments(pending_query_schema, location="query", as_kwargs=True)
@blp.response(200, PendingResponseSchema)
def pending(limit: int, wait: float, visibility_timeout: int | None = None):
    """Lease up to ``limit`` packets to the caller.

    Each packet stays invisible to other consumers for ``visibility_timeout`` seconds (default
    ``BUCKET_VISIBILITY_TIMEOUT``); acknowledge it before then or it is served again. With
    ``wait`` > 0 an empty queue holds the request until a packet arrives or the time is up.
    """
    result = delivery.poll(limit, visibility_timeout, wait)
    packets = [pending_packet_out(row, result.receipt, result.suspect) for row in result.rows]
    queue_size, exact = result.queue_size()
    return jsonify(
        {
            "packets": packets,
            "count": len(packets),
            "queue_size": queue_size,
            "queue_size_exact": exact,
        }
    )


@blp.route("/packets/mark-processed", methods=["POST"])
# The view reads the body itself (one acknowledgement or many, a fast path before the schema),
# so no @blp.arguments declares it: its two shapes are named here from their schemas.
@blp.doc(
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": {"oneOf": [AckSchema, AckBatchSchema]}}},
    },
)
@blp.response(
    200, AcknowledgementSchema, description="One result: recorded (or already processed)."
)
@blp.alt_response(207, schema=AckBatchResultSchema, description="Many results: some refused.")
@blp.alt_response(404, response="DEFAULT_ERROR", description="Unknown packet_id.")
@blp.alt_response(409, response="DEFAULT_ERROR", description="Dead packet or stale receipt.")
@blp.alt_response(422, response="UNPROCESSABLE_CONTENT")
def mark_processed():
    """Record Karma Tracker's outcome for one packet, or for many as ``{"results": [...]}``.

    ``success: true`` ends the packet's life in the queue; ``success: false`` schedules a retry
    after a back-off, or dead-letters the packet on its last allowed delivery. Acknowledging an
    already processed packet is harmless. A ``receipt`` from an expired, since-redelivered lease
    is refused with 409 so it cannot overwrite the newer consumer's outcome.
    """
    body = read_json_object()
    if "results" in body:
        results = fast_load_acks(body) or load_or_abort(ack_batch_schema, body)["results"]
        outcomes = delivery.acknowledge(results)
        note_acks(outcomes)
        status = 200 if all(o.code == 200 for o in outcomes) else 207
        return jsonify({"results": [o.as_dict() for o in outcomes]}), status
    (outcome,) = delivery.acknowledge([fast_load_ack(body) or load_or_abort(ack_schema, body)])
    note_acks([outcome])
    if outcome.code != 200:
        refuse(outcome)
    return jsonify(outcome.as_acknowledgement())


@blp.route("/packets/lease", methods=["POST"])
@blp.arguments(LeaseChangeSchema)
@blp.response(200, AckResultSchema)
@blp.alt_response(404, response="DEFAULT_ERROR", description="Unknown packet_id.")
@blp.alt_response(409, response="DEFAULT_ERROR", description="The receipt holds no live lease.")
def change_lease(args: dict):
    """Extend a lease you hold, or release it at once with ``visibility_timeout: 0``."""
    outcome = delivery.change_visibility(
        args["packet_id"], args["receipt"], args["visibility_timeout"]
    )
    if outcome.code != 200:
        refuse(outcome)
    return jsonify(outcome.as_dict())


@blp.route("/packets/user/<path:user_id>", methods=["GET"])
@blp.arguments(UserQuerySchema, location="query", as_kwargs=True)
@blp.response(200, UserPacketSchema(many=True))
def user_listing(
    user_id: str,
    limit: int,
    processed_only: bool,
    status: str | None = None,
    cursor: str | None = None,
    since=None,
    until=None,
):
    """A user's packets, newest first; the next page's URL is in the ``Link`` header.
    ``since``/``until`` bound when they were received (a learner's timeline)."""
    try:
        rows, next_cursor = user_packets(
            user_id, limit, processed_only, status, cursor, since, until
        )
    except BadCursor as exc:
        refuse_cursor(exc)
    items = [user_packet_out(row._mapping) for row in rows]
    return page_response(
        items, next_cursor, "consumer.user_listing", UserQuerySchema, user_id=user_id
    )


def refuse(outcome: delivery.AckOutcome) -> None:
    """Abort with the refusal's code, naming the packet in the one error shape."""
    abort(
        outcome.code,
        message=outcome.message,
        errors={"packet_id": [outcome.message]},
        headers={"X-Bucket-Outcome": outcome.status},
    )
