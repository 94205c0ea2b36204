"""Small HTTP and database steps shared by the delivery tests (ingest, poll, ack, move time)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text

from bucket.extensions import db
from bucket.models import Packet
from bucket.timeutil import epoch_now
from tests.factories import make_packet

API = "/api/v1/bucket/prana"


def ingest(client, **overrides) -> str:
    """Post one packet and return its packet_id (the ingest must succeed)."""
    response = client.post(f"{API}/ingest", json=make_packet(**overrides))
    assert response.status_code == 200, response.json
    return response.json["packet_id"]


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


def expire(app, packet_ids: list[str] | None = None, seconds: float = 1.0) -> None:
    """Move time forward for leased or backing-off packets by moving their ``visible_at`` back.

    Tests drive the queue clock this way instead of sleeping: the lease of a leased packet
    ends and the back-off of a pending one is over, exactly as if the time had passed.
    """
    sql = "UPDATE packets SET visible_at = :moment WHERE delivery_state IN ('leased', 'pending')"
    params: dict[str, Any] = {"moment": epoch_now() - seconds}
    if packet_ids is not None:
        sql += " AND packet_id IN (" + ", ".join(f":p{i}" for i in range(len(packet_ids))) + ")"
        params.update({f"p{i}": pid for i, pid in enumerate(packet_ids)})
    with app.app_context():
        db.session.execute(text(sql), params)
        db.session.commit()


def row(app, packet_id: str) -> Any:
    """The packet's row as stored (JSON columns decoded)."""
    with app.app_context():
        table = Packet.__table__
        found = db.session.execute(select(table).where(table.c.packet_id == packet_id)).one()
        db.session.commit()
        return found
