"""Error handlers: one JSON shape (code, status, message, errors) for every failure."""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus

from flask import Flask, g, has_request_context, jsonify, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, InternalServerError

from bucket.exceptions import BodyTooDeep, DatabaseUnavailable, is_outage
from bucket.extensions import db

log = logging.getLogger(__name__)
DATABASE_RETRY_AFTER = "2"


def error_response(
    code: int,
    message: str,
    headers: dict | None = None,
    errors: dict | None = None,
    extra: dict | None = None,
):
    """Build a response in the service's one error shape (``extra`` adds fields, such as the
    ``quarantine_id`` of a refused packet)."""
    body = {"code": code, "status": HTTPStatus(code).phrase, "message": message}
    if errors:
        body["errors"] = errors
    if extra:
        body.update(extra)
    response = jsonify(body)
    response.status_code = code
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def database_unavailable(exc: Exception):
    """The database did not answer: 503 with Retry-After, so the bridge retries the packet."""
    db.session.rollback()
    log.warning(
        "database unavailable: %s: %s", exc.__class__.__name__, str(exc).split("\n")[0][:300]
    )
    return error_response(
        503,
        "The database is unavailable; nothing was stored. Retry later.",
        {"Retry-After": DATABASE_RETRY_AFTER},
    )


def database_error(exc: DBAPIError):
    """Connection-level DBAPI failures are outages (503); anything else is a bug (500)."""
    if is_outage(exc):
        return database_unavailable(exc)
    return internal_error(InternalServerError(original_exception=exc))


def is_framing_error(exc: BaseException | None) -> bool:
    """Whether reading the body failed on the client's framing: gunicorn raises its parser's
    errors (a chunk size such as ``zz``, a body cut short) from ``wsgi.input``. Its buffering
    worker refuses such bodies before the app runs; this covers plain gthread (TLS set up in
    gunicorn), without the app depending on gunicorn."""
    return exc is not None and type(exc).__module__ == "gunicorn.http.errors"


def internal_error(exc: InternalServerError):
    """Roll the session back first, then answer 500 without leaking internals (a body whose
    framing is broken is the client's error: 400)."""
    db.session.rollback()
    original = exc.original_exception or exc
    if is_framing_error(exc.original_exception):
        message = "The request body is malformed and could not be read."
        return error_response(400, message, errors={"json": [message]})
    if isinstance(original, DBAPIError):
        log_database_error(original)
    else:
        log.error("unhandled error", exc_info=original)
    return error_response(500, "Internal server error.")


# What a log line may name of the packets (or acknowledgements) a failed request carried.
IDENTIFIERS = ("packet_id", "user_id", "employee_id", "session_id", "system_type", "timestamp")
MAX_IDENTIFIED = 20


def log_database_error(exc: DBAPIError) -> None:
    """Log a failed statement with what finds its cause and its packets, not their content.

    The engines hide SQL parameters (``hide_parameters``: a packet's signals are parameters),
    and the driver's message is cut to its first line (PostgreSQL's DETAIL quotes the row's
    values). The statement, the driver's error, the stack and the identifiers of the request's
    packets remain.
    """
    driver = exc.orig if exc.orig is not None else exc
    summary = str(driver).split("\n", 1)[0][:300]
    fields = {
        "error": type(driver).__name__,
        "statement": (exc.statement or "")[:2000],
        "stack": "".join(traceback.format_tb(exc.__traceback__)),
    }
    if has_request_context():
        fields["request_id"] = g.get("request_id")
        fields["packets"] = request_identifiers()
    log.error("database error: %s: %s", type(driver).__name__, summary, extra=fields)


def request_identifiers() -> list[dict[str, str]]:
    """The identifiers of the packets in the request's JSON body (one packet, a batch, or
    acknowledgements), as decoded by the view; never any other field."""
    body = g.get("json_body")
    if not isinstance(body, dict):
        return []
    items = body.get("packets") or body.get("results") or [body]
    if not isinstance(items, list):
        return []
    found = []
    for item in items[:MAX_IDENTIFIED]:
        if isinstance(item, dict):
            named = {key: item[key][:256] for key in IDENTIFIERS if isinstance(item.get(key), str)}
            if named:
                found.append(named)
    return found


def http_error(exc: HTTPException):
    """Every HTTP error (404, 405, 413, 422, …) in the one shape, always with a message."""
    if exc.code is None or exc.code >= 500 and isinstance(exc, InternalServerError):
        return internal_error(exc)
    data = getattr(exc, "data", None) or {}
    errors = data.get("errors") or data.get("messages")
    headers = dict(data.get("headers") or {})
    if exc.code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)
    message = data.get("message")
    if exc.code == 413 and not message:
        message = body_too_large_message()
        errors = {"json": [message]}
    return error_response(exc.code, message or exc.description, headers, errors, data.get("extra"))


def body_too_large_message() -> str:
    """Werkzeug's 413 says "exceeds the capacity limit"; ours names the limit."""
    limit = request.max_content_length
    if limit is None:
        return "The request body is too large."
    return f"The request body exceeds {limit} bytes (BUCKET_MAX_BODY_BYTES)."


def body_too_deep(exc: BodyTooDeep):
    """A body nesting beyond the parser's reach: 422 naming the limit (ingest keeps it first)."""
    return error_response(422, exc.message, errors={"json": [exc.message]})


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; ours replace flask-smorest's HTTP handler to always add a message."""
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(PoolTimeoutError, database_unavailable)
    app.register_error_handler(DatabaseUnavailable, database_unavailable)
    app.register_error_handler(DBAPIError, database_error)
    app.register_error_handler(BodyTooDeep, body_too_deep)
    app.register_error_handler(InternalServerError, internal_error)
