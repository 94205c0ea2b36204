"""The few statements whose spelling differs between PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

from bucket.extensions import db


def dialect_name() -> str:
    """``postgresql`` or ``sqlite``."""
    return db.engine.dialect.name


def upsert_insert(table):
    """An INSERT that supports ``on_conflict_do_nothing`` on the current backend."""
    module = postgresql if dialect_name() == "postgresql" else sqlite
    return module.insert(table)


AUTOCOMMIT_BIND = "autocommit"


@contextmanager
def write_connection() -> Iterator[Any]:
    """Where ingest runs its statements; what it has executed is committed when the block ends.

    On PostgreSQL each statement runs in autocommit: a single INSERT … RETURNING is atomic on
    its own, and this spares the BEGIN and COMMIT round trips on the hottest path. SQLite keeps
    the session's BEGIN IMMEDIATE transaction, committed here.
    """
    if dialect_name() == "postgresql":
        with db.engines[AUTOCOMMIT_BIND].connect() as connection:
            yield connection
    else:
        try:
            yield db.session
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise
