"""Liveness and readiness probes for the load balancer."""

from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from bucket.extensions import db, queue
from bucket.schemas import HealthSchema, ReadinessSchema

blp = Blueprint("health", __name__, description="Service probes (no authentication).")


@blp.route("/health", methods=["GET"])
@blp.response(200, HealthSchema, description="The process answers.")
def health():
    """Liveness: answers as long as the process can serve a request."""
    return jsonify({"status": "ok"})


@blp.route("/health/ready", methods=["GET"])
@blp.response(200, ReadinessSchema, description="The database answers.")
@blp.alt_response(503, schema=ReadinessSchema, description="The database does not answer.")
def ready():
    """Readiness: the database answers a trivial query (Redis is optional thanks to memory)."""
    try:
        db.session.execute(text("SELECT 1"))
        db.session.commit()
        database_ok = True
    except SQLAlchemyError:
        db.session.rollback()
        database_ok = False
    body = {
        "status": "ok" if database_ok else "unavailable",
        "database": database_ok,
        "redis_connected": queue.redis_connected(),
        "queue_backend": queue.backend_name,
    }
    return jsonify(body), 200 if database_ok else 503
