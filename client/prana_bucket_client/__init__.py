"""A consumer client for PRANA Bucket.

``BucketConsumer`` is a drop-in base for Karma Tracker's consumer class; ``Consumer`` is the
generic machinery under it (long polls, flow control, batched acknowledgements with receipts,
automatic lease extension, back-off, clean stops).
"""

from prana_bucket_client.consumer import (
    Consumer,
    Counters,
    Outcome,
    current_packet,
    idempotency_key,
)
from prana_bucket_client.karma import BucketConsumer
from prana_bucket_client.transport import Backoff, BucketTransport, Refused, Unavailable

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BucketConsumer",
    "BucketTransport",
    "Consumer",
    "Counters",
    "Outcome",
    "Refused",
    "Unavailable",
    "__version__",
    "current_packet",
    "idempotency_key",
]
