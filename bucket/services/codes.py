"""A packet's low-cardinality strings as one-byte codes (migration 0022) and its small numbers
as scaled integers (migration 0026), on PostgreSQL.

Five strings of every packet take a handful of values (``system_type``, ``role``,
``cognitive_state``, ``state``, ``auth_outcome``): stored as text they cost 8-11 bytes each in
every row. Ingest stores a value of the fixed table ``models.PACKET_CODES`` as its one-byte
``"char"`` code (``<name>_code``) with its text column (``<name>_text``) NULL, and any other
value (a state a newer bridge sends, a value in another case) as text, exactly as received,
code NULL. An EMS packet's ``employee_id`` equal to its ``user_id`` is stored NULL with
``employee_is_user`` true. SQLite stores every value as text, as before.

Five numbers (``models.PACKET_SCALES``: the time split, the focus and integrity scores) are
sent with a decimal or two: as float8 they cost 8 bytes each. Ingest stores one as a
smallint of the value times its scale (``<name>_scaled``, its ``<name>_float`` NULL) when that
integer divided by the scale is the very float received (``scaled``: IEEE division, correctly
rounded in Python and in PostgreSQL alike); any other value (more decimals, out of range,
-0.0) stays a float. SQLite stores every number as received.

The text columns are named ``<name>_text`` since migration 0024: the instances of a release
before it read the columns by the fields' names, and would serve a coded string, an EMS
packet's employee_id or (0020) a compact packet's raw_signals as null during an upgrade, while
they still answer beside the new ones. Without those names every statement of theirs that
reads or writes packets fails, and its client retries on a new instance. The float columns
are named ``<name>_float`` since migration 0026 for the same reason.

Readers get the values back: ``decoded_sql`` and ``column_sql`` for the hand-written statements
(the lease, the sealer, the booking), ``decoded`` for SQLAlchemy selects (the listings, the
audit's rows): the stored text or float when there is one, else the code's value or the
integer divided by its scale (expressions PostgreSQL evaluates in C), so every answer, and the
audit leaf, is the same as stored in full.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sqlalchemy import Float, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from bucket.models import PACKET_CODES, PACKET_SCALES, Packet
from bucket.services.dialect import dialect_name

T = Packet.__table__
CODED = tuple(PACKET_CODES)
SCALED = tuple(PACKET_SCALES)
# Each coded field's text column (migration 0024), each scaled field's float column (0026):
# the column holding the value as received, and the field each such column holds.
TEXT_COLUMNS = {name: f"{name}_text" for name in CODED}
FLOAT_COLUMNS = {name: f"{name}_float" for name in SCALED}
AS_RECEIVED = {**TEXT_COLUMNS, **FLOAT_COLUMNS}
FIELDS = {column: name for name, column in AS_RECEIVED.items()}
# The columns a reader must not read as stored: the coded ones, the scaled ones and
# ``employee_id``.
DECODED = (*CODED, *SCALED, "employee_id")
# Stored, never shown: the codes and the scaled integers themselves.
CODE_COLUMNS = (
    *(f"{name}_code" for name in CODED),
    "employee_is_user",
    *(f"{name}_scaled" for name in SCALED),
)
# The largest integer a smallint holds.
SMALLINT_MAX = 32_767


def _sql(name: str, column: Callable[[str], str]) -> str:
    if name == "employee_id":
        return (
            f"coalesce({column('employee_id')}, "
            f"CASE WHEN {column('employee_is_user')} THEN {column('user_id')} END)"
        )
    if name in PACKET_SCALES:
        scale = PACKET_SCALES[name]
        return (
            f"coalesce({column(FLOAT_COLUMNS[name])}, "
            f"{column(name + '_scaled')}::float8 / {scale}::float8)"
        )
    arms = " ".join(f"WHEN '{code}' THEN '{value}'" for value, code in PACKET_CODES[name].items())
    return f"coalesce({column(TEXT_COLUMNS[name])}, CASE {column(name + '_code')} {arms} END)"


def field_name(column: str) -> str:
    """The packet field a stored column holds (a coded field's text column names its field)."""
    return FIELDS.get(column, column)


def decoded_sql(name: str, p: str) -> str:
    """PostgreSQL: column ``name`` of the packets row ``p`` as text (or float8, a scaled
    number), whichever form it was stored in."""
    return _sql(name, lambda column: f"{p}.{column}")


def column_sql(name: str, p: str = "packets") -> str:
    """A packet column as the value received in a hand-written statement on either backend
    (SQLite stores every value as received)."""
    if name in DECODED and dialect_name() == "postgresql":
        return decoded_sql(name, p)
    return f"{p}.{AS_RECEIVED.get(name, name)}"


def scaled(value: Any, scale: int) -> int | None:
    """``value`` times ``scale`` as a smallint that gives back exactly ``value`` divided by
    ``scale`` (Python's int / int and PostgreSQL's float8 / float8 both round correctly, so
    both give this float), or None: a value with more decimals, out of range, not finite, or
    -0.0 (which would come back as 0.0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= SMALLINT_MAX / scale or math.copysign(1.0, value) < 0:
        return None
    integer = round(value * scale)
    return integer if integer <= SMALLINT_MAX and integer / scale == value else None


def encode_rows(rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: store each row's known values as codes, an employee_id equal to the
    user_id as NULL (``employee_is_user``) and each number that a smallint holds exactly
    once scaled as that integer; every other value stays as it came."""
    for row in rows:
        for name, codes in PACKET_CODES.items():
            value = row[TEXT_COLUMNS[name]]
            code = codes.get(value) if isinstance(value, str) else None
            if code is not None:
                row[TEXT_COLUMNS[name]] = None
                row[f"{name}_code"] = code
        for name, scale in PACKET_SCALES.items():
            integer = scaled(row[FLOAT_COLUMNS[name]], scale)
            if integer is not None:
                row[FLOAT_COLUMNS[name]] = None
                row[f"{name}_scaled"] = integer
        if row["employee_id"] is not None and row["employee_id"] == row["user_id"]:
            row["employee_id"] = None
            row["employee_is_user"] = True


class decoded(FunctionElement):
    """A coded or scaled packet field (``DECODED``) as received, labelled by the caller."""

    type = String()
    inherit_cache = True

    def __init__(self, name: str) -> None:
        super().__init__(T.c[AS_RECEIVED.get(name, name)])
        if name in PACKET_SCALES:
            self.type = Float()


def _name(element: decoded) -> str:
    return field_name(element.clauses.clauses[0].name)


def as_shown(name: str) -> Any:
    """Packet field ``name`` as every reader shows it, labelled with its name: decoded where it
    may be stored coded or scaled (``DECODED``), else its column."""
    return decoded(name).label(name) if name in DECODED else T.c[name]


@compiles(decoded)
def _decoded(element: decoded, compiler: Any, **kw: Any) -> str:
    """SQLite: the column as received, which holds every value."""
    return compiler.process(element.clauses.clauses[0], **kw)


@compiles(decoded, "postgresql")
def _decoded_postgres(element: decoded, compiler: Any, **kw: Any) -> str:
    """PostgreSQL: the stored text or float, or its code's value or scaled integer's."""
    return _sql(_name(element), lambda column: compiler.process(T.c[column], **kw))
