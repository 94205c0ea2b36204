"""Domain exceptions: raised by the services, answered by the error handlers (bucket/web/errors).

They live at the bottom of the package so that both sides import them from here and neither
imports the other.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError


class DatabaseUnavailable(RuntimeError):
    """The database could not serve the request now; nothing was stored, and the client retries
    (answered 503 with ``Retry-After``)."""


class ConflictVanished(DatabaseUnavailable):
    """A duplicate's original disappeared before it could be read back; the client retries."""


class BadCursor(ValueError):
    """The cursor was not one this service issued."""


class BodyTooDeep(ValueError):
    """The request body nests deeper than the JSON parser goes (1024 levels): it cannot be
    read as JSON, only kept as text (answered 422; ingest quarantines the text)."""

    def __init__(self, text: str, message: str) -> None:
        super().__init__(message)
        self.text = text
        self.message = message


class IngestAuthMisconfigured(RuntimeError):
    """The ingest authentication settings cannot work (a mode without a key, an unreadable key,
    ``none`` allowed): the service refuses to start and says which setting is wrong."""


# SQLite's primary result codes that mean "the database cannot serve now", not "bad SQL":
# BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN. SQLite reports its own SQL errors as
# OperationalError too (SQLITE_ERROR), and those are bugs.
SQLITE_UNAVAILABLE_CODES = frozenset({5, 6, 8, 10, 13, 14})


def is_outage(exc: BaseException) -> bool:
    """Whether an error means the database is unreachable or busy (not a bug of ours)."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in SQLITE_UNAVAILABLE_CODES
    return isinstance(exc, OperationalError)
