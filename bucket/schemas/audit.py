"""The audit log (services/audit)."""

from __future__ import annotations

from marshmallow import (
    fields,
    validate,
)

from bucket.schemas.base import BaseSchema


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
    leaf_format = fields.Integer(
        metadata={
            "description": "How its leaves encode a packet: 3, PostgreSQL's binary record with "
            "the authentication outcome, subject and staleness; 2, the same without them; 1, "
            "sorted JSON (seals made before those formats)."
        }
    )


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
    canonical = fields.String(
        metadata={
            "description": "Base64 of the exact bytes its leaf hashes, in its seal's "
            "leaf_format: PostgreSQL's binary record of the packet's fields (the README's audit "
            "section; tools/verify_proof.py decodes it)."
        }
    )
    leaf_format = fields.Integer(
        metadata={"description": "The encoding of ``canonical``: that of the packet's seal."}
    )
    authenticated = fields.Boolean(
        metadata={"description": "Sent with a verified bearer token of this packet's user."}
    )
    auth_subject = fields.String(
        allow_none=True, metadata={"description": "The valid token's subject, if any."}
    )
    stale = fields.Boolean(
        metadata={"description": "Its client timestamp lay over BUCKET_STALE_AFTER before arrival."}
    )
    provenance = fields.Dict(
        metadata={
            "description": "current_hash (its leaf), previous_hash (the leaf before it, or the "
            "previous seal's hash), sealed, and when sealed: leaf_index, tree_size, "
            "inclusion_proof (RFC 9162 audit path) and the seal."
        }
    )
