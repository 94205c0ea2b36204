"""The generic consumer: long polls, a bounded pool, batched acks, lease keeping, clean stops.

One :class:`Consumer` runs four kinds of threads:

- the **pollers** (one, or up to four when ``batch_size`` is below ``max_in_flight``) lease only
  as many packets as there are free slots (``max_in_flight``), long-polling while the bucket
  is empty;
- the **workers** (a pool of ``concurrency`` threads) run the handler, one packet each;
- the **acknowledger** sends finished packets' outcomes in ``{"results": [...]}`` batches,
  with their receipts, after at most ``ack_delay`` seconds or ``ack_batch_size`` results;
- the **lease keeper** extends the lease of every packet still held when a third of it is
  gone, so a slow handler never sees its packet served to someone else.

A stop (:meth:`Consumer.stop`, SIGTERM or SIGINT) ends polling, finishes the packets a worker
was free for when they were leased (with ``max_in_flight`` = ``concurrency``, all of them),
releases (visibility 0) those queued behind busy workers, gives running handlers
``shutdown_timeout`` seconds, and flushes every acknowledgement before :meth:`Consumer.run`
returns. So a stop leaves nothing to be redelivered.
"""

from __future__ import annotations

import contextvars
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prana_bucket_client.transport import (
    Backoff,
    BucketTransport,
    Refused,
    Unavailable,
)

log = logging.getLogger("prana_bucket_client")

MAX_POLL_LIMIT = 500  # the bucket's ceiling for ``limit``
MAX_ACK_BATCH = 500  # and for results in one acknowledgement

Packet = dict[str, Any]

_current_packet: contextvars.ContextVar[Packet | None] = contextvars.ContextVar(
    "prana_bucket_packet", default=None
)


def current_packet() -> Packet | None:
    """The packet the calling handler thread is working on (None outside a handler)."""
    return _current_packet.get()


def idempotency_key() -> str | None:
    """The ``packet_id`` of the packet being handled: pass it to side effects as an
    idempotency key, so a redelivered packet cannot act twice downstream."""
    packet = _current_packet.get()
    return None if packet is None else packet.get("packet_id")


@dataclass
class Outcome:
    """What a handler made of one packet; becomes one result of a batch acknowledgement.

    A handler may also return ``None`` or ``True`` (success) or ``False`` (failure); an
    exception is a failure whose ``error_message`` names it.
    """

    success: bool = True
    karma_actions: list[dict[str, Any]] | None = None
    error_message: str | None = None


Handler = Callable[[Packet], "Outcome | bool | None"]


@dataclass
class Counters:
    """What the consumer did so far (read a copy with :meth:`Consumer.counters`)."""

    polls: int = 0
    leased: int = 0
    succeeded: int = 0
    failed: int = 0  # handler reported failure
    crashed: int = 0  # handler raised
    acknowledged: int = 0
    ack_refused: int = 0  # stale receipt, unknown or dead packet
    extended: int = 0
    released: int = 0
    lost_leases: int = 0
    abandoned: int = 0  # still running when the stop deadline passed
    unavailable: int = 0  # bucket calls that failed and were retried after a back-off
    lag_seconds: float | None = None  # age of the newest packet leased, at its lease
    started_at: float = field(default_factory=time.time)

    @property
    def processed_per_second(self) -> float:
        elapsed = max(1e-6, time.time() - self.started_at)
        return (self.succeeded + self.failed + self.crashed) / elapsed

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["processed_per_second"] = round(self.processed_per_second, 2)
        return data


@dataclass
class _Held:
    """A packet this consumer holds a lease on, from its poll until its ack is recorded."""

    packet: Packet
    receipt: str | None
    expires: float  # monotonic, conservatively from before the poll was sent
    # A worker was free when it was leased: it is finished even if a stop comes meanwhile.
    immediate: bool = True
    started: bool = False  # a worker took it (to handle it, or to release it)
    lost: bool = False  # the lease ran out while the bucket was unreachable
    finished: bool = False
    release: bool = False


def _age_seconds(received_at: Any) -> float | None:
    if not isinstance(received_at, str):
        return None
    try:
        return max(0.0, time.time() - datetime.fromisoformat(received_at).timestamp())
    except ValueError:
        return None


class Consumer:
    """Consume packets from a PRANA Bucket with ``handler``, one packet at a time per worker.

    Args:
        base_url: the bucket, e.g. ``http://localhost:3000``.
        handler: called with each packet (a dict as ``pending`` answers it); returns an
            :class:`Outcome`, a bool or None; an exception acknowledges a failure, so the
            bucket's retries and dead letters apply and batch-mates are unharmed.
        token: ``BUCKET_CONSUMER_TOKEN`` of the bucket, when it has one.
        concurrency: worker threads (packets handled at once).
        max_in_flight: packets leased at most (default ``concurrency``): never more leased
            than the workers can start.
        batch_size: packets asked for in one poll at most.
        visibility_timeout: seconds of each lease; kept alive while the packet is handled.
        wait: seconds a poll of an empty bucket waits for packets (long polling, 0–20).
        poll_interval: pause after an empty answer to a short poll or a refused poll.
        ack_batch_size, ack_delay: an acknowledgement is sent when this many results wait or
            the oldest has waited this long.
        shutdown_timeout: seconds a stop gives running handlers and the last acks.
        install_signal_handlers: :meth:`run` stops cleanly on SIGTERM and SIGINT (only when
            called from the main thread).
        log_interval: seconds between progress log lines while packets flow.
    """

    def __init__(
        self,
        base_url: str,
        handler: Handler,
        *,
        token: str | None = None,
        concurrency: int = 16,
        max_in_flight: int | None = None,
        batch_size: int = MAX_POLL_LIMIT,
        visibility_timeout: int = 60,
        wait: float = 10.0,
        poll_interval: float = 5.0,
        ack_batch_size: int = 100,
        ack_delay: float = 0.05,
        shutdown_timeout: float = 30.0,
        request_timeout: float = 10.0,
        install_signal_handlers: bool = True,
        log_interval: float = 60.0,
        transport: BucketTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 1 <= visibility_timeout <= 43200:
            raise ValueError("visibility_timeout must be 1-43200 seconds")
        if not 0 <= wait <= 20:
            raise ValueError("wait must be 0-20 seconds")
        self.base_url = base_url.rstrip("/")
        self.handler = handler
        self.concurrency = concurrency
        self.max_in_flight = max(1, max_in_flight or concurrency)
        self.batch_size = max(1, min(batch_size, MAX_POLL_LIMIT))
        # Enough pollers that small polls (``batch_size`` < ``max_in_flight``) keep the slots
        # full while each poll's round trip is under way; never more than 4.
        self.pollers = max(1, min(4, -(-self.max_in_flight // self.batch_size)))
        # A poller waits for this many free slots: polls of one or two packets, one as each
        # handler finishes, would cost the bucket and the client a round trip per packet.
        self.low_water = max(1, min(self.batch_size, -(-self.max_in_flight // (2 * self.pollers))))
        self.visibility_timeout = visibility_timeout
        self.wait = wait
        self.poll_interval = poll_interval
        self.ack_batch_size = max(1, min(ack_batch_size, MAX_ACK_BATCH))
        self.ack_delay = ack_delay
        self.shutdown_timeout = shutdown_timeout
        self.install_signal_handlers = install_signal_handlers
        self.log_interval = log_interval
        # One connection per poller, the acknowledger and the lease keeper.
        self.transport = transport or BucketTransport(
            self.base_url, token, pool_size=self.pollers + 2, timeout=request_timeout
        )
        self._lock = threading.Condition()
        self._held: dict[str, _Held] = {}
        self._in_flight = 0  # leased and not finished by a worker
        self._reserved = 0  # slots set aside by pollers for the packets they asked for
        self._acks: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._quit = threading.Event()  # the background threads' end, after the last flush
        self._give_up_acks = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._counters = Counters()

    # --- public --------------------------------------------------------------------------

    def counters(self) -> Counters:
        """A snapshot of the counters."""
        with self._lock:
            return Counters(**{k: v for k, v in asdict(self._counters).items()})

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to stop: no more polls; it returns once the stop is complete."""
        if not self._stop.is_set():
            log.info("stopping: no more polls; finishing or releasing held packets")
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`run` has returned (acks flushed); False on timeout."""
        return self._done.wait(timeout)

    def run(self) -> None:
        """Poll and handle packets until :meth:`stop` or SIGTERM/SIGINT; then stop cleanly."""
        self._stop.clear()
        self._done.clear()
        previous = self._install_signals()
        try:
            self._start_threads()
            log.info(
                "consuming %s: concurrency %d, max in flight %d, lease %d s, long poll %g s",
                self.base_url,
                self.concurrency,
                self.max_in_flight,
                self.visibility_timeout,
                self.wait,
            )
            pollers = [
                threading.Thread(target=self._poll_loop, name=f"bucket-poller-{n}", daemon=True)
                for n in range(self.pollers)
            ]
            for poller in pollers:
                poller.start()
            # The calling thread only waits, so a signal's handler runs at once.
            while not self._stop.wait(0.5):
                if not any(poller.is_alive() for poller in pollers):
                    break
            self._stop.set()
            for poller in pollers:  # a long poll ends within ``wait``; its packets are kept
                poller.join()
        finally:
            try:
                self._shut_down()
            finally:
                self._restore_signals(previous)
                self._done.set()

    def run_once(self) -> dict[str, Any]:
        """One round: poll once (no long poll), handle what came on the pool, flush its acks.

        Returns ``{"total", "succeeded", "failed", "queue_size"}``.
        """
        self._start_threads()
        before = self.counters()
        with self._lock:
            free = self.max_in_flight - self._in_flight
        sent = time.monotonic()
        body = self._poll(max(1, min(free, self.batch_size)), wait=0.0)
        ids = self._dispatch(body.get("packets", []), sent)
        with self._lock:
            self._acks_due = True
            self._lock.notify_all()
            while any(pid in self._held for pid in ids):
                self._lock.wait(0.5)
        after = self.counters()
        return {
            "total": len(ids),
            "succeeded": after.succeeded - before.succeeded,
            "failed": (after.failed + after.crashed) - (before.failed + before.crashed),
            "queue_size": body.get("queue_size", 0),
        }

    def close(self) -> None:
        """End the background threads started by :meth:`run_once` (flushing acks)."""
        if self._threads and self._done.is_set():
            self._stop.set()
            self._shut_down()

    # --- polling -------------------------------------------------------------------------

    def _poll(self, limit: int, wait: float) -> dict[str, Any]:
        with self._lock:
            self._counters.polls += 1
        return self.transport.poll(limit, self.visibility_timeout, wait)

    def _poll_loop(self) -> None:
        """One poller: reserve free slots, lease that many packets at most, start them."""
        backoff = Backoff(cap=max(5.0, self.poll_interval * 2))
        while not self._stop.is_set():
            with self._lock:
                while (
                    self.max_in_flight - self._in_flight - self._reserved < self.low_water
                    and not self._stop.is_set()
                ):
                    self._lock.wait(1.0)
                if self._stop.is_set():
                    break
                limit = min(self.max_in_flight - self._in_flight - self._reserved, self.batch_size)
                self._reserved += limit
            sent = time.monotonic()
            try:
                body = self._poll(limit, self.wait)
            except Unavailable as exc:
                self._unreserve(limit)
                pause = backoff.delay(exc.retry_after)
                with self._lock:
                    self._counters.unavailable += 1
                log.warning("poll failed (%s); polling again in %.2f s", exc, pause)
                self._stop.wait(pause)
                continue
            except Refused as exc:
                self._unreserve(limit)
                log.error("poll refused (%s); polling again in %g s", exc, self.poll_interval)
                self._stop.wait(self.poll_interval)
                continue
            except Exception:
                self._unreserve(limit)
                log.exception("poll failed unexpectedly; polling again in %g s", self.poll_interval)
                self._stop.wait(self.poll_interval)
                continue
            backoff.reset()
            packets = body.get("packets") or []
            self._dispatch(packets, sent, reserved=limit)
            if not packets and (self.wait == 0 or time.monotonic() - sent < 0.05):
                # Pace an empty bucket only when the server did not wait for us.
                self._stop.wait(self.poll_interval if self.wait == 0 else 0.5)

    def _unreserve(self, count: int) -> None:
        with self._lock:
            self._reserved -= count
            self._lock.notify_all()

    def _dispatch(self, packets: list[Packet], sent: float, reserved: int = 0) -> list[str]:
        """Hold and start each leased packet (``reserved`` slots were set aside for them)."""
        expires = sent + self.visibility_timeout
        taken: list[tuple[str, _Held]] = []
        with self._lock:
            self._reserved -= reserved
            for packet in packets:
                self._in_flight += 1
                held = _Held(
                    packet,
                    packet.get("receipt"),
                    expires,
                    immediate=self._in_flight <= self.concurrency,
                )
                self._held[packet["packet_id"]] = held
                taken.append((packet["packet_id"], held))
            self._counters.leased += len(packets)
            if packets:
                age = _age_seconds(packets[-1].get("received_at"))
                if age is not None:
                    self._counters.lag_seconds = round(age, 3)
            self._lock.notify_all()
        for pid, held in taken:
            if self._pool is None:
                held.started = held.release = True
                self._release(pid, held)
            else:
                self._pool.submit(self._work, pid, held)
        return [pid for pid, _ in taken]

    # --- workers -------------------------------------------------------------------------

    def _work(self, pid: str, held: _Held) -> None:
        with self._lock:
            if held.started:  # released by the stop after the pool was cancelled
                return
            held.started = True
            if self._stop.is_set() and not held.immediate:
                held.release = True
        if held.release:
            self._release(pid, held)
            return
        token = _current_packet.set(held.packet)
        try:
            outcome = self._normalise(self.handler(held.packet))
        except Exception as exc:  # noqa: BLE001 - a handler's crash is the packet's failure
            log.exception("handler raised on packet %s", pid)
            outcome = Outcome(False, None, f"{type(exc).__name__}: {exc}"[:1000])
            kind = "crashed"
        else:
            kind = "succeeded" if outcome.success else "failed"
        finally:
            _current_packet.reset(token)
        result = {
            "packet_id": pid,
            "success": outcome.success,
            "karma_actions": outcome.karma_actions,
            "error_message": outcome.error_message,
            "receipt": held.receipt,
        }
        with self._lock:
            setattr(self._counters, kind, getattr(self._counters, kind) + 1)
            held.finished = True
            self._in_flight -= 1
            self._acks.append((time.monotonic(), result))
            self._lock.notify_all()

    @staticmethod
    def _normalise(value: Outcome | bool | None) -> Outcome:
        if isinstance(value, Outcome):
            return value
        if value is None or value is True:
            return Outcome(True)
        if value is False:
            return Outcome(False, None, "handler reported failure")
        raise TypeError(f"handler returned {type(value).__name__}, not Outcome/bool/None")

    def _release(self, pid: str, held: _Held) -> None:
        """Give the lease back (visibility 0): the packet is served again at once."""
        try:
            if held.receipt:
                self.transport.change_lease(pid, held.receipt, 0)
                with self._lock:
                    self._counters.released += 1
        except (Unavailable, Refused) as exc:
            log.warning("could not release %s (%s); it returns when its lease ends", pid, exc)
        finally:
            with self._lock:
                if self._held.get(pid) is held:
                    del self._held[pid]
                self._in_flight -= 1
                self._lock.notify_all()

    # --- acknowledgements ----------------------------------------------------------------

    _acks_due = False

    def _ack_loop(self) -> None:
        backoff = Backoff(cap=max(5.0, self.poll_interval * 2))
        while True:
            with self._lock:
                while True:
                    if self._acks:
                        oldest = self._acks[0][0]
                        due = oldest + self.ack_delay - time.monotonic()
                        if (
                            len(self._acks) >= self.ack_batch_size
                            or due <= 0
                            or self._quit.is_set()
                            or self._acks_due
                        ):
                            break
                        self._lock.wait(due)
                    elif self._quit.is_set():
                        return
                    else:
                        self._lock.wait(0.5)
                batch = [result for _, result in self._acks[:MAX_ACK_BATCH]]
                del self._acks[: len(batch)]
                self._acks_due = False
            self._send_acks(batch, backoff)

    def _send_acks(self, batch: list[dict[str, Any]], backoff: Backoff) -> None:
        def note_retry() -> None:
            with self._lock:
                self._counters.unavailable += 1

        try:
            answers = self.transport.call_until(
                lambda: self.transport.acknowledge(batch),
                self._give_up_acks,
                backoff,
                f"acknowledging {len(batch)} packets",
                note_retry,
            )
        except Unavailable:
            log.error("gave up acknowledging %d packets at the stop deadline", len(batch))
            answers = []
        except Refused as exc:
            log.error("acknowledgement of %d packets refused: %s", len(batch), exc)
            answers = []
        except Exception:  # the acknowledger must outlive one odd answer
            log.exception("acknowledgement of %d packets failed", len(batch))
            answers = []
        refused = [a for a in answers if a.get("code", 200) != 200]
        for answer in refused:
            log.warning(
                "ack of %s refused: %s (%s)",
                answer.get("packet_id"),
                answer.get("status"),
                answer.get("message", ""),
            )
        with self._lock:
            self._counters.acknowledged += len(answers) - len(refused)
            self._counters.ack_refused += len(refused)
            self._counters.lost_leases += sum(
                1 for a in refused if a.get("status") == "stale_receipt"
            )
            for result in batch:
                self._held.pop(result["packet_id"], None)
            self._lock.notify_all()

    # --- leases --------------------------------------------------------------------------

    def _lease_loop(self) -> None:
        # Extend once a third of the lease is gone, checking six times a lease: a failed
        # extension (429, 503, a dropped connection) is tried again at each tick until then.
        tick = min(1.0, self.visibility_timeout / 6)
        last_log = time.monotonic()
        while not self._quit.wait(tick):
            now = time.monotonic()
            margin = self.visibility_timeout * 2 / 3
            with self._lock:
                due = [
                    (pid, held)
                    for pid, held in self._held.items()
                    if held.receipt
                    and not (held.release or held.lost)
                    and held.expires - now < margin
                ]
            for pid, held in due:
                self._extend(pid, held)
            if self.log_interval and now - last_log >= self.log_interval:
                last_log = now
                self._log_progress()

    def _extend(self, pid: str, held: _Held) -> None:
        sent = time.monotonic()
        try:
            status, body = self.transport.change_lease(
                pid, held.receipt or "", self.visibility_timeout
            )
        except (Unavailable, Refused) as exc:
            with self._lock:
                self._counters.unavailable += 1
            log.warning("could not extend the lease of %s (%s); trying again", pid, exc)
            return
        with self._lock:
            if status == 200:
                held.expires = sent + self.visibility_timeout
                self._counters.extended += 1
            elif self._held.get(pid) is held and not held.finished:
                # Acknowledged meanwhile is fine; otherwise the lease is gone (expired while
                # the bucket was unreachable): the handler's result will be refused as stale.
                self._counters.lost_leases += 1
                held.lost = True  # its ack keeps the receipt, so it cannot overwrite a newer one
                log.warning("lost the lease of %s: %s", pid, body)

    def _log_progress(self) -> None:
        counters = self.counters()
        log.info(
            "processed %d (%.1f/s), failures %d, crashes %d, in flight %d, lag %s s, "
            "extended %d, refused acks %d",
            counters.succeeded + counters.failed + counters.crashed,
            counters.processed_per_second,
            counters.failed,
            counters.crashed,
            self._in_flight,
            counters.lag_seconds,
            counters.extended,
            counters.ack_refused,
        )

    # --- lifecycle -----------------------------------------------------------------------

    def _start_threads(self) -> None:
        if self._threads:
            return
        self._quit.clear()
        self._give_up_acks.clear()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="bucket-worker")
        self._threads = [
            threading.Thread(target=self._ack_loop, name="bucket-acks", daemon=True),
            threading.Thread(target=self._lease_loop, name="bucket-leases", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _shut_down(self) -> None:
        """Release what was not started, wait for running handlers, flush acks, end threads."""
        deadline = time.monotonic() + self.shutdown_timeout
        # Packets queued behind busy workers are given back now, not when a worker frees up.
        with self._lock:
            queued = [
                (pid, held)
                for pid, held in self._held.items()
                if not held.started and not held.immediate
            ]
            for _, held in queued:
                held.started = held.release = True
        for pid, held in queued:
            self._release(pid, held)
        if self._pool is not None:
            # Queued work items see ``release`` and give their leases back at once.
            while True:
                with self._lock:
                    running = self._in_flight
                    if running == 0 or time.monotonic() >= deadline:
                        break
                    self._lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            with self._lock:
                if self._in_flight:
                    self._counters.abandoned += self._in_flight
                    log.error(
                        "%d handlers still running at the stop deadline; their packets return "
                        "when their leases end",
                        self._in_flight,
                    )
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            with self._lock:
                unclaimed = [(p, h) for p, h in self._held.items() if not h.started]
                for _, held in unclaimed:
                    held.started = held.release = True
            for pid, held in unclaimed:
                self._release(pid, held)
        # The acknowledger flushes what is left, retrying until a short grace after the deadline.
        self._quit.set()
        with self._lock:
            self._acks_due = True
            self._lock.notify_all()
        timer = threading.Timer(max(1.0, deadline - time.monotonic()) + 5.0, self._give_up_acks.set)
        timer.daemon = True
        timer.start()
        for thread in self._threads:
            thread.join()
        timer.cancel()
        self._threads = []
        counters = self.counters()
        log.info("stopped: %s", counters.as_dict())

    def _install_signals(self) -> dict[int, Any]:
        if not self.install_signal_handlers:
            return {}
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
