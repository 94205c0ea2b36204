"""Coalescing: concurrent requests of one worker share one statement and one commit.

Ingests (``BUCKET_INGEST_COALESCE``) and acknowledgements (``BUCKET_ACK_COALESCE``) each have
a coalescer of their own per app.

Smart batching without a timer: a request that finds no write in flight writes at once (it
leads); requests that arrive while a write is in flight queue, and when the write commits the
leader answers its batch and hands the lead to the oldest waiting request, which writes
everything queued (up to ``max_items`` packets or results) in one ``write`` call. A request
that names a key (a packet being acknowledged) already in the write being gathered starts the
next write instead, so each write is what the requests would do one after another. Every request is
answered only after the commit that stored its packets, with its own outcomes.

A shared write that fails because the database is unavailable fails every request in it (each
answers 503; the statement is atomic, so nothing of it is stored). Any other failure (a row
the database refuses) is retried one request at a time, so only the request that carries the
bad row fails. The writes run on the leader's own thread and app context; a waiting request
whose client went away is answered like the others (gunicorn drops the answer).

A coalescer may be given an ``admit`` step (ingest: the rate limits). Requests that carry
``charges`` are then admitted by the leader, all of a write's together, just before it
writes them; a request ``admit`` refuses (by setting its ``error``) is answered at once and
left out of the write.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app

from bucket.exceptions import is_outage

EXTENSION_KEY = "bucket.ingest_coalescer"
ACK_EXTENSION_KEY = "bucket.ack_coalescer"
log = logging.getLogger(__name__)


class Wakeup:
    """One waiting request's wake-up, given once: a lock held from the start, released to wake
    the request waiting to take it. (A ``threading.Event`` builds a ``Condition`` and a lock
    per wait: about 6 µs of a worker's CPU more per waiting request.)"""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wait(self) -> None:
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()


@dataclass(eq=False)
class Submission:
    """One request's items (valid packets to store, or acknowledgement results), waiting for
    (or being written in) a shared commit. ``keys`` may not meet another request's in one write."""

    items: list[dict[str, Any]]
    idempotency_key: str | None = None
    auths: list[Any] | None = None
    keys: frozenset[str] = frozenset()
    charges: Any = None
    woken: Wakeup = field(default_factory=Wakeup)
    lead: bool = False
    outcomes: list | None = None
    error: BaseException | None = None


class Coalescer:
    """The queue of one kind of write of one app in one process (gunicorn worker)."""

    def __init__(
        self,
        write: Callable[[list[Submission]], list[list]],
        max_items: int,
        on_commit: Callable[[int, int], None] | None = None,
        on_waiting: Callable[[int], None] | None = None,
        admit: Callable[[list[Submission]], None] | None = None,
    ) -> None:
        self.write = write
        self.admit = admit
        self.max_items = max_items
        self.on_commit = on_commit
        self.on_waiting = on_waiting
        self._lock = threading.Lock()
        self._queue: deque[Submission] = deque()
        self._writing = False

    @property
    def writing(self) -> bool:
        """Whether a write is in flight."""
        with self._lock:
            return self._writing

    @property
    def waiting(self) -> int:
        """Requests queued for the next write (not those of the write in flight)."""
        with self._lock:
            return len(self._queue)

    def store(
        self,
        packets: list[dict],
        idempotency_key: str | None,
        auths: list | None,
        charges: Any = None,
    ) -> list:
        """Store one request's packets in the next shared commit, once admitted with its
        ``charges`` (if any); its outcomes, in order."""
        return self.submit(Submission(packets, idempotency_key, auths, charges=charges))

    def submit(self, own: Submission) -> list:
        """Write one request's items in the next shared commit; its outcomes, in order."""
        with self._lock:
            self._queue.append(own)
            own.lead = not self._writing
            self._writing = True
            if not own.lead:
                self._note_waiting()
        if not own.lead:
            # No deadline: the write in flight ends (the database's timeouts bound it) and its
            # leader always wakes the batch and the next leader; giving up here could leave
            # the queue without one.
            own.woken.wait()
        if own.lead:
            try:
                self._write_next()
            finally:
                self._hand_on()
        if own.error is not None:
            raise own.error if own.lead else fresh(own.error)
        return own.outcomes

    def _take(self) -> list[Submission]:
        """The oldest waiting requests (this leader first), up to ``max_items`` items, up to
        the first whose keys meet the batch's."""
        with self._lock:
            batch = [self._queue.popleft()]
            total = len(batch[0].items)
            keys = set(batch[0].keys)
            while self._queue and total + len(self._queue[0].items) <= self.max_items:
                following = self._queue[0]
                if not keys.isdisjoint(following.keys):
                    break
                total += len(following.items)
                keys.update(following.keys)
                batch.append(self._queue.popleft())
            self._note_waiting()
        return batch

    def _note_waiting(self) -> None:
        """Report how many requests wait for the next write (called under the lock)."""
        if self.on_waiting is not None:
            try:
                self.on_waiting(len(self._queue))
            except Exception:  # noqa: BLE001 - a gauge must not fail a request
                log.exception("reporting a coalescer's queue failed")

    def _write_next(self) -> None:
        taken = self._take()
        try:
            batch = self._admitted(taken)
            if batch:
                self._write(batch)
        finally:
            # Whatever happened (even an interruption), every request of the batch is answered.
            for submission in taken:
                if submission.outcomes is None and submission.error is None:
                    submission.error = RuntimeError("the shared write was interrupted")
                if not submission.lead:
                    submission.woken.set()

    def _admitted(self, taken: list[Submission]) -> list[Submission]:
        """The requests ``admit`` lets into the write (all of them without an ``admit``)."""
        if self.admit is None:
            return taken
        try:
            self.admit(taken)
        except Exception as exc:  # noqa: BLE001 - answered to every request of the batch
            for submission in taken:
                submission.error = exc
            return []
        return [submission for submission in taken if submission.error is None]

    def _write(self, batch: list[Submission]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:
            if len(batch) == 1 or is_outage(exc):
                for submission in batch:
                    submission.error = exc
            else:  # a row the database refuses: each request alone, so one fails, not all
                for submission in batch:
                    try:
                        self._commit([submission])
                    except Exception as alone:  # noqa: BLE001 - answered to its request
                        submission.error = alone

    def _commit(self, batch: list[Submission]) -> None:
        results = self.write(batch)
        for submission, outcomes in zip(batch, results, strict=True):
            submission.outcomes = outcomes
        if self.on_commit is not None:
            try:
                self.on_commit(len(batch), sum(len(s.items) for s in batch))
            except Exception:  # noqa: BLE001 - committed: a failed count must not rewrite it
                log.exception("counting a shared write failed")

    def _hand_on(self) -> None:
        """Give the lead to the oldest waiting request, or note that no write is in flight."""
        with self._lock:
            if not self._queue:
                self._writing = False
                return
            following = self._queue[0]
            following.lead = True
        following.woken.set()


def fresh(error: BaseException) -> BaseException:
    """A copy of a shared failure to raise on another thread (one object raised on several
    threads at once would collect all their tracebacks)."""
    try:
        return copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is raised as it is
        return error


def init_coalescer(
    app: Flask,
    write: Callable[[list[Submission]], list[list]],
    on_commit: Callable[[int, int], None] | None = None,
    on_waiting: Callable[[int], None] | None = None,
    *,
    setting: str = "BUCKET_INGEST_COALESCE",
    key: str = EXTENSION_KEY,
    admit: Callable[[list[Submission]], None] | None = None,
) -> None:
    """Give the app a coalescer under ``key`` when ``setting`` is on (its maximum of items
    per write is ``<setting>_MAX``)."""
    if app.config.get(setting, False):
        app.extensions[key] = Coalescer(
            write, app.config[f"{setting}_MAX"], on_commit, on_waiting, admit
        )


def coalescer(key: str = EXTENSION_KEY) -> Coalescer | None:
    """The current app's coalescer of that kind (None: off, or outside an app)."""
    return current_app.extensions.get(key)
