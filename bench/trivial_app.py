"""The ceiling: a trivial Flask app on the bucket's paths, served by the same gunicorn command.

Each endpoint answers a canned body of the bucket's shape without any work, so a client that runs
against both measures what the bucket's own layers cost on top of Flask, gunicorn and the client.
"""

from itertools import count

from flask import Flask, jsonify, request

app = Flask(__name__)
API = "/api/v1/bucket/prana"
_ids = count()


def canned_packet(number: int) -> dict:
    """A packet as ``pending`` answers it (same fields, fixed values)."""
    return {
        "packet_id": f"00000000-0000-7000-8000-{number:012d}",
        "user_id": "stu_1",
        "employee_id": None,
        "session_id": "s",
        "lesson_id": "l",
        "task_id": None,
        "system_type": "gurukul",
        "role": "student",
        "cognitive_state": "ON_TASK",
        "state": None,
        "focus_score": 70.0,
        "integrity_score": None,
        "active_seconds": 4.0,
        "idle_seconds": 1.0,
        "away_seconds": 0.0,
        "raw_signals": {"tab_visible": True},
        "client_timestamp": "2026-11-28T10:00:00+00:00",
        "received_at": "2026-11-28T10:00:00.000001+00:00",
        "delivery_state": "leased",
        "delivery_count": 1,
        "receipt": "0123456789abcdef",
        "lease_expires_at": "2026-11-28T10:01:00+00:00",
        "suspect": False,
    }


@app.post(f"{API}/ingest")
def ingest():
    """Answer like the bucket without storing anything."""
    return jsonify(
        {
            "status": "ingested",
            "packet_id": "00000000-0000-7000-8000-000000000000",
            "received_at": "2026-11-28T10:00:00.000001+00:00",
        }
    )


@app.get(f"{API}/packets/pending")
def pending():
    """``limit`` canned packets, each with an id of its own."""
    limit = int(request.args.get("limit", 10))
    packets = [canned_packet(next(_ids)) for _ in range(limit)]
    return jsonify({"packets": packets, "count": len(packets), "queue_size": 1000})


@app.post(f"{API}/packets/mark-processed")
def mark_processed():
    """One result or many, answered without looking."""
    body = request.get_json()
    if "results" in body:
        results = [{"packet_id": r["packet_id"], "status": "processed"} for r in body["results"]]
        return jsonify({"results": results})
    return jsonify({"status": "ok", "message": "Packet marked as processed", "packet_id": "x"})


@app.get(f"{API}/status")
def status():
    """A fixed status body."""
    return jsonify({"queue_size": 0, "total_packets": 0, "pending_packets": 0})


@app.get("/health")
def health():
    return jsonify({"status": "ok"})
