"""Running the service's hand-written statements: prepared and autocommit on PostgreSQL.

The hot paths (ingest, claims, acknowledgements, status) send one statement per step. On
PostgreSQL each runs on the DBAPI cursor of ingest's autocommit pool as a server-side prepared
statement: SQLAlchemy Core's per-statement work (cache keys, bind and result processing)
measured as 40% of a single-packet ingest's CPU, and the acknowledgement's Core statement
took longer to build than to run. A statement that changes rows and counters does both in one
statement, hence one transaction.

Statements are written with ``%(name)s`` parameters. Portable ones also run on SQLite, inside
the session's transaction (``BEGIN IMMEDIATE``), with the parameters renamed to ``:name``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bucket.database import AUTOCOMMIT_BIND
from bucket.extensions import db
from bucket.services.dialect import dialect_name

T = TypeVar("T")
_PYFORMAT = re.compile(r"%\((\w+)\)s")
# LOG_LEVEL=DEBUG shows every hand-written statement sent to PostgreSQL (SQLAlchemy's own are
# logged by its engine loggers).
log = logging.getLogger("bucket.sql")


def run(sql: str, params: Mapping[str, Any], retries: int | None = None) -> list[tuple]:
    """Execute one statement; return its rows (none for statements without a result).
    ``retries``: see ``run_postgres``."""
    if dialect_name() == "postgresql":
        return run_postgres(sql, params, retries)
    result = db.session.execute(text(_PYFORMAT.sub(r":\1", sql)), dict(params))
    return [tuple(row) for row in result] if result.returns_rows else []


def finish() -> None:
    """End the session's transaction after ``run`` on SQLite (PostgreSQL's are autocommit)."""
    if dialect_name() != "postgresql":
        db.session.commit()


# Times a statement is run again after PostgreSQL refused it for a row that a concurrent
# statement moved to another partition (SQLSTATE 40001: deliveries are partitioned by state,
# and an acknowledgement moves its row; migration 0014). The refused statement changed
# nothing, and the next run sees the move in its snapshot, so a race with one statement ends on
# the second. A statement locking many rows can lose a race for each of them in turn (acks of
# one batch racing several others over the same packets): its caller passes a larger bound.
MOVED_ROW_RETRIES = 5
SERIALIZATION_FAILURE = "40001"


def moved_row(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a statement because a row it meant to lock or change was
    moved away (or otherwise changed) by a concurrent transaction: running it again is safe."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == SERIALIZATION_FAILURE


def lock_not_granted(exc: BaseException) -> bool:
    """Whether PostgreSQL gave up waiting for a lock (the transaction's ``lock_timeout``):
    the maintenance that asked for it tries again later instead of failing."""
    return "lock timeout" in str(exc)


def retrying(work: Callable[[], T]) -> T:
    """Run ``work`` (statements in the session's transaction, committed by it), again after a
    rollback when PostgreSQL refused it for a moved row; at most ``MOVED_ROW_RETRIES`` more
    times, then the refusal is raised."""
    return _again_when_moved(work, MOVED_ROW_RETRIES, undo=db.session.rollback)


def _again_when_moved(
    work: Callable[[], T], retries: int, undo: Callable[[], None] | None = None
) -> T:
    """``work()``, run again (after ``undo``, on any database error) while PostgreSQL refuses
    it for a moved row, at most ``retries`` more times; any other error is raised at once."""
    for attempt in range(retries + 1):
        try:
            return work()
        except DBAPIError as exc:
            if undo is not None:
                undo()
            if not moved_row(exc) or attempt == retries:
                raise
            log.info("statement refused for a moved row; running it again")
    raise AssertionError("unreachable")


def run_postgres(
    sql: str, params: Mapping[str, Any] | Sequence[Any], retries: int | None = None
) -> list[tuple]:
    """One prepared statement on a pooled autocommit connection (committed when it returns),
    run again when it was refused for a row a concurrent statement moved (``moved_row``), at
    most ``retries`` times (``MOVED_ROW_RETRIES`` unless given)."""
    retries = MOVED_ROW_RETRIES if retries is None else retries
    return _again_when_moved(lambda: _run_postgres_once(sql, params), retries)


def _run_postgres_once(sql: str, params: Mapping[str, Any] | Sequence[Any]) -> list[tuple]:
    """One prepared statement on a pooled autocommit connection (committed when it returns).

    A broken connection is dropped with every other connection of the pool, which a restarted
    server has broken too; the error is raised as SQLAlchemy's, so the error handlers turn it
    into 503 (outage) or 500 (bug) as for any other statement.
    """
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", sql)
    engine = db.engines[AUTOCOMMIT_BIND]
    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:  # the server does not answer: an outage, never a bug of ours
        raise DBAPIError.instance(sql, None, exc, psycopg.Error, hide_parameters=True) from exc
    connection = pooled.dbapi_connection
    try:
        cursor = connection.execute(sql, params, prepare=True)
        return cursor.fetchall() if cursor.description else []
    except psycopg.Error as exc:
        lost = connection.broken or connection.closed
        if lost:
            # What SQLAlchemy does for its own statements on a disconnect: this connection is
            # closed, and every other one opened before it is replaced when next checked out.
            engine.pool._invalidate(pooled, exc)
        raise DBAPIError.instance(
            sql, None, exc, psycopg.Error, hide_parameters=True, connection_invalidated=lost
        ) from exc
    finally:
        pooled.close()
