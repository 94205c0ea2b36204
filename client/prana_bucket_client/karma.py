"""``BucketConsumer``: a drop-in base for Karma Tracker's consumer class.

Karma Tracker keeps its business logic (``determine_karma_action``, and ``process_packet`` if
it wants its own) in a subclass; everything that talks to the bucket is done here, on the
generic :class:`~prana_bucket_client.consumer.Consumer`. The constructor arguments, the
attributes they set and the public methods are those of the consumer Karma Tracker runs today.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import requests

from prana_bucket_client.consumer import Consumer, Outcome, Packet, idempotency_key
from prana_bucket_client.transport import Refused, Unavailable, pooled_session

log = logging.getLogger("prana_bucket_client")

KARMA_LOG_ACTION = "/api/v1/karma/log-action/"


class BucketConsumer:
    """Consumes PRANA packets from the bucket and turns them into karma actions.

    Args:
        bucket_url: the bucket (``BUCKET_API_BASE_URL``).
        karma_tracker_url: the Karma Tracker API; empty or None means the bucket's URL
            (integrated mode).
        poll_interval: seconds between polls of an empty bucket when long polling is off, and
            the pace of retries after refused polls. It no longer delays packets that wait.
        batch_size: packets asked for in one poll at most.
        token: the bucket's ``BUCKET_CONSUMER_TOKEN``, when it has one.
        concurrency: packets processed at once (worker threads).
        visibility_timeout: seconds of each lease; renewed while a packet is processed.
        max_in_flight: packets leased at most (default ``concurrency``).
        wait: long-poll seconds (0–20) while the bucket is empty.
        shutdown_timeout: seconds a stop gives running packets and the last acks.
        karma_timeout: seconds for one karma API call.
    """

    def __init__(
        self,
        bucket_url: str = "http://localhost:3000",
        karma_tracker_url: str | None = "http://localhost:8001",
        poll_interval: float = 5,
        batch_size: int = 10,
        *,
        token: str | None = None,
        concurrency: int = 16,
        visibility_timeout: int = 60,
        max_in_flight: int | None = None,
        wait: float = 10.0,
        shutdown_timeout: float = 30.0,
        karma_timeout: float = 10.0,
        install_signal_handlers: bool = True,
    ) -> None:
        self.bucket_url = bucket_url.rstrip("/")
        self.karma_tracker_url = (karma_tracker_url or bucket_url).rstrip("/")
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.running = False
        self.token = token
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.max_in_flight = max_in_flight or concurrency
        self.karma_timeout = karma_timeout
        self.karma_session = pooled_session(self.karma_tracker_url, concurrency)
        self.consumer = Consumer(
            self.bucket_url,
            self._handle,
            token=token,
            concurrency=concurrency,
            max_in_flight=self.max_in_flight,
            batch_size=batch_size,
            visibility_timeout=visibility_timeout,
            wait=wait,
            poll_interval=poll_interval,
            shutdown_timeout=shutdown_timeout,
            install_signal_handlers=install_signal_handlers,
        )
        self._loop_thread: threading.Thread | None = None
        self._actions_lock = threading.Lock()
        self._karma_actions = 0  # results with an action, for poll_and_process's stats

    # --- Karma Tracker's business logic (override in the subclass) -------------------------

    def determine_karma_action(self, packet: Packet) -> dict[str, Any] | None:
        """The karma action a packet earns: ``{"action", "intensity"?, "note"?}``, or None.

        Karma Tracker's subclass defines it; the base has no opinion on karma.
        """
        raise NotImplementedError("subclass BucketConsumer and define determine_karma_action")

    def process_packet(self, packet: Packet) -> dict[str, Any]:
        """Process one packet: ``{"success": bool, "action"?, "karma_result"?, "reason"?}``.

        The default asks :meth:`determine_karma_action` and, for an action, calls the karma API
        once through :meth:`log_karma_action` (with the packet's id as ``Idempotency-Key``).
        Runs on a worker thread, several packets at once: keep it thread-safe.
        """
        action = self.determine_karma_action(packet)
        if not action:
            return {"success": True, "action": None}
        try:
            response = self.log_karma_action(packet, action)
        except requests.RequestException as exc:
            log.error("packet %s: karma API call failed: %s", packet.get("packet_id"), exc)
            return {"success": False, "reason": "karma_api_failed"}
        if response.status_code != 200:
            log.error(
                "packet %s: karma API answered %s", packet.get("packet_id"), response.status_code
            )
            return {"success": False, "reason": f"karma_api_error_{response.status_code}"}
        try:
            karma_result = response.json()
        except ValueError:
            karma_result = None
        return {"success": True, "action": action["action"], "karma_result": karma_result}

    def log_karma_action(self, packet: Packet, action: dict[str, Any]) -> requests.Response:
        """POST the action to Karma Tracker's ``log-action`` endpoint, once per packet.

        The packet's ``packet_id`` travels as ``Idempotency-Key``: a karma API that
        deduplicates on it makes a redelivered packet harmless.
        """
        key = idempotency_key() or packet.get("packet_id")
        return self.karma_session.post(
            f"{self.karma_tracker_url}{KARMA_LOG_ACTION}",
            json={
                "user_id": packet.get("user_id"),
                "action": action["action"],
                "intensity": action.get("intensity", 1.0),
                "role": "learner",
                "note": action.get("note", ""),
                "context": f"prana-bucket: cognitive_state={packet.get('cognitive_state')}",
            },
            headers={"Idempotency-Key": str(key)} if key else None,
            timeout=self.karma_timeout,
        )

    # --- acknowledgements ------------------------------------------------------------------

    @staticmethod
    def karma_actions_for(packet_id: str, result: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``karma_actions`` acknowledged for a result: its action, if any, as a list."""
        action = result.get("action")
        if not action:
            return []
        karma_result = result.get("karma_result")
        intensity = karma_result.get("intensity", 1.0) if isinstance(karma_result, dict) else 1.0
        return [{"action": action, "packet_id": packet_id, "intensity": intensity}]

    def mark_packet_processed(
        self,
        packet_id: str,
        success: bool,
        karma_actions: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Acknowledge one packet now, on its own (the consumer loop batches its acks)."""
        try:
            status, _ = self.consumer.transport.acknowledge_one(
                {"packet_id": packet_id, "success": success, "karma_actions": karma_actions or []}
            )
        except (Unavailable, Refused) as exc:
            log.error("failed to mark packet %s as processed: %s", packet_id, exc)
            return False
        return status == 200

    def _handle(self, packet: Packet) -> Outcome:
        result = self.process_packet(packet)
        success = bool(result.get("success"))
        if success and result.get("action"):
            with self._actions_lock:
                self._karma_actions += 1
        return Outcome(
            success=success,
            karma_actions=self.karma_actions_for(packet["packet_id"], result),
            error_message=None if success else str(result.get("reason", "unknown")),
        )

    # --- running ---------------------------------------------------------------------------

    def poll_and_process(self) -> dict[str, Any]:
        """One round: poll up to ``batch_size`` packets, process them at once, acknowledge.

        Returns ``{"processed", "errors", "total", "queue_size", "karma_actions"}`` like the
        original.
        """
        actions_before = self._karma_actions
        try:
            round_ = self.consumer.run_once()
        except (Unavailable, Refused) as exc:
            log.error("failed to poll the bucket: %s", exc)
            return {"processed": 0, "errors": 1, "error": str(exc)}
        return {
            "processed": round_["succeeded"],
            "errors": round_["failed"],
            "total": round_["total"],
            "queue_size": round_["queue_size"],
            "karma_actions": self._karma_actions - actions_before,
        }

    def start_consumer(self) -> None:
        """Consume until :meth:`stop_consumer`, SIGTERM or SIGINT; return after a clean stop."""
        self.running = True
        self._loop_thread = threading.current_thread()
        log.info(
            "starting bucket consumer: %s, karma API %s", self.bucket_url, self.karma_tracker_url
        )
        try:
            self.consumer.run()
        finally:
            self.running = False
            self.consumer.close()

    def stop_consumer(self, timeout: float | None = None) -> None:
        """Stop: no more polls, held packets finished or released, acknowledgements flushed.

        From another thread it waits (up to ``timeout``) until that is done.
        """
        self.running = False
        self.consumer.stop()
        if self._loop_thread is not None and self._loop_thread is not threading.current_thread():
            self.consumer.wait_stopped(timeout)

    @property
    def stats(self) -> dict[str, Any]:
        """The consumer's counters (processed/s, failures, lag, leases extended, ...)."""
        return self.consumer.counters().as_dict()
