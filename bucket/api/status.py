"""Queue status for operators and dashboards."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint

from bucket.schemas import StatusSchema
from bucket.services.stats import collect_stats

blp = Blueprint("status", __name__, url_prefix="/api/v1/bucket/prana", description="Queue status.")


@blp.route("/status", methods=["GET"])
@blp.response(200, StatusSchema)
def status():
    """Counts by delivery state, the ready queue's size, the queue backend and Redis state."""
    return jsonify(collect_stats().as_dict())
