"""The few statements whose spelling differs between PostgreSQL and SQLite."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite

from bucket.extensions import db


def dialect_name() -> str:
    """``postgresql`` or ``sqlite``."""
    return db.engine.dialect.name


def holds_sqlite_turn() -> bool:
    """Whether this request already holds SQLite's writer turn (a transaction is open): it
    must write on its own, since a shared write's leader would wait for that very turn."""
    return dialect_name() != "postgresql" and db.session().in_transaction()


def upsert_insert(table):
    """An INSERT that supports ``on_conflict_do_nothing`` on the current backend."""
    module = postgresql if dialect_name() == "postgresql" else sqlite
    return module.insert(table)
