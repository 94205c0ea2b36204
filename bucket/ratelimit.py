"""Rate limits on ingest, per client address and per user, counted in packets.

Only ingest is limited: it is the one endpoint open to the internet. Consumer and operator
endpoints are never throttled (the original's limiter throttled its own poller and stranded
packets); they are guarded by the consumer token instead. Counters live in Redis when
``REDIS_URL`` is set, so every worker and instance shares them, and fall back to memory while
Redis is unreachable (Flask-Limiter retries Redis with a growing back-off).
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from flask import Flask, current_app, g, request
from flask_limiter import Limit, Limiter, RateLimitExceeded
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.middleware.proxy_fix import ProxyFix

from bucket.api.body import ACCEPTED_MEDIA_TYPES

EXTENSION_KEY = "bucket.ratelimit"
INGEST_ENDPOINT = "ingest.ingest"


def trust_proxies(app: Flask) -> None:
    """Take the client address from ``X-Forwarded-For`` only behind N trusted proxies (Render: 1).

    Without it every caller could pick the address it is limited by; with it, the address the
    nearest trusted proxy saw is used (and the scheme it was reached by, for the ``Link`` URLs).
    """
    hops = int(app.config.get("BUCKET_TRUSTED_PROXIES") or 0)
    if hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)


def read_ingest_identity() -> None:
    """Parse an ingest body once, before the limits run: its user and packet count set the cost.

    The parsed object is left in ``g.json_body`` for the view, so JSON is decoded once per
    request. Nothing here refuses a request: bad bodies cost one packet and are judged by the view.
    """
    if request.endpoint != INGEST_ENDPOINT or request.method != "POST":
        return
    g.rate_user, g.rate_cost = None, 1
    media_type = (request.mimetype or "").lower()
    if media_type not in ACCEPTED_MEDIA_TYPES and not media_type.endswith("+json"):
        return
    try:
        body = orjson.loads(request.get_data(cache=True))
    except orjson.JSONDecodeError:
        return
    if not isinstance(body, dict):
        return
    g.json_body = body
    packets = body.get("packets")
    if isinstance(packets, list):
        g.rate_cost = max(1, len(packets))
        first = packets[0] if packets and isinstance(packets[0], dict) else {}
    else:
        first = body
    user = first.get("user_id") or first.get("employee_id")
    if isinstance(user, str) and user:
        g.rate_user = user[:256]


def client_address() -> str:
    """The caller's address (after ProxyFix, when proxies are trusted)."""
    return request.remote_addr or "unknown"


def ingest_user() -> str:
    """The user the ingest request is for (the first packet's, for a batch)."""
    return g.get("rate_user") or ""


def ingest_cost() -> int:
    """Packets in the request: a batch of 100 counts as 100 windows of telemetry."""
    return g.get("rate_cost", 1)


def exempt_request() -> bool:
    """Every endpoint but ingest is exempt."""
    return request.endpoint != INGEST_ENDPOINT


def too_many_requests(exc: RateLimitExceeded):
    """429 in the one error shape, with ``Retry-After`` from the breached window."""
    from bucket.errors import error_response

    limiter: Limiter = current_app.extensions[EXTENSION_KEY]
    retry_after = 1
    breached = limiter.current_limit
    if breached is not None:
        try:
            retry_after = max(1, math.ceil(breached.reset_at - time.time()))
        except Exception:  # noqa: BLE001 - storage gone between hit and answer: keep the default
            pass
    return error_response(
        429,
        f"Too many packets: the limit is {exc.description}. Retry after {retry_after} s.",
        {"Retry-After": str(retry_after)},
    )


def storage_settings(app: Flask) -> tuple[str, dict[str, Any]]:
    """Redis (sharing REDIS_URL, under this deployment's key prefix) or process memory."""
    url = app.config.get("REDIS_URL")
    if not url:
        return "memory://", {}
    prefix = app.config.get("BUCKET_REDIS_PREFIX", "prana-bucket")
    # Fail fast like the queue's client: a dead Redis must not stall ingest.
    return url, {
        "key_prefix": f"{prefix}:limits",
        "socket_connect_timeout": 0.25,
        "socket_timeout": 0.5,
        "retry": Retry(NoBackoff(), 0),
    }


class RateLimits:
    """Flask extension: one Flask-Limiter per application, kept in ``app.extensions``."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build this app's limiter; with ``BUCKET_RATE_LIMIT_ENABLED`` off it installs no hook."""
        config = app.config
        enabled = bool(config.get("BUCKET_RATE_LIMIT_ENABLED", True))
        storage_uri, storage_options = storage_settings(app)
        if enabled:
            app.before_request(read_ingest_identity)  # before the limiter's own hook
        ingest_only = {"methods": ["POST"], "cost": ingest_cost}
        limiter = Limiter(
            client_address,
            default_limits=[
                Limit(config["BUCKET_RATE_LIMIT_INGEST_PER_IP"], scope="ip", **ingest_only),
                Limit(
                    config["BUCKET_RATE_LIMIT_INGEST_PER_USER"],
                    key_function=ingest_user,
                    scope="user",
                    exempt_when=lambda: not ingest_user(),
                    **ingest_only,
                ),
            ],
            strategy=config["BUCKET_RATE_LIMIT_STRATEGY"],
            storage_uri=storage_uri,
            storage_options=storage_options,
            in_memory_fallback_enabled=True,
            headers_enabled=False,  # headers would cost a storage round trip per request
            swallow_errors=True,
            enabled=enabled,
        )
        limiter.request_filter(exempt_request)
        limiter.init_app(app)
        app.extensions[EXTENSION_KEY] = limiter
        app.register_error_handler(RateLimitExceeded, too_many_requests)

    @staticmethod
    def limiter() -> Limiter:
        """The current application's Flask-Limiter."""
        return current_app.extensions[EXTENSION_KEY]
