"""The quarantine of refused packets (services/quarantine.py)."""

from __future__ import annotations

from marshmallow import (
    ValidationError,
    fields,
    validate,
    validates_schema,
)

from bucket.schemas.base import BaseSchema, Moment, Text


class QuarantineFiltersSchema(BaseSchema):
    """Which quarantine entries are meant (all filters optional, combined with AND)."""

    user_id = Text(metadata={"description": "The user (or EMS employee) named."})
    origin = Text(metadata={"description": "The Origin the packet came from."})
    field = Text(data_key="field", metadata={"description": "Only entries refused for this field."})
    since = Moment(metadata={"description": "Last seen at or after (ISO-8601)."})
    until = Moment(metadata={"description": "Last seen before (ISO-8601)."})


FILTERS = ("user_id", "origin", "field", "since", "until")


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
    auth_outcome = fields.String(
        allow_none=True,
        metadata={
            "enum": ["verified", "missing", "invalid", "mismatch", None],
            "description": "The token's outcome when the packet arrived (null: not checked, "
            "or kept before it was recorded); a replay stores the packet with it.",
        },
    )
    auth_subject = fields.String(
        allow_none=True, metadata={"description": "The valid token's subject, if any."}
    )


ENTRY_IDS = validate.Range(min=1, max=2**63 - 1)


class QuarantineReplaySchema(QuarantineFiltersSchema):
    """What to replay: the entries named by ``ids`` or matching the filters (both: those named
    that match), or every entry with ``all: true``; in id order after ``after``, up to
    ``limit``. Replaying is safe
    to repeat: deduplication absorbs what was stored before."""

    ids = fields.List(fields.Integer(validate=ENTRY_IDS), validate=validate.Length(min=1, max=500))
    every = fields.Boolean(
        data_key="all",
        truthy={True},
        falsy={False},
        metadata={"description": "Replay every entry (matching the filters, if any)."},
    )
    after = fields.Integer(
        validate=ENTRY_IDS, metadata={"description": "Continue after this entry (next_after)."}
    )
    limit = fields.Integer(load_default=500, validate=validate.Range(min=1, max=5000))

    # A filter given is a choice, so it may not be empty (an empty one would match everything).
    user_id = Text(validate=validate.Length(min=1), metadata={"description": "The user named."})
    origin = Text(validate=validate.Length(min=1), metadata={"description": "The Origin."})
    field = Text(
        validate=validate.Length(min=1), metadata={"description": "Entries refused for it."}
    )

    # The rule says_which checks, for the OpenAPI document (api/docs.py adds it).
    OPENAPI_RULE = {
        "anyOf": [
            {
                "required": ["all"],
                "properties": {"all": {"enum": [True]}},
                "not": {"required": ["ids"]},
            },
            {
                "anyOf": [{"required": [name]} for name in ("ids", *FILTERS)],
                "not": {"required": ["all", "ids"], "properties": {"all": {"enum": [True]}}},
            },
        ]
    }

    @validates_schema
    def says_which(self, data: dict, **kwargs) -> None:
        """Every entry only when asked: ``all: true``; otherwise ids or a filter."""
        if data.get("every"):
            if "ids" in data:
                raise ValidationError("Send ids or all: true, not both.", "all")
        elif not any(name in data for name in ("ids", *FILTERS)):
            raise ValidationError(
                "Name the entries (ids, or a filter such as user_id), or send all: true to "
                "replay every entry.",
                "all",
            )


class QuarantineReplayItemSchema(BaseSchema):
    """What became of one replayed entry."""

    id = fields.Integer()
    status = fields.String(metadata={"enum": ["ingested", "duplicate", "rejected", "not_verified"]})
    packet_id = fields.String()
    errors = fields.Dict()
    reason = fields.String(
        metadata={"description": "not_verified: why the entry stays (BUCKET_INGEST_AUTH=require)."}
    )


class QuarantineReplayResultSchema(BaseSchema):
    """What a replay did."""

    replayed = fields.Integer()
    ingested = fields.Integer()
    duplicates = fields.Integer()
    still_refused = fields.Integer()
    not_verified = fields.Integer(
        metadata={
            "description": "Valid entries kept in the quarantine because, under "
            "BUCKET_INGEST_AUTH=require, only packets recorded as verified are stored."
        }
    )
    remaining = fields.Integer(
        metadata={"description": "Matching entries this replay did not reach."}
    )
    next_after = fields.Integer(
        allow_none=True, metadata={"description": "Send as ``after`` to continue; null when done."}
    )
    results = fields.List(fields.Nested(QuarantineReplayItemSchema))
