"""The baseline: a trivial Flask endpoint, served by the same gunicorn command as the bucket."""

from flask import Flask, jsonify

app = Flask(__name__)


@app.post("/api/v1/bucket/prana/ingest")
def ingest():
    """Answer like the bucket without doing anything."""
    return jsonify({"status": "ingested"})
