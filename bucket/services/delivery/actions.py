"""A processed packet's karma actions, stored without its own id repeated (PostgreSQL).

The Karma Tracker names the packet in each action it reports (``{"action": …, "packet_id":
"<the packet's id>", …}``, tests/fixtures/mark_processed.json): each time, 38 bytes of the
processed row repeat its own key. Since migration 0021 the acknowledgement stores each
JSON string equal to the packet's id as a TAB followed by ``0`` (JSON whitespace and a number:
the text stays valid JSON), and the readers put the id back, so they see the very text that was
acknowledged. The stored text is orjson's (``acks.ack_params``), which writes no whitespace
between tokens and escapes a TAB inside a string, so a TAB in it is always such a mark; a
string is replaced only where it is a whole value (after ``[``, ``,`` or ``:`` and before
``]``, ``,`` or ``}``), never inside another string nor as an object's key. SQLite stores the
actions as they came.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from bucket.models import Delivery

D = Delivery.__table__
# The acknowledgement's text of the actions ``{actions}`` of packet ``{packet_id}``, marked.
PG_MARKED = (
    "CAST(regexp_replace(CAST({actions} AS TEXT), '([[,:])\"' || CAST({packet_id} AS TEXT) "
    "|| '\"(?=[],}}])', '\\1' || chr(9) || '0', 'g') AS JSON)"
)
# The stored actions with the packet's id put back where a mark stands.
PG_RESTORED = (
    "CASE WHEN strpos(CAST({actions} AS TEXT), chr(9)) > 0 THEN CAST(replace(CAST({actions} "
    "AS TEXT), chr(9) || '0', '\"' || CAST({packet_id} AS TEXT) || '\"') AS JSON) "
    "ELSE {actions} END"
)


class stored_actions(FunctionElement):
    """A delivery's karma actions as acknowledged, whichever form they were stored in."""

    type = JSON()
    inherit_cache = True

    def __init__(self) -> None:
        super().__init__(D.c.karma_actions, D.c.packet_id)


@compiles(stored_actions)
def _stored_actions(element: stored_actions, compiler: Any, **kw: Any) -> str:
    """SQLite: the column, which holds them as they came."""
    return compiler.process(D.c.karma_actions, **kw)


@compiles(stored_actions, "postgresql")
def _stored_actions_postgres(element: stored_actions, compiler: Any, **kw: Any) -> str:
    """PostgreSQL: the stored text with the packet's id put back in place of each mark."""
    actions, packet_id = (compiler.process(c, **kw) for c in (D.c.karma_actions, D.c.packet_id))
    return PG_RESTORED.format(actions=actions, packet_id=packet_id)
