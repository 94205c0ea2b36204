"""The bookkeeper's per-minute roll-ups (services/activity) after a long stretch unbooked."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, text

from bucket.extensions import db
from bucket.models import Packet
from bucket.schemas import PacketSchema
from bucket.services.bookkeeping import book_new_packets
from bucket.services.dialect import dialect_name
from bucket.services.ingest import allocate_seq, packet_row
from bucket.timeutil import utc_now
from tests.factories import make_packet

# More minutes than one statement may carry as four parameters each (PostgreSQL takes at most
# 65,535 parameters, SQLite 32,766).
MINUTES = 17_000


def test_one_booking_of_tens_of_thousands_of_minutes_rolls_up_every_one(app):
    """After the bookkeeper was away (an import or a restore behind its back, its thread off for
    a while), one booking covers a packet in each of 17,000 minutes: every minute is rolled
    up and the mark moves. (It used to be one INSERT of 68,000 parameters, refused by the
    database in every round, and the sealing behind it never ran again.)"""
    with app.app_context():
        book_new_packets()
        start = utc_now() - timedelta(minutes=MINUTES + 1)
        packet = PacketSchema().load(make_packet())
        rows = [
            {
                **packet_row(packet, start + timedelta(minutes=i), None),
                "packet_id": f"{i:08x}-0000-7000-8000-{i:012x}",
                "dedup_key": f"{i:032x}",
            }
            for i in range(MINUTES)
        ]
        if dialect_name() == "sqlite":  # seq is handed out by ingest's own transaction there
            allocate_seq(db.session, rows)
        db.session.execute(insert(Packet.__table__), rows)
        db.session.commit()
        booking = book_new_packets()
        rolled = db.session.execute(
            text("SELECT series, count(*), sum(value) FROM activity_minutes GROUP BY series")
        ).all()
        db.session.commit()
    assert booking is not None and booking.packets == MINUTES
    series = f"ingested:{packet['system_type']}:{packet['cognitive_state']}"
    assert [tuple(row) for row in rolled] == [(series, MINUTES, MINUTES)]
