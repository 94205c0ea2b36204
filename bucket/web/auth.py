"""Consumer authentication: a shared token guards delivery and operator endpoints."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, current_app, request

from bucket.web.errors import error_response

log = logging.getLogger(__name__)

# Blueprints whose every endpoint needs the token when one is configured. Ingest (browsers),
# health probes, metrics and the API document stay open.
PROTECTED_BLUEPRINTS = frozenset({"consumer", "status", "quarantine", "audit", "operations"})
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


def require_consumer_token():
    """Refuse protected endpoints without a valid token: 401 when absent, 403 when wrong."""
    if request.blueprint not in PROTECTED_BLUEPRINTS:
        return None
    tokens = current_app.config["BUCKET_CONSUMER_TOKEN"]
    candidate = presented_token()
    if candidate is None:
        return error_response(
            401,
            "This endpoint needs a consumer token: send 'Authorization: Bearer <token>' "
            "or 'X-API-Key: <token>'.",
            AUTH_CHALLENGE,
        )
    if not token_matches(candidate, tokens):
        return error_response(403, "The consumer token is not valid.")
    return None


def init_auth(app: Flask) -> None:
    """Install the token check; without a token the consumer side is open, and we say so."""
    tokens = app.config.get("BUCKET_CONSUMER_TOKEN") or []
    if isinstance(tokens, str):
        tokens = tokens.split(",")
    tokens = [token.strip() for token in tokens if token and token.strip()]
    app.config["BUCKET_CONSUMER_TOKEN"] = tokens
    if not tokens:
        log.warning(
            "BUCKET_CONSUMER_TOKEN is not set: pending, mark-processed, user listings and status "
            "are open to anyone who can reach this service"
        )
        return
    app.before_request(require_consumer_token)
