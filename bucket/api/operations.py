"""Operators' reads and actions over HTTP (the console uses them; so can a script): activity
per minute, the dead letters, requeue and replay."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint

from bucket.api.paging import page_response, refuse_cursor
from bucket.api.presenters import user_packet_out
from bucket.exceptions import BadCursor
from bucket.models import DeliveryState
from bucket.schemas import (
    DeadQuerySchema,
    MovedSchema,
    ReplaySchema,
    RequeueSchema,
    TimeseriesQuerySchema,
    TimeseriesSchema,
    UserPacketSchema,
)
from bucket.services import activity, delivery
from bucket.services.listing import dead_letters
from bucket.web.body import ActionBodyParser

blp = Blueprint(
    "operations",
    __name__,
    url_prefix="/api/v1/bucket/prana",
    description="Activity, dead letters, requeue and replay for operators.",
)
blp.ARGUMENTS_PARSER = ActionBodyParser()  # an action's body is JSON or refused, never "all"


@blp.route("/stats/timeseries", methods=["GET"])
@blp.arguments(TimeseriesQuerySchema, location="query")
@blp.response(200, TimeseriesSchema)
def timeseries(args: dict):
    """Packets ingested and processed per minute over the last hour or day, and the mix of
    cognitive states per system; read from per-minute roll-ups, whatever the table's size."""
    return jsonify(activity.timeseries(args["window"]))


@blp.route("/packets/dead", methods=["GET"])
@blp.arguments(DeadQuerySchema, location="query")
@blp.response(200, UserPacketSchema(many=True))
def dead(args: dict):
    """Dead letters, most recently dead first, with their last error and delivery count; the
    next page's URL is in the ``Link`` header."""
    try:
        rows, next_cursor = dead_letters(args["limit"], args.get("cursor"))
    except BadCursor as exc:
        refuse_cursor(exc)
    return page_response(
        [user_packet_out(row._mapping) for row in rows],
        next_cursor,
        "operations.dead",
        DeadQuerySchema,
    )


@blp.route("/packets/dead/requeue", methods=["POST"])
@blp.arguments(RequeueSchema)
@blp.response(200, MovedSchema)
def requeue(args: dict):
    """Serve dead packets again with fresh attempts: those named by ``packet_ids``, or one
    user's (``user_id``), or every dead packet with ``all: true`` (only then)."""
    count = delivery.requeue(
        (DeliveryState.DEAD,), user_id=args.get("user_id"), packet_ids=args.get("packet_ids")
    )
    return jsonify({"requeued": count})


@blp.route("/packets/replay", methods=["POST"])
@blp.arguments(ReplaySchema)
@blp.response(200, MovedSchema)
def replay(args: dict):
    """Serve one user's packets again (processed, dead and retrying ones; leased ones stay with
    their consumer), received within ``since``..``until`` when given."""
    states = (DeliveryState.PROCESSED, DeliveryState.DEAD, DeliveryState.PENDING)
    count = delivery.requeue(states, args["user_id"], args.get("since"), args.get("until"))
    return jsonify({"requeued": count})
