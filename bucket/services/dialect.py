"""The few statements whose spelling differs between PostgreSQL and SQLite."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite

from bucket.extensions import db


def dialect_name() -> str:
    """``postgresql`` or ``sqlite``."""
    return db.engine.dialect.name


def upsert_insert(table):
    """An INSERT that supports ``on_conflict_do_nothing`` on the current backend."""
    module = postgresql if dialect_name() == "postgresql" else sqlite
    return module.insert(table)
