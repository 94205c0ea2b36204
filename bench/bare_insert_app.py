"""The second ceiling: a bare Flask app that stores each packet durably and does nothing else.

Same gunicorn command, same database, same statement as the bucket's single-packet ingest (one
prepared INSERT of the packet and its delivery, in autocommit, answered after the commit), but
without validation beyond parsing, deduplication by a second key, rate limits, request logs,
metrics or the bucket's hooks. What ingest costs above this is what the bucket's own layers
cost; what this costs above the trivial app is what one durable insert costs on the machine.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from datetime import UTC, datetime

import orjson
import psycopg
from flask import Flask, request
from psycopg.types.json import Json

from bucket.services.ingest import PACKET_COLUMNS, SINGLE_INSERT_SQL

app = Flask(__name__)
DSN = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
_local = threading.local()


def connection() -> psycopg.Connection:
    """One autocommit connection per gunicorn thread, kept open."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(DSN, autocommit=True, prepare_threshold=0)
    return conn


@app.post("/api/v1/bucket/prana/ingest")
def ingest():
    packet = orjson.loads(request.get_data())
    now = datetime.now(UTC).replace(tzinfo=None)
    identity = (
        f"{packet['system_type']}|{packet['user_id']}|{packet['session_id']}|{packet['timestamp']}"
    )
    row = {
        **packet,
        "packet_id": str(uuid.uuid4()),
        "dedup_key": hashlib.md5(identity.encode()).hexdigest(),
        "idempotency_key": None,
        "client_timestamp": datetime.fromisoformat(packet["timestamp"].replace("Z", "+00:00")),
        "raw_signals": Json(packet["raw_signals"]),
        "received_at": now,
    }
    connection().execute(SINGLE_INSERT_SQL, [row.get(name) for name in PACKET_COLUMNS])
    body = {"status": "ingested", "packet_id": row["packet_id"], "received_at": now.isoformat()}
    return app.response_class(orjson.dumps(body), mimetype="application/json")


@app.get("/health")
def health():
    return {"status": "ok"}
