"""Reading JSON bodies: the way the browser bridge sends them (JSON, or sendBeacon's text/plain),
and the stricter way of operators' actions (JSON only)."""

from __future__ import annotations

from typing import Any

import orjson
from flask import g, request
from flask_smorest import abort
from marshmallow import Schema, ValidationError
from webargs.flaskparser import FlaskParser

from bucket.exceptions import BodyTooDeep

ACCEPTED_MEDIA_TYPES = {"application/json", "text/plain", ""}
JSON_MEDIA_TYPES = {"application/json", ""}
TOO_DEEP_MESSAGE = (
    "The request body nests deeper than the JSON parser accepts (1024 levels); "
    "a packet's fields may nest at most BUCKET_MAX_JSON_DEPTH levels."
)


def read_json_object(media_types: set[str] = ACCEPTED_MEDIA_TYPES) -> dict[str, Any]:
    """Return the body as a JSON object, or abort with a 4xx JSON error naming the problem.

    ``media_types`` are the Content-Types read as JSON (besides any ``+json``; ``""`` is a
    request without one).
    """
    media_type = (request.mimetype or "").lower()
    if media_type not in media_types and not media_type.endswith("+json"):
        message = f"Unsupported Content-Type {media_type!r}: send application/json."
        abort(415, message=message, errors={"headers": {"Content-Type": [message]}})
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # Werkzeug cuts a chunked body at the limit instead of refusing it: refuse it here.
        message = f"The request body exceeds {limit} bytes (BUCKET_MAX_BODY_BYTES)."
        abort(413, message=message, errors={"json": [message]})
    if not raw.strip():
        message = "The request body is empty: send a JSON object."
        if media_types is JSON_MEDIA_TYPES:
            message = 'The request body is empty: send a JSON object (`{"all": true}` for all).'
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
    g.json_body = body  # decoded once; a database error's log line names its identifiers
    return body


def load_or_abort(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    """Validate with ``schema``; a failure is a 422 listing each offending field."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        abort(422, message="The request is not valid.", errors={"json": exc.normalized_messages()})


class ActionBodyParser(FlaskParser):
    """The body of an operator's action, for ``blp.arguments``: JSON, or a 4xx.

    webargs reads a body of another Content-Type, or an empty one, as no arguments at all; for
    an action whose empty choice once meant "everything", a replay sent with curl's ``-d``
    acted on every entry. Here a body is read as JSON (``application/json``, ``+json`` or no
    Content-Type at all) or refused before the schema sees it: 415 for another type, 400 for
    an empty or malformed body.
    """

    def load_json(self, req: Any, schema: Schema) -> dict[str, Any]:
        return read_json_object(JSON_MEDIA_TYPES)
