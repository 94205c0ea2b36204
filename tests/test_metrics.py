"""Prometheus metrics: request counts and latencies, packet outcomes, queue gauges, workers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import servers
from tests.cluster import stop_process
from tests.conftest import backend_config
from tests.factories import make_packet

API = "/api/v1/bucket/prana"
ROOT = Path(__file__).resolve().parent.parent


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in exposition text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in labels.items()):
                return item.value
    return 0.0


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return response.get_data(as_text=True)


def test_requests_are_counted_by_endpoint_and_status_with_latency(client):
    """Each answered request adds to its endpoint/status counter and latency histogram."""
    before = scrape(client)
    for _ in range(3):
        client.get("/health")
    client.get("/no/such/path")
    after = scrape(client)
    labels = {"endpoint": "health.health", "method": "GET", "status": "200"}
    assert (
        sample(after, "bucket_http_requests_total", **labels)
        - sample(before, "bucket_http_requests_total", **labels)
        == 3
    )
    missing = {"endpoint": "unmatched", "method": "GET", "status": "404"}
    assert sample(after, "bucket_http_requests_total", **missing) >= 1
    count = "bucket_http_request_duration_seconds_count"
    assert (
        sample(after, count, endpoint="health.health")
        - sample(before, count, endpoint="health.health")
        == 3
    )


def test_packet_outcomes_are_counted(make_app):
    """Ingested, duplicate, rejected, processed, failed and dead packets each have a count."""
    app = make_app(BUCKET_MAX_ATTEMPTS=2, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    before = scrape(client)
    first, second = make_packet(), make_packet()
    client.post(f"{API}/ingest", json=first)
    client.post(f"{API}/ingest", json=first)  # duplicate
    client.post(f"{API}/ingest", json={**make_packet(), "active_seconds": "x"})  # rejected
    client.post(f"{API}/ingest", json={"packets": [second, {"bad": 1}]})  # 1 ingested, 1 rejected
    leased = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    ids = sorted(p["packet_id"] for p in leased)
    client.post(f"{API}/packets/mark-processed", json={"packet_id": ids[0], "success": True})
    client.post(f"{API}/packets/mark-processed", json={"packet_id": ids[1], "success": False})
    client.get(f"{API}/packets/pending?limit=10")
    client.post(
        f"{API}/packets/mark-processed",
        json={"results": [{"packet_id": ids[1], "success": False}]},
    )
    after = scrape(client)

    def delta(outcome):
        name = "bucket_packets_total"
        return sample(after, name, outcome=outcome) - sample(before, name, outcome=outcome)

    assert delta("ingested") == 2
    assert delta("duplicate") == 1
    assert delta("rejected") == 2
    assert delta("processed") == 1
    assert delta("failed") == 1
    assert delta("dead") == 1


def test_queue_gauges_match_the_status_endpoint(client, backend):
    """Depth, leased, oldest age and backend come from the database at scrape time."""
    for _ in range(3):
        client.post(f"{API}/ingest", json=make_packet())
    client.get(f"{API}/packets/pending?limit=1")
    time.sleep(0.01)
    text = scrape(client)
    status = client.get(f"{API}/status").json
    assert sample(text, "bucket_database_up") == 1
    assert sample(text, "bucket_queue_depth") == status["queue_size"] == 2
    assert sample(text, "bucket_queue_leased") == status["leased_packets"] == 1
    assert sample(text, "bucket_queue_packets", state="total") == 3
    assert sample(text, "bucket_queue_oldest_pending_age_seconds") > 0
    live = "memory" if backend == "sqlite" else "redis"
    assert sample(text, "bucket_queue_backend", backend=live) == 1
    assert sample(text, "bucket_redis_connected") == (1 if backend == "postgres" else 0)


def test_metrics_answer_without_the_database(make_app, backend, tmp_path):
    """A scrape during a database outage still answers, with bucket_database_up 0."""
    make_app()
    bad = (
        f"sqlite:///{tmp_path}/missing/x.sqlite3"
        if backend == "sqlite"
        else f"postgresql+psycopg://postgres@127.0.0.1:{servers.free_port()}/gone"
    )
    text = scrape(make_app(SQLALCHEMY_DATABASE_URI=bad).test_client())
    assert sample(text, "bucket_database_up") == 0


@pytest.mark.slow
def test_gunicorn_workers_report_one_sum_not_fragments(request, backend, tmp_path):
    """Two gunicorn workers: whichever answers the scrape reports every worker's requests."""
    config = backend_config(request, backend, tmp_path)
    port = servers.free_port()
    metrics_dir = tmp_path / "prometheus"
    env = {
        **os.environ,
        "DATABASE_URL": config["SQLALCHEMY_DATABASE_URI"],
        "BUCKET_REDIS_PREFIX": config["BUCKET_REDIS_PREFIX"],
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "BUCKET_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "BUCKET_REQUEST_LOG": "false",
    }
    if config["REDIS_URL"]:
        env["REDIS_URL"] = config["REDIS_URL"]
    else:
        env.pop("REDIS_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/health/ready", timeout=5, headers={"Connection": "close"})
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        sent = 0
        # New connection each time, until both workers have served some requests.
        while sent < 400:
            requests.get(f"{base}/health", timeout=5, headers={"Connection": "close"})
            sent += 1
            pids = {path.name.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
            if sent >= 40 and len(pids) >= 2:
                break
        assert len(pids) >= 2, "one worker served everything; cannot check the sum"
        labels = {"endpoint": "health.health", "method": "GET", "status": "200"}
        for _ in range(4):  # any worker may answer: each must report the sum
            text = requests.get(f"{base}/metrics", timeout=5, headers={"Connection": "close"}).text
            assert sample(text, "bucket_http_requests_total", **labels) == sent
    finally:
        stop_process(process, grace=30)
