"""What ``flask shell`` pre-loads for operators."""

from __future__ import annotations

from typing import Any


def shell_context() -> dict[str, Any]:
    """db, the packet and delivery models, the queue service and the operator's functions."""
    from bucket.extensions import db, queue
    from bucket.models import Delivery, DeliveryState, Packet
    from bucket.services import delivery, partitions
    from bucket.services.bookkeeping import book_new_packets
    from bucket.services.compaction import compact_partitions
    from bucket.services.ingest import store_packets
    from bucket.services.listing import user_packets
    from bucket.services.stats import collect_stats

    return {
        "db": db,
        "Packet": Packet,
        "Delivery": Delivery,
        "DeliveryState": DeliveryState,
        "queue": queue,
        "stats": collect_stats,
        "user_packets": user_packets,
        "store_packets": store_packets,
        "claim": delivery.claim,
        "acknowledge": delivery.acknowledge,
        "requeue": delivery.requeue,
        "book": book_new_packets,
        "ensure_partitions": partitions.ensure_partitions,
        "partitions": partitions.partitions,
        "compact_partitions": compact_partitions,
    }
