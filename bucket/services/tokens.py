"""Bearer tokens on ingest: verify a JWT and judge each packet against it.

The verifier is built once from the configuration (``TokenVerifier.from_config``), which
refuses what cannot work: an unknown mode, ``none`` or an unknown algorithm in the allow-list,
an HMAC algorithm without a secret, a public-key algorithm without a public key or a JWKS, a
key that cannot be read. Each key verifies only its own kind of algorithm: the secret HS*, the
public key and the JWKS RS*/ES*/PS*, so an HMAC check is never keyed with a public key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from bucket.exceptions import IngestAuthMisconfigured

log = logging.getLogger(__name__)

OFF, OBSERVE, REQUIRE = "off", "observe", "require"
MODES = (OFF, OBSERVE, REQUIRE)
VERIFIED, MISSING, INVALID, MISMATCH = "verified", "missing", "invalid", "mismatch"
OUTCOMES = (VERIFIED, MISSING, INVALID, MISMATCH)
REFUSALS = (MISSING, INVALID, MISMATCH)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
)
# A JWKS URL asked again for an unknown ``kid`` at most this often: a stream of tokens with
# made-up kids must not turn into a stream of fetches.
JWKS_MIN_REFRESH_SECONDS = 30.0
# Verified tokens kept per process (services/tokens.TokenVerifier.check), and for how long at
# most: a key removed from a JWKS stops verifying the tokens it signed within this time.
CACHE_SIZE = 10_000
CACHE_SECONDS = 300.0


@dataclass(frozen=True)
class TokenCheck:
    """What a request's bearer token proves: ``verified`` with its subject (and session), or
    ``missing``/``invalid`` with a short reason that names no key."""

    outcome: str
    subject: str | None = None
    session: str | None = None
    reason: str = ""


NO_TOKEN = TokenCheck(MISSING, reason="no bearer token")


def mode_of(config: Mapping[str, Any]) -> str:
    """``BUCKET_INGEST_AUTH`` as the verifier reads it (``off`` when unset)."""
    return (config.get("BUCKET_INGEST_AUTH") or OFF).strip().lower()


@dataclass(frozen=True)
class PacketAuth:
    """One packet's outcome, as stored with it."""

    outcome: str
    subject: str | None
    reason: str = ""


class JwksKeys:
    """The keys of a JWKS document (a file or a URL), by ``kid``: fetched with a timeout,
    cached for ``cache_seconds``, fetched again on an unknown ``kid`` (at most every
    JWKS_MIN_REFRESH_SECONDS), never while holding up requests whose key is cached."""

    def __init__(self, location: str, timeout: float, cache_seconds: float) -> None:
        self.location = location
        self.is_url = location.startswith(("http://", "https://"))
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = self._tried_at = -1e18
        self._lock = threading.Lock()
        self._refreshed = threading.Condition(self._lock)
        self._refreshing = False  # one fetch at a time, outside the lock
        if not self.is_url:
            self._keys = self._load()  # a file must be readable now: fail at start, not later
            self._fetched_at = self._tried_at = time.monotonic()

    def _read(self) -> str:
        if self.is_url:
            request = urllib.request.Request(self.location, headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                return answer.read(1024 * 1024).decode()
        return Path(self.location.removeprefix("file://")).read_text()

    def _load(self) -> dict[str | None, jwt.PyJWK]:
        try:
            document = json.loads(self._read())
            keys = {}
            for data in document.get("keys", []):
                if data.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK(data)
                except jwt.PyJWTError:
                    continue  # a key of a kind we do not verify: ignored, not fatal
                keys[data.get("kid")] = key
            return keys
        except (OSError, ValueError, AttributeError) as exc:
            raise IngestAuthMisconfigured(
                f"BUCKET_INGEST_JWKS_URL: the JWKS at {self.location} cannot be read: "
                f"{exc.__class__.__name__}"
            ) from exc

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        """The cached key for ``kid`` (the only key, for a token naming none)."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for ``kid``; None when the document (fetched again if allowed) has none.

        The document is fetched without holding the lock, by one thread at a time: a request
        whose key is cached never waits for the provider (an expired cache is refreshed aside,
        in a background thread, while the cached keys keep verifying); a request naming a
        ``kid`` not cached fetches, or waits for the fetch under way, at most ``timeout``.
        """
        now = time.monotonic()
        with self._lock:
            found = self._find(kid)
            expired = now - self._fetched_at > self.cache_seconds
            # Tried at most every JWKS_MIN_REFRESH_SECONDS, whatever the outcome: neither
            # made-up kids nor an unreachable provider turn into a fetch per request.
            due = (
                (expired or found is None)
                and not self._refreshing
                and now - self._tried_at > JWKS_MIN_REFRESH_SECONDS
            )
            if due:
                self._refreshing, self._tried_at = True, now
            elif found is None and self._refreshing:
                self._refreshed.wait_for(lambda: not self._refreshing, timeout=self.timeout)
                return self._find(kid)
        if not due:
            return found
        if found is not None:
            threading.Thread(target=self._refresh, name="jwks-refresh", daemon=True).start()
            return found
        self._refresh()
        with self._lock:
            return self._find(kid)

    def _refresh(self) -> None:
        """Fetch the document (no lock held) and publish its keys; wake the waiting requests."""
        keys = None
        try:
            keys = self._load()
        except IngestAuthMisconfigured as exc:
            # Unreachable: the keys fetched before stay in use until it answers again.
            log.warning("JWKS unavailable, keeping %d keys: %s", len(self._keys), exc)
        except Exception:  # noqa: BLE001 - a refresh must never leave _refreshing set
            log.exception("JWKS refresh failed, keeping %d keys", len(self._keys))
        with self._lock:
            if keys is not None:
                self._keys, self._fetched_at = keys, time.monotonic()
            self._refreshing = False
            self._refreshed.notify_all()


def read_public_key(value: str) -> str:
    """PEM text as given, or the contents of the file it names."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise IngestAuthMisconfigured(
            f"BUCKET_INGEST_JWT_PUBLIC_KEY: neither PEM text nor a readable file ({exc.strerror})"
        ) from exc


class TokenVerifier:
    """Checks bearer tokens against the configured keys, algorithms and claims."""

    def __init__(
        self,
        mode: str,
        algorithms: frozenset[str],
        secret: str | None = None,
        public_key: Any = None,
        jwks: JwksKeys | None = None,
        user_claim: str = "sub",
        session_claim: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        self.mode = mode
        self.algorithms = algorithms
        self.secret = secret
        self.public_key = public_key
        self.jwks = jwks
        self.user_claim = user_claim
        self.session_claim = session_claim
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        required = ["exp", user_claim]
        if session_claim:
            required.append(session_claim)
        self.options = {"require": required, "verify_aud": audience is not None}
        # Verified tokens, by their exact text, until they expire (at most CACHE_SECONDS): a
        # bridge sends the same token every 5 s for hours, and a signature check is the one
        # cost authenticated ingest adds to a packet. Only valid tokens are kept, so a flood of
        # forged ones cannot fill it; it is bounded all the same.
        self._verified: dict[str, tuple[float, TokenCheck]] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TokenVerifier:
        """The verifier the configuration describes; ``IngestAuthMisconfigured`` saying what
        is wrong otherwise (the service does not start)."""
        mode = mode_of(config)
        if mode not in MODES:
            raise IngestAuthMisconfigured(
                f"BUCKET_INGEST_AUTH must be one of {', '.join(MODES)}, not {mode!r}"
            )
        secret = config.get("BUCKET_INGEST_JWT_SECRET") or None
        pem = config.get("BUCKET_INGEST_JWT_PUBLIC_KEY") or None
        jwks_url = config.get("BUCKET_INGEST_JWKS_URL") or None
        if mode == OFF:
            return cls(OFF, frozenset())
        if secret and secret.lstrip().startswith(("-----BEGIN", "ssh-")):
            raise IngestAuthMisconfigured(
                "BUCKET_INGEST_JWT_SECRET holds a key in PEM/SSH form: a public key never keys "
                "an HMAC check; give it as BUCKET_INGEST_JWT_PUBLIC_KEY"
            )
        if not (secret or pem or jwks_url):
            raise IngestAuthMisconfigured(
                f"BUCKET_INGEST_AUTH={mode} needs a key: set BUCKET_INGEST_JWT_SECRET, "
                "BUCKET_INGEST_JWT_PUBLIC_KEY or BUCKET_INGEST_JWKS_URL"
            )
        algorithms = allowed_algorithms(
            config.get("BUCKET_INGEST_JWT_ALGORITHMS") or [], bool(secret), bool(pem or jwks_url)
        )
        public_key = None
        if pem:
            public_key = load_public_key(read_public_key(pem), algorithms)
        jwks = None
        if jwks_url:
            jwks = JwksKeys(
                jwks_url,
                float(config.get("BUCKET_INGEST_JWKS_TIMEOUT", 3.0)),
                float(config.get("BUCKET_INGEST_JWKS_CACHE_SECONDS", 300.0)),
            )
        leeway = float(config.get("BUCKET_INGEST_JWT_LEEWAY", 30.0))
        if leeway < 0:
            raise IngestAuthMisconfigured("BUCKET_INGEST_JWT_LEEWAY must not be negative")
        return cls(
            mode,
            algorithms,
            secret=secret,
            public_key=public_key,
            jwks=jwks,
            user_claim=config.get("BUCKET_INGEST_JWT_USER_CLAIM") or "sub",
            session_claim=config.get("BUCKET_INGEST_JWT_SESSION_CLAIM") or None,
            audience=config.get("BUCKET_INGEST_JWT_AUDIENCE") or None,
            issuer=config.get("BUCKET_INGEST_JWT_ISSUER") or None,
            leeway=leeway,
        )

    @property
    def enabled(self) -> bool:
        return self.mode != OFF

    def _key_for(self, algorithm: str, kid: str | None) -> Any:
        """The key that may verify ``algorithm``, never a public key for HMAC."""
        if algorithm in HMAC_ALGORITHMS:
            return self.secret
        if self.public_key is not None:
            return self.public_key
        if self.jwks is not None:
            found = self.jwks.key(kid)
            if found is None or (found.algorithm_name or algorithm) != algorithm:
                return None
            return found.key
        return None

    def check(self, token: str | None) -> TokenCheck:
        """What the token proves (never raises for a bad token)."""
        if not token:
            return NO_TOKEN
        cached = self._verified.get(token)
        if cached is not None and time.time() < cached[0]:
            return cached[1]
        checked, expires = self._check(token)
        if checked.outcome == VERIFIED:
            with self._cache_lock:
                if len(self._verified) >= CACHE_SIZE:
                    self._verified.clear()
                self._verified[token] = (expires, checked)
        return checked

    def _check(self, token: str) -> tuple[TokenCheck, float]:
        """The full check, and until when a verified answer may be reused."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return TokenCheck(INVALID, reason="not a JWT"), 0.0
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            return TokenCheck(INVALID, reason="algorithm not allowed"), 0.0
        key = self._key_for(algorithm, header.get("kid"))
        if key is None:
            return TokenCheck(INVALID, reason="unknown key id"), 0.0
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self.options,
            )
        except jwt.ExpiredSignatureError:
            return TokenCheck(INVALID, reason="expired"), 0.0
        except jwt.ImmatureSignatureError:
            return TokenCheck(INVALID, reason="not yet valid"), 0.0
        except jwt.InvalidAudienceError:
            return TokenCheck(INVALID, reason="wrong audience"), 0.0
        except jwt.InvalidIssuerError:
            return TokenCheck(INVALID, reason="wrong issuer"), 0.0
        except jwt.InvalidSignatureError:
            return TokenCheck(INVALID, reason="bad signature"), 0.0
        except jwt.MissingRequiredClaimError as exc:
            return TokenCheck(INVALID, reason=f"missing claim {exc.claim}"), 0.0
        except (jwt.PyJWTError, ValueError, TypeError):
            return TokenCheck(INVALID, reason="malformed"), 0.0
        subject = claims.get(self.user_claim)
        session = claims.get(self.session_claim) if self.session_claim else None
        if not isinstance(subject, str | int) or isinstance(subject, bool):
            return TokenCheck(INVALID, reason=f"claim {self.user_claim} is not a string"), 0.0
        until = min(float(claims["exp"]) + self.leeway, time.time() + CACHE_SECONDS)
        checked = TokenCheck(VERIFIED, str(subject), None if session is None else str(session))
        return checked, until

    def judge(self, token: TokenCheck, packet: Mapping[str, Any]) -> PacketAuth:
        """One packet under the token: ``mismatch`` when a valid token names another user (or,
        with the session claim configured, another session)."""
        if token.outcome != VERIFIED:
            return PacketAuth(token.outcome, None, token.reason)
        user = packet.get("user_id") or packet.get("employee_id")
        if user != token.subject:
            return PacketAuth(MISMATCH, token.subject, "the token is another user's")
        if self.session_claim and packet.get("session_id") != token.session:
            return PacketAuth(MISMATCH, token.subject, "the token is another session's")
        return PacketAuth(VERIFIED, token.subject)


def allowed_algorithms(listed: list[str], has_secret: bool, has_public: bool) -> frozenset[str]:
    """The allow-list: as configured (checked against the keys), or by default HS256 with a
    secret and RS256, ES256 with a public key or JWKS."""
    if not listed:
        chosen = set()
        if has_secret:
            chosen.add("HS256")
        if has_public:
            chosen |= {"RS256", "ES256"}
        return frozenset(chosen)
    known = set(get_default_algorithms()) - {"none"}
    for name in listed:
        if name.lower() == "none":
            raise IngestAuthMisconfigured("BUCKET_INGEST_JWT_ALGORITHMS must never allow 'none'")
        if name not in known:
            raise IngestAuthMisconfigured(f"BUCKET_INGEST_JWT_ALGORITHMS: unknown algorithm {name}")
        if name in HMAC_ALGORITHMS and not has_secret:
            raise IngestAuthMisconfigured(
                f"BUCKET_INGEST_JWT_ALGORITHMS lists {name}, which needs BUCKET_INGEST_JWT_SECRET"
            )
        if name not in HMAC_ALGORITHMS and not has_public:
            raise IngestAuthMisconfigured(
                f"BUCKET_INGEST_JWT_ALGORITHMS lists {name}, which needs "
                "BUCKET_INGEST_JWT_PUBLIC_KEY or BUCKET_INGEST_JWKS_URL"
            )
    return frozenset(listed)


def load_public_key(pem: str, algorithms: frozenset[str]) -> Any:
    """Parse the PEM once, as the first public-key algorithm allowed that accepts it."""
    chosen = sorted(algorithms - HMAC_ALGORITHMS)
    if not chosen:
        raise IngestAuthMisconfigured(
            "BUCKET_INGEST_JWT_PUBLIC_KEY is set but BUCKET_INGEST_JWT_ALGORITHMS allows no "
            "public-key algorithm"
        )
    for name in chosen:
        try:
            return get_default_algorithms()[name].prepare_key(pem)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
    raise IngestAuthMisconfigured(
        "BUCKET_INGEST_JWT_PUBLIC_KEY is not a public key in PEM form for " + ", ".join(chosen)
    )
