"""Rate limits on ingest, per client address and per user, counted in packets.

Only ingest is limited: it is the one endpoint open to the internet. Consumer and operator
endpoints are never throttled (the original's limiter throttled its own poller and stranded
packets); they are guarded by the consumer token instead. Counters live in Redis when
``REDIS_URL`` is set, so every worker and instance shares them, and fall back to memory while
Redis is unreachable (Redis is tried again a second later).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import orjson
from flask import Flask, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage, storage_from_string
from limits.strategies import STRATEGIES, SlidingWindowCounterRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.middleware.proxy_fix import ProxyFix

from bucket.web.body import ACCEPTED_MEDIA_TYPES
from bucket.web.errors import error_response

log = logging.getLogger(__name__)

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


# Every limit of one request in one round trip, all or nothing: each (previous, current) key
# pair is a sliding window counter exactly as the ``limits`` library keeps it (its own script
# acquires one window per call), so the library still reads these windows for Retry-After.
ACQUIRE_ALL = """
local amount = tonumber(ARGV[1])
local weighted = {}
for i = 1, #KEYS / 2 do
  local previous, current = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, expiry = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]) * 1000
  if amount > limit then return i end
  local current_ttl = tonumber(redis.call('pttl', current))
  if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', current, previous)
    redis.call('set', current, 0, 'PX', current_ttl + expiry)
  end
  local previous_count = tonumber(redis.call('get', previous)) or 0
  local previous_ttl = math.max(tonumber(redis.call('pttl', previous)) or 0, 0)
  local current_count = tonumber(redis.call('get', current)) or 0
  if math.floor(previous_count * previous_ttl / expiry) + current_count + amount > limit then
    return i
  end
end
for i = 1, #KEYS / 2 do
  local current, expiry = KEYS[2 * i], tonumber(ARGV[2 * i + 1]) * 1000
  if redis.call('exists', current) == 1 then
    redis.call('incrby', current, amount)
  else
    redis.call('set', current, amount, 'PX', expiry * 2)
  end
end
return 0
"""

Check = tuple[RateLimitItem, str, str]  # the limit, its scope (ip or user), the key


class IngestLimits:
    """One application's ingest limits and where their counters live.

    The ``limits`` library provides the storage (Redis or memory) and the strategies. With
    Redis and the sliding window counter (the default), all of a request's limits are checked
    and counted by one script in one round trip; two round trips per request were a third of
    an ingest's CPU. While Redis fails, counting goes on in this process's memory and Redis is
    tried again after ``retry_after`` seconds.
    """

    def __init__(
        self,
        storage_uri: str,
        options: dict,
        per_ip: str,
        per_user: str,
        strategy: str,
        retry_after: float,
    ) -> None:
        self.storage = storage_from_string(storage_uri, **options)
        self.primary = STRATEGIES[strategy](self.storage)
        self.fallback = STRATEGIES[strategy](MemoryStorage())
        self.one_round_trip = isinstance(self.storage, RedisStorage) and isinstance(
            self.primary, SlidingWindowCounterRateLimiter
        )
        self.script = (
            self.storage.get_connection().register_script(ACQUIRE_ALL)
            if self.one_round_trip
            else None
        )
        self.per_ip = parse_many(per_ip) if per_ip else []
        self.per_user = parse_many(per_user) if per_user else []
        self.retry_after = retry_after
        self._down_until = 0.0

    def strategy(self):
        """The shared counters, or memory while they are unreachable."""
        return self.primary if time.monotonic() >= self._down_until else self.fallback

    def acquire(self, checks: list[Check], cost: int) -> Check | None:
        """Count ``cost`` against every check; return the first one it would exceed (then
        nothing is counted, on Redis), or None."""
        if self.strategy() is self.primary:
            try:
                return self._acquire_shared(checks, cost)
            except Exception as exc:  # noqa: BLE001 - each storage raises its own errors
                log.warning("rate limit storage unavailable, counting in memory: %s", exc)
                self._down_until = time.monotonic() + self.retry_after
        for check in checks:
            item, scope, key = check
            if not self.fallback.hit(item, INGEST_ENDPOINT, scope, key, cost=cost):
                return check
        return None

    def _acquire_shared(self, checks: list[Check], cost: int) -> Check | None:
        if not self.one_round_trip:
            for check in checks:
                item, scope, key = check
                if not self.primary.hit(item, INGEST_ENDPOINT, scope, key, cost=cost):
                    return check
            return None
        keys, args = [], [cost]
        storage = self.storage
        for item, scope, key in checks:
            counted = item.key_for(INGEST_ENDPOINT, scope, key)
            keys += [
                storage.prefixed_key(storage._previous_window_key(counted)),
                storage.prefixed_key(storage._current_window_key(counted)),
            ]
            args += [item.amount, item.get_expiry()]
        breached = int(self.script(keys=keys, args=args))
        return checks[breached - 1] if breached else None

    def retry_after_seconds(self, item: RateLimitItem, scope: str, key: str) -> int:
        """Whole seconds until the breached window lets a request through."""
        try:
            stats = self.strategy().get_window_stats(item, INGEST_ENDPOINT, scope, key)
            return max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:  # noqa: BLE001 - storage gone between hit and answer
            return 1


def check_ingest_limits():
    """Refuse an ingest request over its address's or its user's allowance, in packets."""
    if request.endpoint != INGEST_ENDPOINT or request.method != "POST":
        return None
    read_ingest_identity()
    limits: IngestLimits = current_app.extensions[EXTENSION_KEY]
    address = client_address()
    checks = [(item, "ip", address) for item in limits.per_ip]
    if g.rate_user:
        checks += [(item, "user", g.rate_user) for item in limits.per_user]
    breached = limits.acquire(checks, g.rate_cost) if checks else None
    if breached is not None:
        return too_many_requests(limits, *breached)
    return None


def too_many_requests(limits: IngestLimits, item: RateLimitItem, scope: str, key: str):
    """429 in the one error shape, with ``Retry-After`` from the breached window."""
    retry_after = limits.retry_after_seconds(item, scope, key)
    who = "this address" if scope == "ip" else "this user"
    return error_response(
        429,
        f"Too many packets from {who}: the limit is {item}. Retry after {retry_after} s.",
        {"Retry-After": str(retry_after)},
    )


def storage_settings(app: Flask) -> tuple[str, dict[str, Any]]:
    """Redis (sharing REDIS_URL, under this deployment's key prefix) or process memory."""
    url = app.config.get("REDIS_URL")
    if not url:
        return "memory://", {}
    prefix = app.config["BUCKET_REDIS_PREFIX"]
    # Fail fast like the queue's client: a dead Redis must not stall ingest.
    return url, {
        "key_prefix": f"{prefix}:limits",
        "socket_connect_timeout": 0.25,
        "socket_timeout": 0.5,
        "retry": Retry(NoBackoff(), 0),
    }


class RateLimits:
    """Flask extension: each application's ingest limits, kept in ``app.extensions``."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build this app's limits; with ``BUCKET_RATE_LIMIT_ENABLED`` off nothing is installed."""
        config = app.config
        if not config.get("BUCKET_RATE_LIMIT_ENABLED", True):
            return
        storage_uri, storage_options = storage_settings(app)
        app.extensions[EXTENSION_KEY] = IngestLimits(
            storage_uri,
            storage_options,
            config["BUCKET_RATE_LIMIT_INGEST_PER_IP"],
            config["BUCKET_RATE_LIMIT_INGEST_PER_USER"],
            config["BUCKET_RATE_LIMIT_STRATEGY"],
            float(config["BUCKET_REDIS_RETRY_AFTER"]),
        )
        app.before_request(check_ingest_limits)
