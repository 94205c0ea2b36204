"""PRANA Bucket: durable, deduplicating packet store between PRANA browsers and Karma Tracker."""

from __future__ import annotations

from typing import Any

from flask import Flask

# The extension objects are built at import, before logging is configured: Flask-Migrate brings
# Alembic, which logs its plugins as it loads. (Imported as a module: the factory's own names
# would be overwritten by the subpackages ``bucket.api`` and ``bucket.queue`` when they load.)
import bucket.extensions  # noqa: F401
from bucket.database import configure_database, tune_engine
from config import Config, TestingConfig


def create_app(overrides: dict[str, Any] | None = None, testing: bool = False) -> Flask:
    """Build the application: configuration, extensions, blueprints, handlers, commands."""
    app = Flask(__name__, instance_relative_config=True)
    configure(app, overrides, testing)
    configure_logging(app)
    register_json(app)
    register_packet_rules(app)
    register_request_hooks(app)
    register_extensions(app)
    register_background_work(app)
    register_ingest_coalescing(app)
    register_ingest_auth(app)
    register_rate_limits(app)
    register_blueprints(app)
    document_api(app)
    register_error_handlers(app)
    register_shell_context(app)
    register_commands(app)
    return app


def configure(app: Flask, overrides: dict[str, Any] | None, testing: bool) -> None:
    """Load settings from the environment, then explicit overrides, then the database wiring."""
    app.config.from_object(TestingConfig() if testing else Config())
    app.config.update(overrides or {})
    app.config["MAX_CONTENT_LENGTH"] = app.config["BUCKET_MAX_BODY_BYTES"]
    configure_database(app)


def register_json(app: Flask) -> None:
    """Serialise responses with orjson."""
    from bucket.jsonutil import OrjsonProvider

    app.json_provider_class = OrjsonProvider
    app.json = OrjsonProvider(app)


def register_packet_rules(app: Flask) -> None:
    """The packet rules in force: cognitive states, the size of raw_signals and how deep it may
    nest, when restricted its keys, and how far ahead a client clock may be (BUCKET_*)."""
    from bucket.jsonutil import MAX_DEPTH_LIMIT
    from bucket.schemas import PacketRules

    config = app.config
    depth = config["BUCKET_MAX_JSON_DEPTH"]
    if not 1 <= depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"BUCKET_MAX_JSON_DEPTH must be between 1 and {MAX_DEPTH_LIMIT}.")
    app.extensions["bucket.packet_rules"] = PacketRules(
        tuple(config["BUCKET_COGNITIVE_STATES"]),
        config["BUCKET_RAW_SIGNALS_MAX_BYTES"],
        depth,
        config.get("BUCKET_MAX_CLOCK_SKEW"),
        tuple(config.get("BUCKET_RAW_SIGNALS_KEYS") or ()),
    )


def register_extensions(app: Flask) -> None:
    """Bind db, migrations, the queue service, CORS and the API object."""
    from bucket import models  # noqa: F401 - registers the tables on the metadata
    from bucket.extensions import api, cors, db, migrate, queue

    db.init_app(app)
    migrate.init_app(app, db, directory=str(app.root_path + "/../migrations"))
    queue.init_app(app)
    cors.init_app(
        app,
        resources={r"/api/v1/bucket/prana/ingest": {"origins": app.config["BUCKET_CORS_ORIGINS"]}},
        allow_headers=[
            "Content-Type",
            "X-CLIENT-TIMESTAMP",
            "X-PRANA-BATCH-ID",
            "Idempotency-Key",
            "Authorization",
        ],
        expose_headers=["Retry-After", "X-Request-ID"],
        methods=["POST", "OPTIONS"],
        max_age=600,
    )
    api.init_app(app)
    with app.app_context():
        for engine in db.engines.values():
            tune_engine(engine)


def register_background_work(app: Flask) -> None:
    """The bookkeeper's periodic tasks, in the order each round runs them (gunicorn starts it)."""
    from bucket.bookkeeper import PeriodicTask
    from bucket.extensions import bookkeeper
    from bucket.services import activity, partitions, quarantine
    from bucket.services.audit.sealing import seal_backlog
    from bucket.services.bookkeeping import book_new_packets

    seal_every = app.config["BUCKET_AUDIT_SEAL_INTERVAL"]
    bookkeeper.init_app(
        app,
        [
            PeriodicTask("bookkeeping", book_new_packets),
            # Sealing stops at the horizon the booking above just moved.
            PeriodicTask("sealing", seal_backlog, seal_every if seal_every > 0 else -1),
            PeriodicTask("quarantine expiry", quarantine.expire, EXPIRY_INTERVAL),
            PeriodicTask("roll-up pruning", activity.prune, EXPIRY_INTERVAL),
            # PostgreSQL: the day partitions ahead, and packets out of the default partition.
            PeriodicTask("partitions", partitions.ensure_partitions, PARTITION_INTERVAL),
        ],
    )


def register_ingest_coalescing(app: Flask) -> None:
    """Concurrent ingests (BUCKET_INGEST_COALESCE) and acknowledgements (BUCKET_ACK_COALESCE)
    of this worker share writes, counted."""
    from bucket.services.coalescing import ACK_EXTENSION_KEY, init_coalescer
    from bucket.services.delivery.acks import write_acks
    from bucket.services.ingest import write_submissions
    from bucket.web import metrics
    from bucket.web.ratelimit import admit_submissions

    for setting in ("BUCKET_INGEST_COALESCE_MAX", "BUCKET_ACK_COALESCE_MAX"):
        if app.config[setting] < 1:
            raise ValueError(f"{setting} must be at least 1.")
    init_coalescer(
        app,
        write_submissions,
        metrics.note_ingest_commit,
        metrics.note_ingest_waiting,
        admit=admit_submissions,
    )
    init_coalescer(
        app,
        write_acks,
        metrics.note_ack_commit,
        metrics.note_ack_waiting,
        setting="BUCKET_ACK_COALESCE",
        key=ACK_EXTENSION_KEY,
    )


# Quarantine entries past BUCKET_QUARANTINE_RETENTION_DAYS and old per-minute roll-ups are
# dropped this often (seconds).
EXPIRY_INTERVAL = 60.0
# Day partitions are checked (and made ahead, and the default partition emptied) this often.
PARTITION_INTERVAL = 300.0


def register_blueprints(app: Flask) -> None:
    """Mount the HTTP API and register its schemas in the OpenAPI document."""
    from bucket.api import (
        audit,
        console,
        consumer,
        health,
        ingest,
        metrics,
        operations,
        quarantine,
        status,
    )
    from bucket.extensions import api
    from bucket.schemas import (
        AckBatchSchema,
        AckSchema,
        BatchEnvelopeSchema,
        BatchResultSchema,
        IngestResultSchema,
        PacketSchema,
    )

    for name, schema in (
        ("Packet", PacketSchema),
        ("BatchEnvelope", BatchEnvelopeSchema),
        ("IngestResult", IngestResultSchema),
        ("BatchResult", BatchResultSchema),
        ("Ack", AckSchema),
        ("AckBatch", AckBatchSchema),
    ):
        if name not in api.spec.components.schemas:
            api.spec.components.schema(name, schema=schema)
    for module in (ingest, consumer, status, operations, quarantine, audit, health, metrics):
        api.register_blueprint(module.blp)
    app.register_blueprint(console.bp)  # a page, not part of the API document


def register_error_handlers(app: Flask) -> None:
    """One JSON error shape for every failure."""
    from bucket.web.errors import register_error_handlers as install

    install(app)


def register_shell_context(app: Flask) -> None:
    """Pre-load what an operator needs in ``flask shell``."""
    from bucket.shell import shell_context

    app.shell_context_processor(shell_context)


def register_commands(app: Flask) -> None:
    """``flask bucket …`` operator commands."""
    from bucket.cli import bucket_cli

    app.cli.add_command(bucket_cli)


def configure_logging(app: Flask) -> None:
    """JSON log lines on stderr at LOG_LEVEL, unless the host configured logging already."""
    from bucket.web.request_log import configure_logging as install

    install(app)


def register_request_hooks(app: Flask) -> None:
    """Request id and log line, request metrics, trusted proxies, the consumer token, security
    headers (in order)."""
    from bucket.web.auth import init_auth
    from bucket.web.metrics import init_metrics
    from bucket.web.ratelimit import trust_proxies
    from bucket.web.request_log import init_request_log
    from bucket.web.security_headers import init_security_headers

    init_request_log(app)
    init_metrics(app)
    trust_proxies(app)
    init_auth(app)
    init_security_headers(app)


def register_ingest_auth(app: Flask) -> None:
    """Bearer tokens on ingest (BUCKET_INGEST_AUTH); a configuration that cannot work stops here."""
    from bucket.web.ingest_auth import IngestAuth

    IngestAuth(app)


def register_rate_limits(app: Flask) -> None:
    """Ingest limits per client address and per user (BUCKET_RATE_LIMIT_*)."""
    from bucket.web.ratelimit import RateLimits

    RateLimits(app)


def document_api(app: Flask) -> None:
    """Complete the OpenAPI document: security, refusals and limits that no view declares."""
    from bucket.api.docs import complete_spec
    from bucket.extensions import api

    complete_spec(app, api.spec)
