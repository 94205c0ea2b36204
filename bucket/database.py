"""Database wiring: engine options per backend, ingest's autocommit pool, SQLite's pragmas."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bucket.jsonutil import orjson_dumps
from bucket.services.dialect import AUTOCOMMIT_BIND


def configure_database(app: Flask) -> None:
    """Fill in the SQLAlchemy settings the configuration leaves to the backend."""
    config = app.config
    if not config.get("SQLALCHEMY_DATABASE_URI"):
        os.makedirs(app.instance_path, exist_ok=True)
        config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{app.instance_path}/bucket.sqlite3"
    url = config["SQLALCHEMY_DATABASE_URI"]
    options: dict[str, Any] = {"json_serializer": orjson_dumps}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        options.update(
            pool_size=config["BUCKET_DB_POOL_SIZE"],
            max_overflow=config["BUCKET_DB_MAX_OVERFLOW"],
            pool_recycle=1800,
        )
        # Ingest's own pool, whose connections stay in autocommit: a single INSERT … RETURNING
        # is atomic by itself, and no per-request mode switch or BEGIN/COMMIT round trip is paid.
        config["SQLALCHEMY_BINDS"] = {
            AUTOCOMMIT_BIND: {"url": url, "isolation_level": "AUTOCOMMIT", **options}
        }
    config["SQLALCHEMY_ENGINE_OPTIONS"] = {**options, **config.get("SQLALCHEMY_ENGINE_OPTIONS", {})}


def tune_engine(engine: Engine) -> None:
    """SQLite: WAL, and BEGIN IMMEDIATE so each transaction's claims and acks are serialised."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
