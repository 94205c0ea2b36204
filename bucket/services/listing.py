"""A user's packets and the dead letters, newest first, with keyset paging (no OFFSET scans)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import and_, literal, select, tuple_

from bucket.extensions import db
from bucket.models import DeliveryState, Packet, is_packet_id, of_user
from bucket.services import cursors
from bucket.services.codes import CODE_COLUMNS, as_shown, field_name
from bucket.services.delivery.actions import stored_actions
from bucket.services.delivery.settings import DELIVERY_COLUMNS, D
from bucket.services.signals import stored_signals

T = Packet.__table__
# A packet's columns as listed: raw_signals and the coded strings in whichever form they were
# stored (services/signals, services/codes).
LISTED = [
    stored_signals().label("raw_signals")
    if c.name == "raw_signals"
    else as_shown(field_name(c.name))
    for c in T.c
    if c.name not in ("signal_keys", "signal_values", *CODE_COLUMNS)
]
# A delivery's columns as listed: karma actions as acknowledged (services/delivery/actions).
LISTED_DELIVERY = [
    stored_actions().label("karma_actions") if c.name == "karma_actions" else c
    for c in DELIVERY_COLUMNS
]


def received_cursor(received_at: str, packet_id: str) -> tuple[datetime, str]:
    """A user listing's cursor: the last row's ``received_at`` (aware) and ``packet_id``."""
    moment = datetime.fromisoformat(received_at)
    if moment.tzinfo is None or not is_packet_id(packet_id):
        raise ValueError("malformed cursor")
    return moment.astimezone(UTC), packet_id


def user_packets(
    user_id: str,
    limit: int,
    processed_only: bool = False,
    status: str | None = None,
    cursor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[list, str | None]:
    """One page of the user's packets (EMS ones by ``employee_id`` too) and the next cursor;
    ``since``/``until`` bound ``received_at`` (a learner's timeline over a period)."""
    if "\x00" in user_id:
        return [], None  # no stored id holds NUL, and PostgreSQL would refuse the parameter
    filters = []
    if since is not None:
        filters.append(T.c.received_at >= since)
    if until is not None:
        filters.append(T.c.received_at < until)
    if processed_only:
        filters.append(D.c.delivery_state == DeliveryState.PROCESSED)
    if status:
        filters.append(D.c.delivery_state == status)
    if cursor:
        received_at, packet_id = cursors.decode(cursor, received_cursor)
        # The id bound as the column's type (PostgreSQL's uuid: the row comparison keeps to the
        # index's order and needs no cast of the column).
        last = tuple_(received_at, literal(packet_id, T.c.packet_id.type))
        filters.append(tuple_(T.c.received_at, T.c.packet_id) < last)
    order = (T.c.received_at.desc(), T.c.packet_id.desc())
    # Two index-ordered lookups merged here beat one OR that the planner must sort; each
    # packet's delivery is joined on its primary key, and on received_at, which PostgreSQL's
    # processed deliveries are partitioned by (migration 0014): one day's index, not every.
    packets = select(*LISTED, *LISTED_DELIVERY).select_from(
        T.join(D, and_(D.c.packet_id == T.c.packet_id, D.c.received_at == T.c.received_at))
    )
    by_user = packets.where(of_user(user_id), *filters).order_by(*order).limit(limit + 1)
    by_employee = (
        packets.where(T.c.employee_id == user_id, T.c.user_id != user_id, *filters)
        .order_by(*order)
        .limit(limit + 1)
    )
    rows = list(db.session.execute(by_user)) + list(db.session.execute(by_employee))
    db.session.commit()
    rows.sort(key=lambda row: (row.received_at, row.packet_id), reverse=True)
    page = rows[:limit]
    next_cursor = (
        cursors.encode(page[-1].received_at.isoformat(), page[-1].packet_id)
        if len(rows) > limit
        else None
    )
    return page, next_cursor


def dead_cursor(dead_at: float, packet_id: str) -> tuple[float, str]:
    """The dead letters' cursor: the last row's ``visible_at`` (when it died) and id."""
    if type(dead_at) not in (int, float) or not is_packet_id(packet_id):
        raise ValueError("malformed cursor")
    return float(dead_at), packet_id


def dead_letters(limit: int, cursor: str | None = None) -> tuple[list, str | None]:
    """One page of dead packets, most recently dead first, through the queue index (a dead
    packet's ``visible_at`` is when it died), with the next cursor."""
    filters = [D.c.delivery_state == DeliveryState.DEAD]
    if cursor:
        dead_at, packet_id = cursors.decode(cursor, dead_cursor)
        last = tuple_(dead_at, literal(packet_id, D.c.packet_id.type))
        filters.append(tuple_(D.c.visible_at, D.c.packet_id) < last)
    rows = db.session.execute(
        select(*LISTED, *LISTED_DELIVERY)
        .select_from(D.join(T, T.c.packet_id == D.c.packet_id))
        .where(*filters)
        .order_by(D.c.visible_at.desc(), D.c.packet_id.desc())
        .limit(limit + 1)
    ).all()
    db.session.commit()
    page = rows[:limit]
    more = len(rows) > limit
    return page, cursors.encode(page[-1].visible_at, page[-1].packet_id) if more else None
