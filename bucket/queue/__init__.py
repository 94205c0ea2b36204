"""The queue service: wakes long polls across processes; the database stays the queue of record."""

from bucket.queue.service import QueueService

__all__ = ["QueueService"]
