"""Database wiring: engine options per backend, the autocommit pool, SQLite's pragmas."""

from __future__ import annotations

import os
import select
from typing import Any

import orjson
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from bucket.jsonutil import canonical_json
from bucket.sqlite_turns import TurnTakingConnection, turns_for

# The pool of the hand-written hot statements (services/sql.py), in autocommit.
AUTOCOMMIT_BIND = "autocommit"

# The hot statements must reach packets through an index range in index order whatever the
# statistics say: a backlog grows faster than autovacuum re-analyses, and on stale statistics
# the planner chose a bitmap scan and a sort of every waiting row for each poll (measured:
# 160 ms per poll and 110 ms per acknowledgement with 200,000 waiting), and a sequential scan
# to count the packets stored since the last booking. Every statement of the autocommit pool
# reaches a bounded number of rows through an index (their joins are written so the small
# side drives: services/delivery/claims.py), so sorts, bitmaps, table scans and merge joins
# are off for its connections (tests/test_scaling.py checks the plans on a stale and a fresh,
# growing table).
# JIT is off
# too: the penalty those settings add to the tiny counter table's scan pushed plans over
# jit_above_cost, and compiling a statement took longer than a thousand executions of it.
# And each prepared statement is planned once per connection (a generic plan): planning the
# acknowledgement took 1 ms, longer than running it, and the default would re-plan it for
# every execution whenever a custom plan looks cheaper.
QUEUE_PLANNER_SETTINGS = (
    "-c enable_bitmapscan=off -c enable_sort=off -c enable_seqscan=off -c enable_mergejoin=off "
    "-c jit=off -c plan_cache_mode=force_generic_plan"
)


def configure_database(app: Flask) -> None:
    """Fill in the SQLAlchemy settings the configuration leaves to the backend."""
    config = app.config
    if not config.get("SQLALCHEMY_DATABASE_URI"):
        os.makedirs(app.instance_path, exist_ok=True)
        config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{app.instance_path}/bucket.sqlite3"
    url = config["SQLALCHEMY_DATABASE_URI"]
    # SQL parameters carry packets' content (raw_signals): never in an error message or a log
    # line (bucket/web/errors.py logs a failed statement with its packets' identifiers).
    options: dict[str, Any] = {"json_serializer": canonical_json, "hide_parameters": True}
    if url.startswith("sqlite"):
        options["connect_args"] = {
            "timeout": 30,
            "check_same_thread": False,
            "factory": TurnTakingConnection,
        }
    else:
        options.update(
            pool_size=config["BUCKET_DB_POOL_SIZE"],
            max_overflow=config["BUCKET_DB_MAX_OVERFLOW"],
            connect_args=dict(config["BUCKET_DB_CONNECT_ARGS"]),
            **config["BUCKET_DB_POOL"],
        )
        # The hot paths' own pool, whose connections stay in autocommit: each of their
        # statements is atomic by itself, and no per-request BEGIN/COMMIT round trip is paid.
        base_options = options["connect_args"].get("options", "")
        hot_connect_args = {
            **options["connect_args"],
            "options": f"{base_options} {QUEUE_PLANNER_SETTINGS}".strip(),
        }
        config["SQLALCHEMY_BINDS"] = {
            AUTOCOMMIT_BIND: {
                "url": url,
                "isolation_level": "AUTOCOMMIT",
                **options,
                "connect_args": hot_connect_args,
            }
        }
    config["SQLALCHEMY_ENGINE_OPTIONS"] = {**options, **config.get("SQLALCHEMY_ENGINE_OPTIONS", {})}


def refuse_closed_connection(dbapi_connection, _record, _proxy) -> None:
    """Hand out no pooled connection the server has already closed.

    A server that restarts or crashes closes every session (a fast shutdown first sends each
    one a "terminating connection" notice), and an idle connection then has something to read
    where it should have nothing. One poll of the socket, no round trip, tells; SQLAlchemy
    then drops that connection and checks out (or opens) another, so no request has to fail
    on it. A connection the server dropped silently (host gone, no FIN) is still found by its
    first statement, which fails with 503 and replaces the rest of the pool.
    """
    if dbapi_connection.closed or dbapi_connection.broken:
        raise DisconnectionError("the connection is closed")
    poller = select.poll()  # not select.select: file descriptors may exceed FD_SETSIZE
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("the server closed or spoke on an idle connection")


def tune_engine(engine: Engine) -> None:
    """PostgreSQL: JSON columns decoded by orjson, uuid columns read as their text. SQLite:
    WAL, and BEGIN IMMEDIATE so each transaction's claims and acks are serialised, its writers
    taking turns (sqlite_turns.py)."""
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def on_postgres_connect(dbapi_connection, _record):
            from psycopg.types.json import set_json_loads
            from psycopg.types.string import TextLoader

            set_json_loads(orjson.loads, dbapi_connection)
            # Packet ids are stored as uuid (migration 0016) and handled as strings everywhere:
            # the hand-written statements get the lowercase hyphenated text the service
            # handed out, as they did from varchar, not uuid.UUID objects (models.UuidString
            # accepts either).
            dbapi_connection.adapters.register_loader("uuid", TextLoader)

        event.listen(engine, "checkout", refuse_closed_connection)
        return
    if engine.dialect.name != "sqlite":
        return

    turns = turns_for(engine.url.database or "")

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        if isinstance(dbapi_connection, TurnTakingConnection):
            dbapi_connection.turns = turns
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        dbapi_connection = connection.connection.dbapi_connection
        if isinstance(dbapi_connection, TurnTakingConnection):
            dbapi_connection.begin_immediate()
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
