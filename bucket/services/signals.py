"""raw_signals on PostgreSQL as a key set of a dictionary plus the values (migration 0020).

A bridge sends the same keys every 5 s, and as canonical JSON most of a packet's
``raw_signals`` was their names. Ingest stores a packet whose top-level keys are all plain
(``PLAIN_KEY``), at most ``MAX_SIGNAL_KEYS`` of them, as the id of its key set in
``signal_key_sets`` (``packets.signal_keys``) and its values' canonical JSON texts in key order
joined by U+001F (``packets.signal_values``, ``bucket.jsonutil.SIGNAL_SEPARATOR``), with
``raw_signals`` NULL; anything else, and every packet once the dictionary holds
``BUCKET_SIGNAL_KEY_SETS_MAX`` sets, is stored in full as before. Rows stored before the
migration keep their ``raw_signals``.

Each process keeps the sets it has seen (``KeySets``): a set already known costs ingest
nothing, a new one one statement for all of a write's new sets (``RESOLVE_SQL``: inserted ON
CONFLICT, so workers racing on one set end with one entry). Once the dictionary is full the
process stops asking for ``FULL_RECHECK_SECONDS`` (an attacker posting endless random key
sets then costs nothing but packets stored in full).

Readers rebuild the canonical text: the template of the set's keys (``{"a":%s,"b":%s}``)
filled by ``format()`` with the values, in C, the same text byte for byte (the audit leaf
hashes it). ``TEXT_SQL`` with ``KEYS_JOIN`` for the hot statements (the sealer, the lease);
``stored_signals`` for SQLAlchemy selects (a scalar subquery per row on PostgreSQL, the
column itself on SQLite).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from flask import current_app
from sqlalchemy import JSON, Text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from bucket.jsonutil import SIGNAL_SEPARATOR, canonical_json
from bucket.models import Packet
from bucket.services import sql

T = Packet.__table__
# A key the dictionary takes: JSON text with nothing to escape and no ``%`` (format()'s).
PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_SIGNAL_KEYS = 32
FULL_RECHECK_SECONDS = 60.0
# The template of a key set's keys (``bucket.jsonutil.signals_template``), in SQL.
# (``chr(37)``, folded to a constant when planned, is the ``%`` no driver must take for its own.)
_TEMPLATE = (
    "'{{\"' || array_to_string({s}.keys, '\":' || chr(37) || 's,\"') || '\":' || chr(37) || 's}}'"
)
# A compact packet's raw_signals text rebuilt, for a row ``{p}`` of packets joined to its key
# set ``{s}`` (``KEYS_JOIN``); and whichever form it was stored in, as text or parsed (a
# ``json`` value, as the column is).
REBUILT_SQL = "format(" + _TEMPLATE + ", VARIADIC string_to_array({p}.signal_values, E'\\x1f'))"
TEXT_SQL = "coalesce({p}.raw_signals::text, " + REBUILT_SQL + ")"
JSON_SQL = "coalesce({p}.raw_signals, (" + REBUILT_SQL + ")::json)"
KEYS_JOIN = "LEFT JOIN signal_key_sets {s} ON {s}.id = {p}.signal_keys"
# The key sets of a write not known to this process: those in the dictionary, and the others
# added while it holds fewer than the cap. A set another worker inserts meanwhile is not in
# this statement's snapshot: DO UPDATE returns its id all the same (it touches a row only in
# that race).
RESOLVE_SQL = """
WITH wanted AS (
  SELECT ARRAY(SELECT json_array_elements_text(w.value)) AS keys, w.ordinality AS n
  FROM json_array_elements(%(sets)s::json) WITH ORDINALITY AS w
), found AS (
  SELECT s.id, s.keys FROM signal_key_sets s WHERE s.keys IN (SELECT keys FROM wanted)
), added AS (
  INSERT INTO signal_key_sets (keys)
  SELECT keys FROM (
    SELECT keys, row_number() OVER (ORDER BY n) AS rank FROM wanted
    WHERE keys NOT IN (SELECT keys FROM found)) AS fresh
  WHERE rank + (SELECT count(*) FROM signal_key_sets) <= %(cap)s
  ON CONFLICT (keys) DO UPDATE SET keys = EXCLUDED.keys
  RETURNING id, keys
)
SELECT id, keys FROM found UNION ALL SELECT id, keys FROM added
"""
ALL_SQL = "SELECT id, keys FROM signal_key_sets"


def split(signals: Any) -> tuple[tuple[str, ...], str] | None:
    """A packet's signals as (sorted keys, values joined), or None to store them in full."""
    if not isinstance(signals, dict) or not 0 < len(signals) <= MAX_SIGNAL_KEYS:
        return None
    keys = tuple(sorted(signals))
    if not all(isinstance(key, str) and PLAIN_KEY.fullmatch(key) for key in keys):
        return None
    return keys, SIGNAL_SEPARATOR.join(canonical_json(signals[key]) for key in keys)


class KeySets:
    """This process's view of the dictionary: key set -> id, and when it was last found full."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, ...], int] = {}
        self.full_until = 0.0
        self.lock = threading.Lock()

    def resolve(self, wanted: list[tuple[str, ...]], cap: int) -> None:
        """Learn the ids of ``wanted`` (sets not known here): one statement, none while the
        dictionary was found full less than FULL_RECHECK_SECONDS ago."""
        if time.monotonic() < self.full_until:
            return
        rows = sql.run_postgres(RESOLVE_SQL, {"sets": canonical_json(wanted), "cap": cap})
        with self.lock:
            for key_id, keys in rows:
                self.ids[tuple(keys)] = key_id
            if any(keys not in self.ids for keys in wanted):
                self.full_until = time.monotonic() + FULL_RECHECK_SECONDS

    def forget(self) -> None:
        """Drop every id learned: one was found gone from the dictionary (ingest), so none
        is trusted until asked again."""
        with self.lock:
            self.ids.clear()
            self.full_until = 0.0


def key_sets() -> KeySets:
    """The app's dictionary cache."""
    return current_app.extensions.setdefault("signal_key_sets", KeySets())


def compact_rows(rows: list[dict]) -> None:
    """PostgreSQL: store each row's raw_signals as key set and values where the dictionary
    takes its keys (at most one statement, when a set is new to this process)."""
    cache = key_sets()
    split_rows = []
    unknown: dict[tuple[str, ...], None] = {}
    for row in rows:
        parts = split(row["raw_signals"])
        if parts is None:
            continue
        split_rows.append((row, parts))
        if parts[0] not in cache.ids:
            unknown[parts[0]] = None
    if unknown:
        cache.resolve(list(unknown), current_app.config["BUCKET_SIGNAL_KEY_SETS_MAX"])
    for row, (keys, values) in split_rows:
        key_id = cache.ids.get(keys)
        if key_id is not None:
            row["raw_signals"] = None
            row["signal_keys"] = key_id
            row["signal_values"] = values


class stored_signals(FunctionElement):
    """A packet's raw_signals as stored, whichever form, parsed (``TEXT_SQL``)."""

    type = JSON()
    inherit_cache = True
    as_text = False

    def __init__(self) -> None:
        super().__init__(T.c.raw_signals, T.c.signal_keys, T.c.signal_values)


class stored_signals_text(stored_signals):
    """The same as its canonical JSON text: what the audit leaf covers."""

    type = Text()
    inherit_cache = True
    as_text = True


@compiles(stored_signals)
def _stored_signals(element: stored_signals, compiler: Any, **kw: Any) -> str:
    """SQLite: the column, which every row fills."""
    column = compiler.process(T.c.raw_signals, **kw)
    return f"CAST({column} AS TEXT)" if element.as_text else column


@compiles(stored_signals, "postgresql")
def _stored_signals_postgres(element: stored_signals, compiler: Any, **kw: Any) -> str:
    """PostgreSQL: the stored text, or the compact form rebuilt through its key set."""
    raw, keys, values = (
        compiler.process(column, **kw)
        for column in (T.c.raw_signals, T.c.signal_keys, T.c.signal_values)
    )
    template = _TEMPLATE.format(s="signal_set")
    rebuilt = (
        f"(SELECT format({template}, VARIADIC string_to_array({values}, E'\\x1f')) "
        f"FROM signal_key_sets signal_set WHERE signal_set.id = {keys})"
    )
    if element.as_text:
        return f"coalesce(CAST({raw} AS TEXT), {rebuilt})"
    return f"coalesce({raw}, CAST({rebuilt} AS JSON))"
