"""A packet's low-cardinality strings as one-byte codes on PostgreSQL (migration 0022).

Five strings of every packet take a handful of values (``system_type``, ``role``,
``cognitive_state``, ``state``, ``auth_outcome``): stored as text they cost 8-11 bytes each in
every row. Ingest stores a value of the fixed table ``models.PACKET_CODES`` as its one-byte
``"char"`` code (``<name>_code``) with its text column (``<name>_text``) NULL, and any other
value (a state a newer bridge sends, a value in another case) as text, exactly as received,
code NULL. An EMS packet's ``employee_id`` equal to its ``user_id`` is stored NULL with
``employee_is_user`` true. SQLite stores every value as text, as before.

The text columns are named ``<name>_text`` since migration 0024: the instances of a release
before it read the columns by the fields' names, and would serve a coded string, an EMS
packet's employee_id or (0020) a compact packet's raw_signals as null during an upgrade, while
they still answer beside the new ones. Without those names every statement of theirs that
reads or writes packets fails, and its client retries on a new instance.

Readers get the text back: ``decoded_sql`` and ``column_sql`` for the hand-written statements
(the lease, the sealer, the booking), ``decoded`` for SQLAlchemy selects (the listings, the
audit's rows): the stored text when there is one, else the code's value (a CASE PostgreSQL
folds in C), so every answer, and the audit leaf, is the same text as stored in full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from bucket.models import PACKET_CODES, Packet
from bucket.services.dialect import dialect_name

T = Packet.__table__
CODED = tuple(PACKET_CODES)
# Each coded field's text column (migration 0024), and the field each such column holds.
TEXT_COLUMNS = {name: f"{name}_text" for name in CODED}
FIELDS = {column: name for name, column in TEXT_COLUMNS.items()}
# The columns a reader must not read as stored: the coded ones and ``employee_id``.
DECODED = (*CODED, "employee_id")
# Stored, never shown: the codes themselves.
CODE_COLUMNS = (*(f"{name}_code" for name in CODED), "employee_is_user")


def _sql(name: str, column: Callable[[str], str]) -> str:
    if name == "employee_id":
        return (
            f"coalesce({column('employee_id')}, "
            f"CASE WHEN {column('employee_is_user')} THEN {column('user_id')} END)"
        )
    arms = " ".join(f"WHEN '{code}' THEN '{value}'" for value, code in PACKET_CODES[name].items())
    return f"coalesce({column(TEXT_COLUMNS[name])}, CASE {column(name + '_code')} {arms} END)"


def field_name(column: str) -> str:
    """The packet field a stored column holds (a coded field's text column names its field)."""
    return FIELDS.get(column, column)


def decoded_sql(name: str, p: str) -> str:
    """PostgreSQL: column ``name`` of the packets row ``p`` as text, whichever form it was
    stored in."""
    return _sql(name, lambda column: f"{p}.{column}")


def column_sql(name: str, p: str = "packets") -> str:
    """A packet column as text in a hand-written statement on either backend (SQLite stores
    every value as text)."""
    if name in DECODED and dialect_name() == "postgresql":
        return decoded_sql(name, p)
    return f"{p}.{TEXT_COLUMNS.get(name, name)}"


def encode_rows(rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: store each row's known values as codes and an employee_id equal to the
    user_id as NULL (``employee_is_user``); every other value stays as it came."""
    for row in rows:
        for name, codes in PACKET_CODES.items():
            value = row[TEXT_COLUMNS[name]]
            code = codes.get(value) if isinstance(value, str) else None
            if code is not None:
                row[TEXT_COLUMNS[name]] = None
                row[f"{name}_code"] = code
        if row["employee_id"] is not None and row["employee_id"] == row["user_id"]:
            row["employee_id"] = None
            row["employee_is_user"] = True


class decoded(FunctionElement):
    """A coded packet field (``DECODED``) as its text, labelled by the caller."""

    type = String()
    inherit_cache = True

    def __init__(self, name: str) -> None:
        super().__init__(T.c[TEXT_COLUMNS.get(name, name)])


def _name(element: decoded) -> str:
    return field_name(element.clauses.clauses[0].name)


@compiles(decoded)
def _decoded(element: decoded, compiler: Any, **kw: Any) -> str:
    """SQLite: the text column, which holds every value."""
    return compiler.process(element.clauses.clauses[0], **kw)


@compiles(decoded, "postgresql")
def _decoded_postgres(element: decoded, compiler: Any, **kw: Any) -> str:
    """PostgreSQL: the stored text, or its code's value."""
    return _sql(_name(element), lambda column: compiler.process(T.c[column], **kw))
