"""Prometheus metrics: requests and latency per endpoint, packet outcomes, queue gauges.

Per-request metrics are process-local counters; under gunicorn, ``PROMETHEUS_MULTIPROC_DIR``
(set by ``gunicorn.conf.py``) makes every worker write them to shared files that a scrape sums,
so any worker answers for all. Queue gauges are read from the database at scrape time, so they
are the same whichever worker answers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Flask, g, request
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

# Labels only: an unlabelled metric would create its value (a file, in multiprocess mode) at import.
REQUESTS = Counter(
    "bucket_http_requests",
    "HTTP requests answered, by endpoint, method and status.",
    ["endpoint", "method", "status"],
)
LATENCY = Histogram(
    "bucket_http_request_duration_seconds",
    "Time to answer a request, by endpoint.",
    ["endpoint"],
    # Long polls wait up to 20 s; ingest and acks should sit in the first few buckets.
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0),
)
PACKETS = Counter(
    "bucket_packets",
    "Packets by outcome as the HTTP API saw them: ingested, duplicate, "
    "rejected (ingest), processed, failed, dead (acknowledgements; lease reaping also "
    'dead-letters, see bucket_queue_packets{state="dead"}).',
    ["outcome"],
)
AUTH_REFUSED = Counter(
    "bucket_ingest_auth_refused",
    "Packets refused by authenticated ingest (BUCKET_INGEST_AUTH=require), by reason: "
    "missing, invalid or mismatch. Never quarantined.",
    ["reason"],
)
AUTH_OUTCOMES = Counter(
    "bucket_ingest_auth_packets",
    "Packets stored with each authentication outcome (observe and require).",
    ["outcome"],
)
INGEST_COMMITS = Counter(
    "bucket_ingest_commits",
    "Ingest writes (one statement, one commit) by the coalescer, alone (one request) or "
    "shared by several requests of a worker (BUCKET_INGEST_COALESCE).",
    ["kind"],
)
INGEST_COMMIT_REQUESTS = Counter(
    "bucket_ingest_commit_requests",
    "Requests answered from those writes; divided by bucket_ingest_commits, requests per commit.",
    ["kind"],
)
INGEST_COMMIT_PACKETS = Counter(
    "bucket_ingest_commit_packets",
    "Packets written by those writes.",
    ["kind"],
)
ACK_COMMITS = Counter(
    "bucket_ack_commits",
    "Acknowledgement writes (one statement, one commit) by the coalescer, alone (one request) "
    "or shared by several requests of a worker (BUCKET_ACK_COALESCE).",
    ["kind"],
)
ACK_COMMIT_REQUESTS = Counter(
    "bucket_ack_commit_requests",
    "Requests answered from those writes; divided by bucket_ack_commits, requests per commit.",
    ["kind"],
)
COALESCE_WAITING = Gauge(
    "bucket_coalesce_waiting",
    "Requests waiting for the next shared write (not those of the write in flight), summed "
    "over live workers; kind=ingest (BUCKET_INGEST_COALESCE) or ack (BUCKET_ACK_COALESCE).",
    ["kind"],
    multiprocess_mode="livesum",
)
PACKET_OUTCOMES = ("ingested", "duplicate", "rejected", "processed", "failed", "dead")
# Acknowledgement statuses (bucket.services.delivery.AckOutcome.status) to packet outcomes.
ACK_OUTCOMES = {"processed": "processed", "retry_scheduled": "failed", "dead": "dead"}

# Label values come from fixed sets, so no request can add a series: endpoints are the url
# map's (or "unmatched"), methods these (or "other"), statuses the app's (or "other").
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUSES = frozenset(range(100, 600))

_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def note_packets(**counts: int) -> None:
    """Record this request's packet outcomes for the metrics and the request log."""
    noted = g.get("packet_counts")
    if noted is None:
        noted = g.packet_counts = {}
    for outcome, count in counts.items():
        if count:
            noted[outcome] = noted.get(outcome, 0) + count


def note_auth(stored: Iterable[str], refused: Iterable[str]) -> None:
    """Count packets stored by authentication outcome and packets refused by reason."""
    for outcome in stored:
        AUTH_OUTCOMES.labels(outcome).inc()
    for reason in refused:
        AUTH_REFUSED.labels(reason).inc()


def note_ingest_commit(requests: int, packets: int) -> None:
    """Count one coalescer write and the requests and packets it carried."""
    kind = "shared" if requests > 1 else "alone"
    INGEST_COMMITS.labels(kind).inc()
    INGEST_COMMIT_REQUESTS.labels(kind).inc(requests)
    INGEST_COMMIT_PACKETS.labels(kind).inc(packets)


def note_ingest_waiting(waiting: int) -> None:
    """How many ingest requests of this worker wait for the next shared write now."""
    COALESCE_WAITING.labels("ingest").set(waiting)


def note_ack_commit(requests: int, results: int) -> None:
    """Count one acknowledgement coalescer write and the requests it carried."""
    kind = "shared" if requests > 1 else "alone"
    ACK_COMMITS.labels(kind).inc()
    ACK_COMMIT_REQUESTS.labels(kind).inc(requests)


def note_ack_waiting(waiting: int) -> None:
    """How many acknowledgement requests of this worker wait for the next shared write now."""
    COALESCE_WAITING.labels("ack").set(waiting)


def note_acks(outcomes: Iterable[Any]) -> None:
    """Record acknowledgement outcomes (objects with a ``status``) as packet outcomes."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        name = ACK_OUTCOMES.get(outcome.status)
        if name:
            counts[name] = counts.get(name, 0) + 1
    note_packets(**counts)


def record_request(response):
    """Count the request and its latency; cached label children keep this to a dict lookup."""
    started = g.get("request_started")
    endpoint = request.endpoint or "unmatched"
    method = request.method if request.method in METHODS else "other"
    key = (endpoint, method, response.status_code)
    children = _children.get(key)
    if children is None:
        code = response.status_code
        children = _children[key] = (
            REQUESTS.labels(endpoint, method, str(code) if code in STATUSES else "other"),
            LATENCY.labels(endpoint),
        )
    children[0].inc()
    if started is not None:
        children[1].observe(time.perf_counter() - started)
    counts = g.get("packet_counts")
    if counts is None and endpoint == "ingest.ingest" and response.status_code == 422:
        counts = g.packet_counts = {"rejected": 1}  # one packet refused by validation
    for outcome, count in (counts or {}).items():
        PACKETS.labels(outcome).inc(count)
    return response


class QueueCollector:
    """Queue gauges computed from the database when scraped (the same on every worker)."""

    def collect(self) -> Iterator[Metric]:
        from bucket.extensions import db
        from bucket.services.stats import collect_stats

        up = GaugeMetricFamily("bucket_database_up", "1 when the database answered this scrape.")
        try:
            stats = collect_stats()
        except SQLAlchemyError as exc:
            db.session.rollback()
            log.warning("metrics: database unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "bucket_queue_depth", "Packets a poll could take right now.", value=stats.queue_size
        )
        yield GaugeMetricFamily(
            "bucket_queue_leased",
            "Packets leased to a consumer right now.",
            value=stats.leased_packets,
        )
        oldest = stats.oldest_pending_age_seconds
        yield GaugeMetricFamily(
            "bucket_queue_oldest_pending_age_seconds",
            "Age of the oldest unfinished packet (0 when none waits).",
            value=0.0 if oldest is None or math.isnan(oldest) else oldest,
        )
        states = GaugeMetricFamily(
            "bucket_queue_packets", "Stored packets by delivery state.", labels=["state"]
        )
        states.add_metric(["ready"], stats.queue_size)
        states.add_metric(["unfinished"], stats.pending_packets)
        states.add_metric(["leased"], stats.leased_packets)
        states.add_metric(["retrying"], stats.retrying_packets)
        states.add_metric(["processed"], stats.processed_packets)
        states.add_metric(["dead"], stats.dead_packets)
        states.add_metric(["total"], stats.total_packets)
        yield states
        backend = GaugeMetricFamily(
            "bucket_queue_backend",
            "The queue backend in use (1) and the other (0).",
            labels=["backend"],
        )
        for name in ("redis", "memory"):
            backend.add_metric([name], 1 if stats.queue_backend == name else 0)
        yield backend
        yield GaugeMetricFamily(
            "bucket_quarantine_packets",
            "Refused packets kept in the quarantine (distinct contents).",
            value=stats.quarantined_packets,
        )
        yield GaugeMetricFamily(
            "bucket_quarantine_bytes",
            "Bytes of the refused packets kept.",
            value=stats.quarantine_bytes,
        )
        dropped = CounterMetricFamily(
            "bucket_quarantine_dropped",
            "Quarantine entries dropped: beyond the bounds (evicted) or the retention (expired).",
            labels=["reason"],
        )
        dropped.add_metric(["evicted"], stats.quarantine_evicted)
        dropped.add_metric(["expired"], stats.quarantine_expired)
        yield dropped
        if stats.default_partition_packets is not None:
            yield GaugeMetricFamily(
                "bucket_packets_default_partition",
                "Packets in the default partition, which no day partition covered (PostgreSQL; "
                "0 in normal operation).",
                value=stats.default_partition_packets,
            )
            yield GaugeMetricFamily(
                "bucket_deliveries_default_partition",
                "Processed deliveries in the default partition of processed deliveries, which "
                "no day partition covered (PostgreSQL; 0 in normal operation).",
                value=stats.default_partition_deliveries,
            )
            yield GaugeMetricFamily(
                "bucket_packet_keys_default_partition",
                "Packet keys in the default partition of packet_keys, whose client day has no "
                "partition (PostgreSQL; 0 in normal operation).",
                value=stats.default_partition_keys,
            )
            yield GaugeMetricFamily(
                "bucket_partition_days_ahead",
                "Days after today whose packet partition exists already (PostgreSQL).",
                value=stats.partition_days_ahead,
            )
        yield GaugeMetricFamily(
            "bucket_redis_connected",
            "1 when Redis answered a ping.",
            value=1 if stats.redis_connected else 0,
        )


def multiprocess_mode() -> bool:
    """True when this process's metrics live in shared files (decided when prometheus_client
    was imported, so a variable set later cannot make a scrape read files nobody writes)."""
    return values.ValueClass is not values.MutexValue and bool(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    )


def render_metrics() -> bytes:
    """The exposition text: request metrics (summed over workers) and queue gauges."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    queue_registry = CollectorRegistry(auto_describe=False)
    queue_registry.register(QueueCollector())
    return generate_latest(registry) + generate_latest(queue_registry)


def init_metrics(app: Flask) -> None:
    """Count every request once it has its response (also errors, 401s and 429s)."""
    disable_created_metrics()  # the *_created series only double the scrape
    app.after_request(record_request)
