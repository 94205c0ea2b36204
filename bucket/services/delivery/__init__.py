"""Handing packets to consumers: claims, acknowledgements, leases, reaping and requeues.

Every transition is one atomic statement (or one transaction) on the packets table, so the
database alone decides who holds a packet; the queue service only wakes long polls.
"""

from bucket.services.delivery.acks import AckOutcome, acknowledge
from bucket.services.delivery.claims import Claim, claim, poll
from bucket.services.delivery.leases import change_visibility
from bucket.services.delivery.reaping import QueueRebuild, reap_exhausted, rebuild_queue
from bucket.services.delivery.requeue import requeue
from bucket.services.delivery.settings import DeliverySettings, ready_condition

__all__ = [
    "AckOutcome",
    "Claim",
    "DeliverySettings",
    "QueueRebuild",
    "acknowledge",
    "change_visibility",
    "claim",
    "poll",
    "ready_condition",
    "reap_exhausted",
    "rebuild_queue",
    "requeue",
]
