"""The probes' answers (api/health.py)."""

from __future__ import annotations

from marshmallow import fields, validate

from bucket.schemas.base import BaseSchema


class HealthSchema(BaseSchema):
    """Liveness: the process answers."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))


class ReadinessSchema(BaseSchema):
    """Readiness: whether the database answers; Redis is reported, not required."""

    status = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))
    database = fields.Boolean(required=True)
    redis_connected = fields.Boolean(required=True)
    queue_backend = fields.String(required=True, validate=validate.OneOf(["redis", "memory"]))
