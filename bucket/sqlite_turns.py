"""SQLite's writers take turns: one transaction at a time per database file, woken in turn.

Every transaction on SQLite is ``BEGIN IMMEDIATE`` (a writer), and SQLite serialises writers by
making the others poll: a waiting ``BEGIN`` sleeps 1, 2, 5 … up to 100 ms between tries. Under
load the writer that just finished, or a thread arriving in that gap, usually wins again, so a
few requests starve: the embedded default answered 32 concurrent connections with a p99 of
1.45 s and some requests over 2 s (bench, ``--only embedded``). Here each connection first
takes a lock that the threads of a worker share and then an exclusive ``flock`` on a file beside
the database that the workers (and ``flask`` commands) share; both wake a waiter as soon as the
holder lets go, so SQLite's own lock is free whenever a transaction begins.

The turn is taken by ``BEGIN`` and given back when the DBAPI connection commits, rolls back or
closes (``TurnTakingConnection``), so no path that ends a transaction can keep it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading

# How long a writer waits for its turn before it goes on and lets SQLite's busy timeout decide.
TURN_TIMEOUT_SECONDS = 30.0


class WriterTurns:
    """The turn of one database file in one process."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        self._open()

    def _open(self) -> None:
        self._threads = threading.Lock()
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reopen_after_fork(self) -> None:
        """A forked worker must share neither the parent's open file (a flock belongs to the
        open file, so both would hold it at once) nor a thread lock held at the fork."""
        os.close(self._fd)
        self._open()

    def take(self) -> bool:
        """Wait for this process's turn, then the file's; False if none came in time."""
        if not self._threads.acquire(timeout=TURN_TIMEOUT_SECONDS):
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            self._threads.release()
            return False
        return True

    def give_back(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_turns_by_path: dict[str, WriterTurns] = {}
_turns_guard = threading.Lock()


def turns_for(database_path: str) -> WriterTurns | None:
    """The turns of a database file (None for an in-memory database, which has no file)."""
    if not database_path or database_path == ":memory:" or database_path.startswith("file::memory"):
        return None
    path = os.path.abspath(database_path)
    with _turns_guard:
        if path not in _turns_by_path:
            try:
                _turns_by_path[path] = WriterTurns(f"{path}-turn.lock")
            except OSError:  # no writable directory: SQLite alone serialises its writers
                return None
        return _turns_by_path[path]


def _reopen_all_after_fork() -> None:
    global _turns_guard
    _turns_guard = threading.Lock()
    for turns in _turns_by_path.values():
        turns.reopen_after_fork()


os.register_at_fork(after_in_child=_reopen_all_after_fork)


class TurnTakingConnection(sqlite3.Connection):
    """A connection that begins its transactions in turn and hands the turn on when it ends them."""

    turns: WriterTurns | None = None
    _holding = False

    def begin_immediate(self) -> None:
        took_turn = False
        if self.turns is not None and not self._holding:
            took_turn = self._holding = self.turns.take()
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            if took_turn:
                self._hand_on()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._hand_on()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._hand_on()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        if self._holding:
            self._holding = False
            self.turns.give_back()
