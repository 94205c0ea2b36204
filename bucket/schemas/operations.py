"""Operators' actions and the console's charts (api/operations.py)."""

from __future__ import annotations

from marshmallow import (
    ValidationError,
    fields,
    validate,
    validates_schema,
)

from bucket.schemas.base import BaseSchema, Moment, Text


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
    verified_share = fields.List(
        fields.Float(allow_none=True),
        metadata={
            "description": "Per minute, the share of packets stored with a token check that "
            "were verified (null: none checked that minute; BUCKET_INGEST_AUTH)."
        },
    )
    refused = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.Integer()),
        metadata={"description": "Per minute, packets refused by authenticated ingest, by reason."},
    )


class DeadQuerySchema(BaseSchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(metadata={"description": "From a previous page's Link header."})


class RequeueSchema(BaseSchema):
    """Which dead packets to serve again: those named, or one user's, or with ``all: true``
    every one."""

    packet_ids = fields.List(
        Text(validate=validate.Length(min=1, max=64)), validate=validate.Length(min=1, max=500)
    )
    user_id = Text(validate=validate.Length(min=1, max=256))
    every = fields.Boolean(
        data_key="all",
        truthy={True},
        falsy={False},
        metadata={"description": "Requeue every dead packet."},
    )

    # The rule says_which checks, for the OpenAPI document (api/docs.py adds it).
    OPENAPI_RULE = {
        "oneOf": [
            {
                "required": ["all"],
                "properties": {"all": {"enum": [True]}},
                "not": {"anyOf": [{"required": ["packet_ids"]}, {"required": ["user_id"]}]},
            },
            {
                "anyOf": [{"required": ["packet_ids"]}, {"required": ["user_id"]}],
                "not": {"required": ["all"], "properties": {"all": {"enum": [True]}}},
            },
        ]
    }

    @validates_schema
    def says_which(self, data: dict, **kwargs) -> None:
        """Every dead packet only when asked: ``all: true``; otherwise packet_ids or user_id."""
        chosen = "packet_ids" in data or "user_id" in data
        if data.get("every") and chosen:
            raise ValidationError("Send packet_ids or user_id, or all: true, not both.", "all")
        if not data.get("every") and not chosen:
            raise ValidationError(
                "Name the packets (packet_ids or user_id), or send all: true to requeue every "
                "dead packet.",
                "all",
            )


class ReplaySchema(BaseSchema):
    """One user's packets to serve again (processed, dead and retrying ones)."""

    user_id = Text(required=True, validate=validate.Length(min=1, max=256))
    since = Moment()
    until = Moment()


class MovedSchema(BaseSchema):
    """How many packets an action put back in the queue."""

    requeued = fields.Integer()
