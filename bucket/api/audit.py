"""The audit log for outsiders: the head seal, the chain of seals, one packet's proof."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint, abort

from bucket.schemas import ArtifactSchema, LatestHashSchema, SealSchema, SealsQuerySchema
from bucket.services.audit import proofs

blp = Blueprint(
    "audit",
    __name__,
    url_prefix="/api/v1",
    description="The tamper-evident audit log: seals, their chain and inclusion proofs.",
)


@blp.route("/bucket/latest-hash", methods=["GET"])
@blp.response(200, LatestHashSchema)
def latest_hash():
    """The head seal: keep its hash somewhere the server cannot rewrite."""
    return jsonify(proofs.latest())


@blp.route("/bucket/audit/seals", methods=["GET"])
@blp.arguments(SealsQuerySchema, location="query")
@blp.response(200, SealSchema(many=True))
def seals(args: dict):
    """The chain of seals ``from``..``to`` (by number, at most 1,000), oldest first."""
    return jsonify(proofs.chain(args.get("first"), args.get("last")))


@blp.route("/audit/artifact/<packet_id>", methods=["GET"])
@blp.response(200, ArtifactSchema)
@blp.alt_response(404, response="DEFAULT_ERROR", description="Unknown packet_id.")
def artifact(packet_id: str):
    """A packet as stored, its provenance and its inclusion proof up to its seal."""
    found = proofs.artifact(packet_id)
    if found is None:
        message = f"Unknown packet_id {packet_id}."
        abort(404, message=message, errors={"packet_id": [message]})
    return jsonify(found)
