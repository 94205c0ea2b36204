"""Rate limits on ingest: packets per client address and per user, bytes per client address.

Only ingest is limited: it is the one endpoint open to the internet. Consumer and operator
endpoints are never throttled (the original's limiter throttled its own poller and stranded
packets); they are guarded by the consumer token instead. Counters live in Redis when
``REDIS_URL`` is set, so every worker and instance shares them, and fall back to memory while
Redis is unreachable (Redis is tried again a second later); without Redis each instance
counts on its own.

A request is admitted once, by the view, when it knows what each packet is: the address pays
for every packet and every byte it sent, stored or refused; a user pays only for the packets
accepted in their name, each packet to its own user, so nobody can spend a victim's
allowance with packets that are refused. A request that never reaches that point (a body
that is not JSON, an empty or oversized batch) is charged to its address afterwards. With
ingest coalescing, the requests of one shared write are admitted together, in turn, by one
script (one round trip for them all) before the write; each request over a limit is
answered its own 429 and left out of the write, as if it had been refused alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g, request
from flask_smorest import abort
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage, storage_from_string
from limits.strategies import STRATEGIES, SlidingWindowCounterRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from bucket.web.errors import error_response
from bucket.web.ingest_auth import verified_subject

log = logging.getLogger(__name__)

EXTENSION_KEY = "bucket.ratelimit"
INGEST_ENDPOINT = "ingest.ingest"


@dataclass(frozen=True)
class Scope:
    """One kind of key a request is charged to: the setting holding its limits, and how a
    429 names what ran out."""

    setting: str
    what: str


# Each kind of key ingest is charged to. Another kind (say, the verified token's subject) is one
# more entry here and one more ``Charge`` in ``admit_ingest``.
SCOPES: dict[str, Scope] = {
    "ip": Scope("BUCKET_RATE_LIMIT_INGEST_PER_IP", "packets from this address"),
    "ip_bytes": Scope("BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP", "bytes from this address"),
    "user": Scope("BUCKET_RATE_LIMIT_INGEST_PER_USER", "packets for this user"),
    "subject": Scope("BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT", "packets for this signed-in user"),
}


@dataclass(frozen=True)
class Charge:
    """What one request costs one key: ``cost`` units (packets or bytes) of ``scope``'s limits."""

    scope: str
    key: str
    cost: int


def trust_proxies(app: Flask) -> None:
    """Take the client address from ``X-Forwarded-For`` only behind N trusted proxies (Render: 1).

    Without it every caller could pick the address it is limited by; with it, the address the
    nearest trusted proxy saw is used (and the scheme it was reached by, for the ``Link`` URLs).
    """
    hops = int(app.config.get("BUCKET_TRUSTED_PROXIES") or 0)
    if hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)


def client_address() -> str:
    """The caller's address (after ProxyFix, when proxies are trusted)."""
    return request.remote_addr or "unknown"


def body_bytes() -> int:
    """Bytes of the request body: as announced (Werkzeug reads no more), or as read when it
    came chunked. A body nobody read is not read for this (a slow sender would hold us)."""
    if request.content_length is not None:
        return request.content_length
    try:
        return len(request.get_data(cache=True)) if "_cached_data" in vars(request) else 0
    except HTTPException:  # over BUCKET_MAX_BODY_BYTES
        return 0


# Every limit of several requests in one round trip: the requests in turn, each all or nothing.
# Each (previous, current) key pair is a sliding window counter exactly as the ``limits``
# library keeps it (its own script acquires one window per call), so the library still reads
# these windows. ARGV holds the number of requests, then for each request its number of limits
# followed by (amount, limit, expiry) for each of them: each key is charged its own amount. A
# request's answer is 0 when it was admitted (and charged), otherwise the number of the limit
# (within the request) it would exceed and that window as ``get_sliding_window`` reads it
# (previous count and TTL, current count and TTL, in ms), for its Retry-After.
ACQUIRE_EACH = """
local requests = tonumber(ARGV[1])
local answers = {}
local pair, arg = 0, 2
for r = 1, requests do
  local limits = tonumber(ARGV[arg])
  arg = arg + 1
  local answer = 0
  for i = 1, limits do
    local previous, current = KEYS[2 * (pair + i) - 1], KEYS[2 * (pair + i)]
    local at = arg + 3 * (i - 1)
    local amount, limit = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
    local expiry = tonumber(ARGV[at + 2]) * 1000
    local current_ttl = tonumber(redis.call('pttl', current))
    if current_ttl > 0 and current_ttl < expiry then
      redis.call('rename', current, previous)
      redis.call('set', current, 0, 'PX', current_ttl + expiry)
    end
    local previous_count = tonumber(redis.call('get', previous)) or 0
    local previous_ttl = math.max(tonumber(redis.call('pttl', previous)) or 0, 0)
    local current_count = tonumber(redis.call('get', current)) or 0
    if amount > limit
      or math.floor(previous_count * previous_ttl / expiry) + current_count + amount > limit then
      answer = {i, previous_count, previous_ttl, current_count,
                math.max(tonumber(redis.call('pttl', current)) or 0, 0)}
      break
    end
  end
  if answer == 0 then
    for i = 1, limits do
      local current = KEYS[2 * (pair + i)]
      local at = arg + 3 * (i - 1)
      local amount, expiry = tonumber(ARGV[at]), tonumber(ARGV[at + 2]) * 1000
      if redis.call('exists', current) == 1 then
        redis.call('incrby', current, amount)
      else
        redis.call('set', current, amount, 'PX', expiry * 2)
      end
    end
  end
  answers[r] = answer
  pair, arg = pair + limits, arg + 3 * limits
end
return answers
"""

Check = tuple[RateLimitItem, str, str, int]  # the limit, its scope, the key, the cost


@dataclass(frozen=True)
class Breach:
    """The limit a request would exceed, its scope and key, and whole seconds until its
    window lets a request through."""

    item: RateLimitItem
    scope: str
    key: str
    retry_after: int


class IngestLimits:
    """One application's ingest limits and where their counters live.

    The ``limits`` library provides the storage (Redis or memory) and the strategies. With
    Redis and the sliding window counter (the default), all the limits of a request, or of
    every request of a shared write (``admit_each``), are checked and counted by one script in
    one round trip, which also answers the Retry-After of each refusal. Otherwise each limit
    is tested, then all are counted, under a lock (all or nothing within this process). While
    Redis fails, counting goes on in this process's memory and Redis is tried again after
    ``retry_after`` seconds.
    """

    def __init__(
        self,
        storage_uri: str,
        options: dict,
        limits: Mapping[str, str],
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
            self.storage.get_connection().register_script(ACQUIRE_EACH)
            if self.one_round_trip
            else None
        )
        self.items = {scope: parse_many(text) for scope, text in limits.items() if text}
        self.retry_after = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()

    def strategy(self):
        """The shared counters, or memory while they are unreachable."""
        return self.primary if time.monotonic() >= self._down_until else self.fallback

    def checks(self, charges: Iterable[Charge]) -> list[Check]:
        """Each limit every charge meets (scopes without limits, and free charges, meet none)."""
        return [
            (item, charge.scope, charge.key, charge.cost)
            for charge in charges
            if charge.cost > 0
            for item in self.items.get(charge.scope, ())
        ]

    def admit(self, charges: Iterable[Charge]) -> Breach | None:
        """Count every charge against its limits; return the first limit one would exceed
        (then nothing is counted), or None."""
        return self.admit_each([charges])[0]

    def admit_each(self, requests: Iterable[Iterable[Charge]]) -> list[Breach | None]:
        """``admit`` for several requests in turn (in one round trip on Redis): each request
        is counted, or refused with the first limit it would exceed, as if alone."""
        checks = [self.checks(charges) for charges in requests]
        if not any(checks):
            return [None] * len(checks)
        if self.strategy() is self.primary:
            try:
                if self.one_round_trip:
                    return self._admit_in_one_script(checks)
                return [self._admit_in_turn(self.primary, each) for each in checks]
            except Exception as exc:  # noqa: BLE001 - each storage raises its own errors
                log.warning("rate limit storage unavailable, counting in memory: %s", exc)
                self._down_until = time.monotonic() + self.retry_after
        return [self._admit_in_turn(self.fallback, each) for each in checks]

    def _admit_in_turn(self, strategy, checks: list[Check]) -> Breach | None:
        with self._lock:
            for item, scope, key, cost in checks:
                if not strategy.test(item, INGEST_ENDPOINT, scope, key, cost=cost):
                    return Breach(item, scope, key, self._retry_after(strategy, item, scope, key))
            for item, scope, key, cost in checks:
                strategy.hit(item, INGEST_ENDPOINT, scope, key, cost=cost)
        return None

    def _admit_in_one_script(self, requests: list[list[Check]]) -> list[Breach | None]:
        keys: list[str] = []
        args: list[int] = [len(requests)]
        storage = self.storage
        for checks in requests:
            args.append(len(checks))
            for item, scope, key, cost in checks:
                counted = item.key_for(INGEST_ENDPOINT, scope, key)
                keys += [
                    storage.prefixed_key(storage._previous_window_key(counted)),
                    storage.prefixed_key(storage._current_window_key(counted)),
                ]
                args += [cost, item.amount, item.get_expiry()]
        answers = self.script(keys=keys, args=args)
        breaches: list[Breach | None] = []
        for checks, answer in zip(requests, answers, strict=True):
            if not answer:
                breaches.append(None)
                continue
            number, previous, previous_ms, current, current_ms = (int(v) for v in answer)
            item, scope, key, _ = checks[number - 1]
            stats = (previous, previous_ms / 1000, current, current_ms / 1000)
            breaches.append(Breach(item, scope, key, window_retry_after(item, *stats)))
        return breaches

    @staticmethod
    def _retry_after(strategy, item: RateLimitItem, scope: str, key: str) -> int:
        """Whole seconds until the breached window lets a request through."""
        try:
            stats = strategy.get_window_stats(item, INGEST_ENDPOINT, scope, key)
            return max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:  # noqa: BLE001 - storage gone between test and answer
            return 1


def window_retry_after(
    item: RateLimitItem, previous: int, previous_in: float, current: int, current_in: float
) -> int:
    """Whole seconds until a sliding window counter lets a request through, from the window
    as the script read it (the ``limits`` library's ``get_window_stats``, without its round
    trip): the sooner of the previous window's next count falling out and the current one
    ending."""
    expiry = item.get_expiry()
    soonest = math.inf
    if previous:
        soonest = previous_in % (expiry / previous)
    if current:
        soonest = min(soonest, current_in % expiry)
    return max(1, math.ceil(soonest)) if soonest != math.inf else 1


def admit_ingest(packets: int, users: Mapping[str, int], shared: bool = False) -> list | None:
    """Charge this ingest request, or refuse it with a 429 (then nothing is charged).

    The client address pays ``packets`` and the body's bytes; each user the packets accepted
    in their name. Called once per request, before anything is stored or quarantined. A
    request whose packets go to a shared write (``shared``: ingest coalescing) is not charged
    here: its charges are returned, to be decided with the other requests of that write in
    one round trip (``admit_submissions``), before anything of the write is stored.
    """
    g.ingest_admitted = True
    limits: IngestLimits | None = current_app.extensions.get(EXTENSION_KEY)
    if limits is None:
        return None
    address = client_address()
    charges = [sender_charge(address, packets), Charge("ip_bytes", address, body_bytes())]
    charges += [Charge("user", user, count) for user, count in users.items()]
    if shared:
        return charges
    breached = limits.admit(charges)
    if breached is not None:
        abort(429, **refusal(breached))
    return None


def admit_submissions(submissions: list) -> None:
    """The coalescer's admission: decide the limits of every request of a shared write that
    carries charges, in turn and in one round trip; each one over a limit gets its own 429
    (as ``error``) and is left out of the write."""
    limits: IngestLimits | None = current_app.extensions.get(EXTENSION_KEY)
    charged = [submission for submission in submissions if submission.charges is not None]
    if limits is None or not charged:
        return
    breaches = limits.admit_each(submission.charges for submission in charged)
    for submission, breached in zip(charged, breaches, strict=True):
        if breached is not None:
            submission.error = too_many(breached)


def too_many(breached: Breach) -> HTTPException:
    """The 429 a request gets for a breached limit, to raise on its own thread."""
    try:
        abort(429, **refusal(breached))
    except HTTPException as exc:
        return exc


def sender_charge(address: str, packets: int) -> Charge:
    """Who pays for the request's packets: a verified token's subject (authenticated ingest),
    on its own allowance, so one classroom's NAT address is not one bucket for all; anyone
    else, the client address. (Bytes stay charged to the address either way.)"""
    subject = verified_subject()
    if subject is not None:
        return Charge("subject", subject, packets)
    return Charge("ip", address, packets)


def charge_unadmitted(response):
    """A request the view refused before admitting it (not JSON, a bad envelope, too large)
    still costs its address one packet and its bytes; once over, such requests get 429 too."""
    if (
        request.endpoint != INGEST_ENDPOINT
        or request.method != "POST"
        or g.get("ingest_admitted")
        or response.status_code == 429
    ):
        return response
    limits: IngestLimits = current_app.extensions[EXTENSION_KEY]
    address = client_address()
    breached = limits.admit([Charge("ip", address, 1), Charge("ip_bytes", address, body_bytes())])
    if breached is None:
        return response
    answer = refusal(breached)
    return error_response(429, answer["message"], answer["headers"])


def refusal(breached: Breach) -> dict[str, Any]:
    """A 429's message and its ``Retry-After``, from the breached window."""
    item, seconds = breached.item, breached.retry_after
    what = SCOPES[breached.scope].what
    message = f"Too many {what}: the limit is {item}. Retry after {seconds} s."
    return {"message": message, "headers": {"Retry-After": str(seconds)}}


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
            {scope: config.get(spec.setting) for scope, spec in SCOPES.items()},
            config["BUCKET_RATE_LIMIT_STRATEGY"],
            float(config["BUCKET_REDIS_RETRY_AFTER"]),
        )
        app.after_request(charge_unadmitted)
