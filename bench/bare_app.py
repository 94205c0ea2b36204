"""The second ceiling: a bare Flask app that runs the bucket's own statements and nothing else.

Same gunicorn command, same database and the same SQL as the bucket's hot paths, each answered
after its commit, on one kept autocommit connection per thread:

- ``POST …/ingest``: a packet, or an envelope of them, stored with the bucket's insert of the
  packets and their deliveries (the single-packet statement, or the batch's JSON statement);
- ``GET …/packets/pending``: the bucket's lease statement alone (the bucket also reaps expired
  leases and reads the queue's figures in a first statement, which this skips);
- ``POST …/packets/mark-processed``: the bucket's acknowledgement statement, for one result or
  for ``{"results": [...]}``.

Nothing else runs: no validation beyond parsing, no second deduplication key, no rate limits,
request log, metrics, auth or hooks. What the bucket costs above this is what its own layers
cost; what this costs above the trivial app is what the durable statements cost on the machine.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from datetime import datetime

import orjson
import psycopg
from flask import Flask, request

from bucket.services.delivery.acks import PG_ACK, ack_item, ack_params
from bucket.services.delivery.claims import PG_LEASE, lease_params
from bucket.services.delivery.settings import PACKET_COLUMN_NAMES, DeliverySettings
from bucket.services.ingest import BATCH_INSERT_SQL, SINGLE_INSERT_SQL, packet_row, single_values
from bucket.timeutil import utc_now
from config import Config

app = Flask(__name__)
API = "/api/v1/bucket/prana"
DSN = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
_local = threading.local()
# The delivery knobs, from the environment as the bucket reads them.
SETTINGS = DeliverySettings.from_config(vars(Config()))


def connection() -> psycopg.Connection:
    """One autocommit connection per gunicorn thread, kept open."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(DSN, autocommit=True, prepare_threshold=0)
    return conn


def answer(body: dict) -> app.response_class:
    return app.response_class(orjson.dumps(body), mimetype="application/json")


def stored_row(packet: dict, now: datetime) -> dict:
    """The bucket's own row for a packet (``packet_row``), built without validating it."""
    timestamp = datetime.fromisoformat(packet["timestamp"].replace("Z", "+00:00"))
    return packet_row({**packet, "timestamp": timestamp}, now, None)


@app.post(f"{API}/ingest")
def ingest():
    body = orjson.loads(request.get_data())
    now = utc_now()
    if "packets" in body:
        rows = [stored_row(packet, now) for packet in body["packets"]]
        doc = orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC | orjson.OPT_SORT_KEYS).decode()
        stored = connection().execute(BATCH_INSERT_SQL, {"doc": doc}).fetchall()
        return answer({"status": "ok", "stored": len(stored)})
    row = stored_row(body, now)
    connection().execute(SINGLE_INSERT_SQL, single_values(row))
    return answer({"status": "ingested", "packet_id": row["packet_id"], "received_at": now})


@app.get(f"{API}/packets/pending")
def pending():
    now = time.time()
    params = lease_params(
        now,
        SETTINGS.max_attempts,
        receipt=secrets.token_hex(8),
        until=now + SETTINGS.visibility_timeout,
        source="pending",
        limit=request.args.get("limit", 10, type=int),
    )
    rows = connection().execute(PG_LEASE, params)
    packets = [dict(zip(PACKET_COLUMN_NAMES, row, strict=True)) for row in rows]
    return answer({"packets": packets, "count": len(packets)})


@app.post(f"{API}/packets/mark-processed")
def mark_processed():
    body = orjson.loads(request.get_data())
    items = [ack_item(result) for result in body.get("results") or [body]]
    rows = connection().execute(PG_ACK, ack_params(items, SETTINGS, time.time())).fetchall()
    return answer({"status": "ok", "results": [{"packet_id": row[0]} for row in rows]})


@app.get("/health")
def health():
    return {"status": "ok"}
