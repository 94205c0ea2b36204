"""Prometheus scrape endpoint (open, like the health probes, unless an operator asks for a
token: BUCKET_METRICS_TOKEN or BUCKET_METRICS_REQUIRE_TOKEN)."""

from __future__ import annotations

from flask import Response
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST

from bucket.web.metrics import render_metrics

blp = Blueprint(
    "metrics", __name__, description="Prometheus metrics (a token only when configured)."
)


@blp.route("/metrics", methods=["GET"])
@blp.response(
    200,
    {"type": "string"},
    content_type="text/plain",
    description="Prometheus text exposition format 0.0.4.",
)
def metrics():
    """Request counts and latencies (all workers), packet outcomes and queue gauges."""
    return Response(render_metrics(), content_type=CONTENT_TYPE_LATEST)
