"""Seeing the SQL a request sends: SQLAlchemy's statements and the hand-written hot ones."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event

from bucket.extensions import db


@contextmanager
def captured_statements(app) -> Iterator[list[str]]:
    """Collect the text of every statement the app executes inside the block, in order."""
    statements: list[str] = []
    with app.app_context():
        engines = set(db.engines.values())

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            statements.append(record.getMessage())

    logger = logging.getLogger("bucket.sql")
    handler, level = Recorder(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
        logger.removeHandler(handler)
        logger.setLevel(level)


def verbs(statements: list[str]) -> list[str]:
    """The leading keyword of each statement (WITH for a data-modifying CTE)."""
    return [statement.lstrip().split()[0].upper() for statement in statements]
