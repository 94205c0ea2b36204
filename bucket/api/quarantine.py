"""The quarantine for operators: list, show and replay packets refused for their content."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint, abort

from bucket.api.paging import page_response, refuse_cursor
from bucket.api.presenters import quarantine_entry_out
from bucket.exceptions import BadCursor
from bucket.schemas import (
    QuarantineEntrySchema,
    QuarantineQuerySchema,
    QuarantineReplayResultSchema,
    QuarantineReplaySchema,
)
from bucket.schemas.quarantine import FILTERS
from bucket.services import quarantine
from bucket.services.quarantine import Filters
from bucket.web.body import ActionBodyParser

blp = Blueprint(
    "quarantine",
    __name__,
    url_prefix="/api/v1/bucket/prana/quarantine",
    description="Packets refused for their content, kept for repair and replay.",
)
blp.ARGUMENTS_PARSER = ActionBodyParser()  # a replay's body is JSON or refused, never "all"


def filters_from(args: dict) -> Filters:
    return Filters(**{name: args.get(name) for name in FILTERS})


@blp.route("", methods=["GET"])
@blp.arguments(QuarantineQuerySchema, location="query")
@blp.response(200, QuarantineEntrySchema(many=True))
def list_entries(args: dict):
    """Refused packets, newest first; the next page's URL is in the ``Link`` header."""
    try:
        rows, next_cursor = quarantine.entries(
            filters_from(args), args["limit"], args.get("cursor")
        )
    except BadCursor as exc:
        refuse_cursor(exc)
    items = [quarantine_entry_out(row._mapping) for row in rows]
    return page_response(items, next_cursor, "quarantine.list_entries", QuarantineQuerySchema)


@blp.route("/<int:entry_id>", methods=["GET"])
@blp.response(200, QuarantineEntrySchema)
@blp.alt_response(404, response="DEFAULT_ERROR", description="No such entry.")
def show_entry(entry_id: int):
    """One refused packet, whole."""
    row = quarantine.entry(entry_id) if entry_id < 2**63 else None
    if row is None:
        message = f"No quarantine entry {entry_id}."
        abort(404, message=message, errors={"entry_id": [message]})
    return jsonify(quarantine_entry_out(row._mapping))


@blp.route("/replay", methods=["POST"])
@blp.arguments(QuarantineReplaySchema)
@blp.response(200, QuarantineReplayResultSchema)
def replay(args: dict):
    """Validate entries again under the rules in force now and ingest those that pass.

    Each ingested entry is stored exactly as if it had just arrived (a copy already stored is
    recognised as a duplicate) and leaves the quarantine; the others stay with their new
    errors. Entries are taken in id order: those named by ``ids`` or matching the filters (or
    every entry, with ``all: true``: an empty body, or one that is not JSON, replays nothing),
    up to ``limit``; send ``next_after`` back as ``after`` to go on.
    """
    report = quarantine.replay(
        ids=args.get("ids"),
        filters=filters_from(args),
        limit=args["limit"],
        after=args.get("after"),
    )
    return jsonify(report.as_dict())
