"""Authenticated ingest, the HTTP side: the bearer token of an ingest request, checked once.

The verifier (``bucket.services.tokens``) is built when the application is, so a configuration
that cannot work stops the service at start with a message naming the setting. The token is
checked before the rate limits run (they count verified subjects on their own), and the view
judges each packet against it.
"""

from __future__ import annotations

import logging

from flask import Flask, current_app, g, request

from bucket.services.tokens import OFF, VERIFIED, TokenCheck, TokenVerifier

log = logging.getLogger(__name__)

EXTENSION_KEY = "bucket.ingest_auth"
INGEST_ENDPOINT = "ingest.ingest"
CHALLENGE = 'Bearer realm="prana-bucket-ingest"'


def bearer_token() -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def verifier() -> TokenVerifier:
    """The current application's verifier."""
    return current_app.extensions[EXTENSION_KEY]


def request_token() -> TokenCheck | None:
    """What this ingest request's token proves (checked once, kept in ``g``); None when ingest
    authentication is off."""
    if "ingest_token" not in g:
        checker = verifier()
        g.ingest_token = checker.check(bearer_token()) if checker.enabled else None
    return g.ingest_token


def verified_subject() -> str | None:
    """The subject of this request's verified token (the rate limits count it on its own)."""
    token = g.get("ingest_token")
    return token.subject if token is not None and token.outcome == VERIFIED else None


def check_before_limits() -> None:
    """Check an ingest request's token before the rate limits need its subject."""
    if request.endpoint == INGEST_ENDPOINT and request.method == "POST":
        request_token()


def challenge(reason: str) -> dict[str, str]:
    """``WWW-Authenticate`` for a refused token (RFC 6750), naming the reason, never a key."""
    if reason == "no bearer token":
        return {"WWW-Authenticate": CHALLENGE}
    return {"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'}


class IngestAuth:
    """Flask extension: the application's token verifier, in ``app.extensions``."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build the verifier (``IngestAuthMisconfigured`` stops the start) and the hook."""
        checker = TokenVerifier.from_config(app.config)
        app.extensions[EXTENSION_KEY] = checker
        if checker.mode == OFF:
            return
        log.info(
            "ingest authentication: %s (algorithms %s)",
            checker.mode,
            ", ".join(sorted(checker.algorithms)),
        )
        app.before_request(check_before_limits)
