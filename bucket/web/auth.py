"""Tokens: the consumer token guards delivery and operator endpoints; /metrics on request."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, current_app, request

from bucket.web.errors import error_response

log = logging.getLogger(__name__)

# Blueprints whose every endpoint needs the consumer token when one is configured. Ingest
# (browsers), health probes and the API document stay open; metrics too, unless asked.
PROTECTED_BLUEPRINTS = frozenset({"consumer", "status", "quarantine", "audit", "operations"})
METRICS = "metrics"
AUTH_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="prana-bucket"'}


def presented_token() -> str | None:
    """The token the caller sent, from ``Authorization: Bearer`` or ``X-API-Key``."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("X-API-Key") or None


def token_matches(candidate: str, tokens: list[str]) -> bool:
    """Compare against every configured token in constant time (rotation keeps several valid)."""
    given = candidate.encode()
    matched = False
    for token in tokens:
        # No short-circuit: the time taken does not reveal which token (if any) came close.
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def require_token():
    """Refuse a guarded endpoint without a valid token: 401 when absent, 403 when wrong."""
    tokens = current_app.extensions["bucket.auth"].get(request.blueprint)
    if tokens is None:
        return None
    kind = "metrics or consumer" if request.blueprint == METRICS else "consumer"
    candidate = presented_token()
    if candidate is None:
        return error_response(
            401,
            f"This endpoint needs a {kind} token: send 'Authorization: Bearer <token>' "
            "or 'X-API-Key: <token>'.",
            AUTH_CHALLENGE,
        )
    if not token_matches(candidate, tokens):
        return error_response(403, f"The {kind} token is not valid.")
    return None


def configured_tokens(value: str | list[str] | None) -> list[str]:
    """The tokens of a setting: a comma-separated string or a list, blanks dropped."""
    if isinstance(value, str):
        value = value.split(",")
    return [token.strip() for token in value or [] if token and token.strip()]


def guarded_blueprints(app: Flask) -> dict[str, list[str]]:
    """Which blueprints need a token, and the tokens each accepts."""
    return app.extensions["bucket.auth"]


def init_auth(app: Flask) -> None:
    """Install the token check where tokens are configured, and say what stays open.

    The consumer token guards the consumer and operator endpoints. ``/metrics`` stays open
    (the contract) unless an operator asks: ``BUCKET_METRICS_TOKEN`` (a scraper's own token,
    which opens nothing else) or ``BUCKET_METRICS_REQUIRE_TOKEN`` (the consumer token then
    opens it); a consumer token always does, once it is guarded.
    """
    consumer = configured_tokens(app.config.get("BUCKET_CONSUMER_TOKEN"))
    scraper = configured_tokens(app.config.get("BUCKET_METRICS_TOKEN"))
    app.config["BUCKET_CONSUMER_TOKEN"] = consumer
    app.config["BUCKET_METRICS_TOKEN"] = scraper
    guarded: dict[str, list[str]] = {}
    if consumer:
        guarded.update(dict.fromkeys(PROTECTED_BLUEPRINTS, consumer))
    else:
        log.warning(
            "BUCKET_CONSUMER_TOKEN is not set: pending, mark-processed, user listings and status "
            "are open to anyone who can reach this service"
        )
    if scraper or app.config.get("BUCKET_METRICS_REQUIRE_TOKEN"):
        if not (scraper or consumer):  # closed, as asked, until a token is configured
            log.warning(
                "BUCKET_METRICS_REQUIRE_TOKEN is set but no token is: /metrics refuses every "
                "scrape; set BUCKET_METRICS_TOKEN or BUCKET_CONSUMER_TOKEN"
            )
        guarded[METRICS] = scraper + consumer
    app.extensions["bucket.auth"] = guarded
    if guarded:
        app.before_request(require_token)
