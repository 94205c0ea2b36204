"""Reading JSON bodies the way the browser bridge sends them (JSON, or sendBeacon's text/plain)."""

from __future__ import annotations

from typing import Any

import orjson
from flask import g, request
from flask_smorest import abort
from marshmallow import Schema, ValidationError

from bucket.exceptions import BodyTooDeep

ACCEPTED_MEDIA_TYPES = {"application/json", "text/plain", ""}
TOO_DEEP_MESSAGE = (
    "The request body nests deeper than the JSON parser accepts (1024 levels); "
    "a packet's fields may nest at most BUCKET_MAX_JSON_DEPTH levels."
)


def read_json_object() -> dict[str, Any]:
    """Return the body as a JSON object, or abort with a 4xx JSON error naming the problem."""
    media_type = (request.mimetype or "").lower()
    if media_type not in ACCEPTED_MEDIA_TYPES and not media_type.endswith("+json"):
        message = f"Unsupported Content-Type {media_type!r}: send application/json."
        abort(415, message=message, errors={"headers": {"Content-Type": [message]}})
    raw = request.get_data(cache=True)  # the rate limiter may have read it already
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # Werkzeug cuts a chunked body at the limit instead of refusing it: refuse it here.
        message = f"The request body exceeds {limit} bytes (BUCKET_MAX_BODY_BYTES)."
        abort(413, message=message, errors={"json": [message]})
    parsed = g.get("json_body")  # decoded once already, by the rate limiter's look at the user
    if parsed is not None:
        return parsed
    if not raw.strip():
        message = "The request body is empty: send a JSON object."
        abort(400, message=message, errors={"json": [message]})
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise BodyTooDeep(raw.decode("utf-8", "replace"), TOO_DEEP_MESSAGE) from exc
        message = f"The request body is not valid JSON: {exc}."
        abort(400, message=message, errors={"json": [message]})
    if not isinstance(body, dict):
        abort(
            422,
            message="The request body must be a JSON object.",
            errors={"json": [f"Expected an object, got {type(body).__name__}."]},
        )
    return body


def load_or_abort(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    """Validate with ``schema``; a failure is a 422 listing each offending field."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        abort(422, message="The request is not valid.", errors={"json": exc.normalized_messages()})
