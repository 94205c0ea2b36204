"""Small HTTP and database steps shared by the delivery tests (ingest, poll, ack, move time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import literal_column, select, text

from bucket.extensions import db, queue
from bucket.models import Delivery, Packet
from bucket.services.codes import AS_RECEIVED
from bucket.services.listing import LISTED, LISTED_DELIVERY
from bucket.timeutil import epoch_now
from tests.concurrency import join_all
from tests.factories import make_packet

API = "/api/v1/bucket/prana"


def ingest(client, **overrides) -> str:
    """Post one packet and return its packet_id (the ingest must succeed)."""
    response = client.post(f"{API}/ingest", json=make_packet(**overrides))
    assert response.status_code == 200, response.json
    return response.json["packet_id"]


def ingest_many(client, count: int = 1, **overrides) -> list[str]:
    """Post ``count`` fresh packets one by one (each its own received_at); ids oldest first."""
    return [ingest(client, **overrides) for _ in range(count)]


def poll(client, limit: int = 10, **params: Any) -> dict:
    """GET pending and return the body (the poll must succeed)."""
    query = "&".join(f"{k}={v}" for k, v in {"limit": limit, **params}.items())
    response = client.get(f"{API}/packets/pending?{query}")
    assert response.status_code == 200, response.json
    return response.json


def ack(client, packet_id: str, success: bool = True, **fields: Any):
    """POST one mark-processed result and return the response."""
    body = {"packet_id": packet_id, "success": success, "karma_actions": None, **fields}
    if success and "karma_actions" not in fields:
        body["karma_actions"] = [{"action": "noted", "packet": packet_id}]
    return client.post(f"{API}/packets/mark-processed", json=body)


def status(client) -> dict:
    """The status figures."""
    response = client.get(f"{API}/status")
    assert response.status_code == 200
    return response.json


def listing(client, user_id: str, **params: Any) -> list[dict]:
    """The user listing (first page)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    response = client.get(f"{API}/packets/user/{user_id}?{query}")
    assert response.status_code == 200
    return response.json


def _move_visible_at(app, assignment: str, params: dict[str, Any], packet_ids) -> None:
    """Set ``visible_at`` of the leased or pending packets (all, or only ``packet_ids``)."""
    sql = (
        f"UPDATE deliveries SET visible_at = {assignment}"
        " WHERE delivery_state IN ('leased', 'pending')"
    )
    if packet_ids is not None:
        sql += " AND packet_id IN (" + ", ".join(f":p{i}" for i in range(len(packet_ids))) + ")"
        params = {**params, **{f"p{i}": pid for i, pid in enumerate(packet_ids)}}
    with app.app_context():
        db.session.execute(text(sql), params)
        db.session.commit()


def expire(app, packet_ids: list[str] | None = None, seconds: float = 1.0) -> None:
    """Move time forward for leased or backing-off packets by moving their ``visible_at`` back.

    Tests drive the queue clock this way instead of sleeping: the lease of a leased packet
    ends and the back-off of a pending one is over, exactly as if the time had passed.
    """
    _move_visible_at(app, ":moment", {"moment": epoch_now() - seconds}, packet_ids)


def advance(app, seconds: float, packet_ids: list[str] | None = None) -> None:
    """Let ``seconds`` pass for leased or pending packets: each ``visible_at`` moves back by it.

    Unlike ``expire`` this keeps the differences between leases, so a test can show that a
    lease extended past that much time still holds while the original one would have ended.
    """
    _move_visible_at(app, "visible_at - :seconds", {"seconds": seconds}, packet_ids)


def _joined():
    """Every column of a packet and of its delivery, as the service sees them together
    (raw_signals as the listings read it, whichever form it was stored in: migration 0020;
    karma_actions likewise: 0021)."""
    packets, deliveries = Packet.__table__, Delivery.__table__
    return select(*LISTED, *LISTED_DELIVERY).join_from(
        packets, deliveries, deliveries.c.packet_id == packets.c.packet_id
    )


def sql(app, statement: str, **params) -> list | None:
    """Run one SQL statement in the app's database and commit; its rows, if it returns any."""
    with app.app_context():
        rows = db.session.execute(text(statement), params)
        found = rows.all() if rows.returns_rows else None
        db.session.commit()
        return found


def row(app, packet_id: str) -> Any:
    """The packet's row as stored, with its delivery (JSON columns decoded)."""
    with app.app_context():
        found = db.session.execute(_joined().where(Packet.__table__.c.packet_id == packet_id)).one()
        db.session.commit()
        return found


def stored(app) -> list[dict]:
    """Every stored packet with its delivery, oldest first."""
    with app.app_context():
        packets = Packet.__table__
        rows = db.session.execute(
            _joined().order_by(packets.c.received_at, packets.c.packet_id)
        ).mappings()
        found = [dict(found) for found in rows]
        db.session.remove()
    return found


class Waiter(threading.Thread):
    """A consumer blocked in ``pending?wait=…`` on its own test client."""

    def __init__(self, app, wait: float) -> None:
        super().__init__(daemon=True)
        self.client = app.test_client()
        self.wait = wait
        self.body: dict | None = None
        self.returned_at = 0.0

    def run(self) -> None:
        response = self.client.get(f"{API}/packets/pending?limit=10&wait={self.wait}")
        self.returned_at = time.monotonic()
        assert response.status_code == 200
        self.body = response.json


def wait_until_listening(app) -> None:
    """Let the waiter reach its wait (and, with Redis, the listener subscribe)."""
    time.sleep(0.3)
    with app.app_context():
        redis_backend = queue.state.redis
    if redis_backend is not None:
        assert redis_backend.subscribed.wait(5), "the Redis listener never subscribed"


def measure_wake_up(waiting_app, ingesting_client, wait: float, label: str) -> float:
    """Ingest while a poll waits; return seconds from the ingest's answer to the poll's."""
    waiter = Waiter(waiting_app, wait)
    started = time.monotonic()
    waiter.start()
    wait_until_listening(waiting_app)
    packet_id = ingest(ingesting_client, user_id="long-poll")
    ingested_at = time.monotonic()
    join_all([waiter], wait + 5, "long poll")
    assert waiter.body is not None, "the long poll never answered"
    assert [p["packet_id"] for p in waiter.body["packets"]] == [packet_id]
    assert waiter.returned_at - started < wait, "woken only when the wait expired"
    latency = waiter.returned_at - ingested_at
    print(f"\nlong-poll wake-up latency ({label}): {latency * 1000:.1f} ms")
    return latency


@contextmanager
def sealer_before_signal_key_sets() -> Iterator[None]:
    """The sealer's statement as it was before migration 0020 (no dictionary of raw_signals'
    key sets to join): for sealing a database kept at an older revision, as the code of that
    time sealed it."""
    from bucket.services.audit import sealing
    from bucket.services.audit.content import (
        DECODED_LEAF_VALUES,
        LEAF_FROM,
        LEAF_TYPES,
        SIGNALS_TEXT,
    )

    current, stamp, selected = sealing.LEAVES_SQL, sealing.STAMP, sealing.LEAF_SELECT
    before = current.replace(LEAF_FROM, "packets").replace(SIGNALS_TEXT, "raw_signals::text")
    # Nor codes (migration 0022) nor scaled numbers (0026).
    for name, decoded in DECODED_LEAF_VALUES.items():
        before = before.replace(decoded, f"{name}::{LEAF_TYPES[name].sql}")
    sealing.LEAVES_SQL = before
    # Nor the layout its seals name (migration 0023).
    sealing.STAMP = {k: v for k, v in stamp.items() if k != "packet_layout"}
    # SQLite: nor the columns' names of migrations 0024 and 0026.
    sealing.LEAF_SELECT = tuple(
        literal_column(f"packets.{column.name}").label(column.name)
        if column.name in AS_RECEIVED
        else column
        for column in selected
    )
    try:
        yield
    finally:
        sealing.LEAVES_SQL, sealing.STAMP, sealing.LEAF_SELECT = current, stamp, selected
