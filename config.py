"""Configuration read from the environment, with development defaults and a testing variant."""

from __future__ import annotations

import os


def env_str(name: str, default: str | None = None) -> str | None:
    """Return a stripped environment value, treating an empty string as unset."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int) -> int:
    """Parse an integer variable; a malformed value fails loudly at start-up."""
    value = env_str(name)
    return default if value is None else int(value)


def env_float(name: str, default: float) -> float:
    """Parse a float variable; a malformed value fails loudly at start-up."""
    value = env_str(name)
    return default if value is None else float(value)


def env_bool(name: str, default: bool) -> bool:
    """Parse a yes/no variable (1/true/yes/on)."""
    value = env_str(name)
    if value is None:
        return default
    return value.lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: list[str]) -> list[str]:
    """Parse a comma-separated variable into its non-empty items."""
    value = env_str(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def normalize_database_url(url: str | None) -> str | None:
    """Accept Render's ``postgres://`` URLs and pick the psycopg 3 driver for PostgreSQL."""
    if not url:
        return None
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Config:
    """Production and development settings, all overridable from the environment."""

    def __init__(self) -> None:
        self.SQLALCHEMY_DATABASE_URI = normalize_database_url(env_str("DATABASE_URL"))
        self.REDIS_URL = env_str("REDIS_URL")
        self.BUCKET_REDIS_PREFIX = env_str("BUCKET_REDIS_PREFIX", "prana-bucket")
        self.BUCKET_CORS_ORIGINS = env_list("BUCKET_CORS_ORIGINS", ["*"])
        self.BUCKET_CONSUMER_TOKEN = env_list("BUCKET_CONSUMER_TOKEN", [])
        # /metrics is open unless asked: its own tokens, or the consumer token's (README,
        # "Operator endpoints").
        self.BUCKET_METRICS_TOKEN = env_list("BUCKET_METRICS_TOKEN", [])
        self.BUCKET_METRICS_REQUIRE_TOKEN = env_bool("BUCKET_METRICS_REQUIRE_TOKEN", False)
        self.BUCKET_VISIBILITY_TIMEOUT = env_int("BUCKET_VISIBILITY_TIMEOUT", 60)
        self.BUCKET_MAX_ATTEMPTS = env_int("BUCKET_MAX_ATTEMPTS", 5)
        self.BUCKET_RETRY_BACKOFF = env_float("BUCKET_RETRY_BACKOFF", 10.0)
        self.BUCKET_RETRY_BACKOFF_MAX = env_float("BUCKET_RETRY_BACKOFF_MAX", 3600.0)
        self.BUCKET_MAX_BODY_BYTES = env_int("BUCKET_MAX_BODY_BYTES", 1024 * 1024)
        self.BUCKET_MAX_BATCH_SIZE = env_int("BUCKET_MAX_BATCH_SIZE", 500)
        # Ingest coalescing: concurrent requests of one worker share one statement and commit,
        # at most this many packets per shared write (a larger batch is written on its own).
        self.BUCKET_INGEST_COALESCE = env_bool("BUCKET_INGEST_COALESCE", True)
        self.BUCKET_INGEST_COALESCE_MAX = env_int("BUCKET_INGEST_COALESCE_MAX", 64)
        # Acknowledgement coalescing: concurrent mark-processed requests of one worker naming
        # different packets share one statement and commit, at most this many results per write.
        self.BUCKET_ACK_COALESCE = env_bool("BUCKET_ACK_COALESCE", False)
        self.BUCKET_ACK_COALESCE_MAX = env_int("BUCKET_ACK_COALESCE_MAX", 500)
        # One packet's raw_signals as JSON; a larger one is refused (422) and quarantined.
        self.BUCKET_RAW_SIGNALS_MAX_BYTES = env_int("BUCKET_RAW_SIGNALS_MAX_BYTES", 16384)
        # PostgreSQL: key sets of raw_signals kept in the dictionary at most (migration 0020,
        # bucket/services/signals.py); a packet whose set is not in it once full is stored whole.
        self.BUCKET_SIGNAL_KEY_SETS_MAX = env_int("BUCKET_SIGNAL_KEY_SETS_MAX", 1000)
        # Levels a packet's field may nest (raw_signals itself is level 1); deeper is a 422 and
        # the packet goes to the quarantine. At most 128 (bucket/jsonutil.py: MAX_DEPTH_LIMIT).
        self.BUCKET_MAX_JSON_DEPTH = env_int("BUCKET_MAX_JSON_DEPTH", 32)
        # Seconds a request (head and body) may take to arrive once its connection is readable;
        # then 408 (bucket/web/gunicorn_worker.py reads it, not the app).
        self.BUCKET_REQUEST_READ_TIMEOUT = env_float("BUCKET_REQUEST_READ_TIMEOUT", 10.0)
        # Seconds between a worker's returns of its freed heap to the system (glibc's
        # malloc_trim, bucket/web/heap.py); 0 never returns it.
        self.BUCKET_HEAP_TRIM_INTERVAL = env_float("BUCKET_HEAP_TRIM_INTERVAL", 60.0)
        # What cognitive_state may hold (the legacy EMS states are accepted besides).
        self.BUCKET_COGNITIVE_STATES = env_list(
            "BUCKET_COGNITIVE_STATES",
            ["DEEP_FOCUS", "ON_TASK", "THINKING", "IDLE", "DISTRACTED", "AWAY", "OFF_TASK"],
        )
        # The quarantine of refused packets (README, "The quarantine"): anyone can post, so
        # it is bounded; the least recently seen entries are dropped first.
        self.BUCKET_QUARANTINE_MAX_ROWS = env_int("BUCKET_QUARANTINE_MAX_ROWS", 100_000)
        self.BUCKET_QUARANTINE_MAX_BYTES = env_int("BUCKET_QUARANTINE_MAX_BYTES", 128 * 1024 * 1024)
        self.BUCKET_QUARANTINE_RETENTION_DAYS = env_float("BUCKET_QUARANTINE_RETENTION_DAYS", 30.0)
        self.BUCKET_LONG_POLL_INTERVAL = env_float("BUCKET_LONG_POLL_INTERVAL", 0.5)
        self.BUCKET_RETENTION_DAYS = env_int("BUCKET_RETENTION_DAYS", 30)
        self.BUCKET_PURGE_BATCH_SIZE = env_int("BUCKET_PURGE_BATCH_SIZE", 1000)
        # PostgreSQL: day partitions of packets made this many days ahead (README, "Retention").
        self.BUCKET_PARTITION_DAYS_AHEAD = env_int("BUCKET_PARTITION_DAYS_AHEAD", 7)
        self.BUCKET_BOOKKEEPING_INTERVAL = env_float("BUCKET_BOOKKEEPING_INTERVAL", 2.0)
        # The audit log (README, "The audit trail"): the workers seal new packets this often
        # (0: only `flask bucket seal` does), at most this many per seal.
        self.BUCKET_AUDIT_SEAL_INTERVAL = env_float("BUCKET_AUDIT_SEAL_INTERVAL", 5.0)
        self.BUCKET_AUDIT_SEAL_MAX_PACKETS = env_int("BUCKET_AUDIT_SEAL_MAX_PACKETS", 50_000)
        # Operations: proxies, rate limits, logs (README, "Configuration").
        self.BUCKET_TRUSTED_PROXIES = env_int("BUCKET_TRUSTED_PROXIES", 0)
        self.BUCKET_RATE_LIMIT_ENABLED = env_bool("BUCKET_RATE_LIMIT_ENABLED", True)
        self.BUCKET_RATE_LIMIT_INGEST_PER_IP = env_str(
            "BUCKET_RATE_LIMIT_INGEST_PER_IP", "9000 per minute"
        )
        self.BUCKET_RATE_LIMIT_INGEST_PER_USER = env_str(
            "BUCKET_RATE_LIMIT_INGEST_PER_USER", "600 per minute"
        )
        # Bytes of ingest bodies per client address, stored or refused alike (32 MiB a minute).
        self.BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP = env_str(
            "BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP", "33554432 per minute"
        )
        self.BUCKET_RATE_LIMIT_STRATEGY = env_str(
            "BUCKET_RATE_LIMIT_STRATEGY", "sliding-window-counter"
        )
        self.BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT = env_str(
            "BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT", "600 per minute"
        )
        # Authenticated ingest (README, "Authenticated ingest"): bearer JWTs on ingest, checked
        # and bound to each packet's user; bucket/web/ingest_auth.py refuses to start on a
        # configuration that cannot work.
        self.BUCKET_INGEST_AUTH = env_str("BUCKET_INGEST_AUTH", "off")
        self.BUCKET_INGEST_JWT_SECRET = env_str("BUCKET_INGEST_JWT_SECRET")
        self.BUCKET_INGEST_JWT_PUBLIC_KEY = env_str("BUCKET_INGEST_JWT_PUBLIC_KEY")
        self.BUCKET_INGEST_JWKS_URL = env_str("BUCKET_INGEST_JWKS_URL")
        self.BUCKET_INGEST_JWKS_TIMEOUT = env_float("BUCKET_INGEST_JWKS_TIMEOUT", 3.0)
        self.BUCKET_INGEST_JWKS_CACHE_SECONDS = env_float("BUCKET_INGEST_JWKS_CACHE_SECONDS", 300.0)
        self.BUCKET_INGEST_JWT_ALGORITHMS = env_list("BUCKET_INGEST_JWT_ALGORITHMS", [])
        self.BUCKET_INGEST_JWT_USER_CLAIM = env_str("BUCKET_INGEST_JWT_USER_CLAIM", "sub")
        self.BUCKET_INGEST_JWT_SESSION_CLAIM = env_str("BUCKET_INGEST_JWT_SESSION_CLAIM")
        self.BUCKET_INGEST_JWT_AUDIENCE = env_str("BUCKET_INGEST_JWT_AUDIENCE")
        self.BUCKET_INGEST_JWT_ISSUER = env_str("BUCKET_INGEST_JWT_ISSUER")
        self.BUCKET_INGEST_JWT_LEEWAY = env_float("BUCKET_INGEST_JWT_LEEWAY", 30.0)
        # Freshness of the client's clock (seconds): further in the future is refused (422),
        # older than BUCKET_STALE_AFTER is stored with ``stale: true``.
        self.BUCKET_MAX_CLOCK_SKEW = env_float("BUCKET_MAX_CLOCK_SKEW", 86400.0)
        self.BUCKET_STALE_AFTER = env_float("BUCKET_STALE_AFTER", 3600.0)
        # The keys raw_signals may carry; empty: free-form (the contract's default).
        self.BUCKET_RAW_SIGNALS_KEYS = env_list("BUCKET_RAW_SIGNALS_KEYS", [])
        self.BUCKET_REQUEST_LOG = env_bool("BUCKET_REQUEST_LOG", True)
        self.LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
        self.LOG_FORMAT = env_str("LOG_FORMAT", "json")
        # Per engine (queue and ingest each have one). Connections open on demand and stay open
        # up to the pool size: one per thread, so a busy worker never opens and closes a
        # connection per request (overflow connections are closed on return: measured 50 new
        # PostgreSQL sessions a second with a pool smaller than the thread count).
        self.BUCKET_DB_POOL_SIZE = env_int("BUCKET_DB_POOL_SIZE", env_int("BUCKET_THREADS", 16))
        self.BUCKET_DB_MAX_OVERFLOW = env_int("BUCKET_DB_MAX_OVERFLOW", 4)
        # What riding through a PostgreSQL restart, crash or failover relies on (README,
        # "When the database goes away"; tests/test_fault_restart.py):
        self.BUCKET_DB_POOL = {
            # No ping per checkout (a round trip on every request): each checkout polls the
            # socket instead (bucket/database.py), which finds the sessions a restart or a
            # crash closed; a connection found dead only by its statement fails that one
            # request with 503, and the pool then replaces every connection opened before it
            # (services/sql.py, and SQLAlchemy for its own statements).
            "pool_pre_ping": False,
            # Wait at most this long for a free connection, then answer 503 with Retry-After
            # instead of holding the request past the bridge's 10 s timeout.
            "pool_timeout": 5,
            # Reopen connections older than this: a managed database's proxy drops idle ones.
            "pool_recycle": 1800,
        }
        self.BUCKET_DB_CONNECT_ARGS = {
            # An address that does not answer (a failover in progress) fails fast.
            "connect_timeout": 3,
            # A server that vanished without closing its sockets (host lost, network cut) is
            # noticed within about 10 s instead of the kernel's two hours.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 10000,
            # Text and floats come back exactly, whatever the server's defaults say: the audit
            # log re-encodes stored rows in Python and compares them with what PostgreSQL
            # sealed (bucket/services/audit/content.py).
            "client_encoding": "UTF8",
            "options": "-c extra_float_digits=3",
        }
        self.BUCKET_REDIS_RETRY_AFTER = env_float("BUCKET_REDIS_RETRY_AFTER", 1.0)
        self.SQLALCHEMY_TRACK_MODIFICATIONS = False
        # flask-smorest / OpenAPI
        self.API_TITLE = "PRANA Bucket"
        self.API_VERSION = "1.0.0"
        self.OPENAPI_VERSION = "3.0.3"
        self.OPENAPI_URL_PREFIX = "/"
        self.OPENAPI_JSON_PATH = "openapi.json"
        self.OPENAPI_SWAGGER_UI_PATH = "docs"
        # Swagger UI's assets are vendored in bucket/static/vendor/swagger-ui/ and served by the
        # app itself, so /docs works offline; BUCKET_SWAGGER_UI_URL may point elsewhere (a CDN).
        # flask-smorest appends the file names to it, so it must end with "/".
        self.OPENAPI_SWAGGER_UI_URL = env_str("BUCKET_SWAGGER_UI_URL", "/static/vendor/swagger-ui/")
        self.TESTING = False


class TestingConfig(Config):
    """Settings for the test suite: overridden per test through ``create_app(overrides)``."""

    def __init__(self) -> None:
        super().__init__()
        self.TESTING = True
        # Suites ingest thousands of packets from one address and user; rate limit tests opt in.
        self.BUCKET_RATE_LIMIT_ENABLED = env_bool("BUCKET_RATE_LIMIT_ENABLED", False)
