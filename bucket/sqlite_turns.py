"""SQLite's writers take turns: one transaction at a time per database file, woken in turn.

Every transaction on SQLite is ``BEGIN IMMEDIATE`` (a writer), and SQLite serialises writers by
making the others poll: a waiting ``BEGIN`` sleeps 1, 2, 5 … up to 100 ms between tries. Under
load the writer that just finished, or a thread arriving in that gap, usually wins again, so a
few requests starve: the embedded default answered 32 concurrent connections with a p99 of
1.45 s and some requests over 2 s (bench, ``--only embedded``). Here each connection first
takes a lock that the threads of a worker share and then an exclusive ``flock`` on a file beside
the database that the workers (and ``flask`` commands) share; both wake a waiter as soon as the
holder lets go, so SQLite's own lock is free whenever a transaction begins.

A blocking ``flock`` cannot time out, so the process's one waiting thread hands that wait to a
keeper thread and waits for it with a deadline: a writer held up longer (another process keeps
a transaction open, say a ``flask shell``) fails as before, with "database is locked" from
SQLite's busy timeout, instead of hanging.

The turn is taken by ``BEGIN`` and given back when the DBAPI connection commits, rolls back,
closes or is collected (``TurnTakingConnection``), so no path that ends a transaction keeps it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time

# How long a writer waits for its turn; then it goes on, and SQLite's busy timeout decides.
TURN_TIMEOUT_SECONDS = 30.0


class WriterTurns:
    """The turn of one database file in one process."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        self._open()

    def _open(self) -> None:
        self.generation = getattr(self, "generation", 0) + 1
        self._threads = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._handover = threading.Condition(threading.Lock())
        self._wanted = False  # the holder of the thread lock waits for the keeper
        self._granted = False  # the keeper took the file for it
        self._keeper_waiting = False  # the keeper is in (or about to enter) its flock
        # Last, so that a file that cannot be opened leaves fresh locks and no descriptor (-1:
        # flock refuses it, and take() then answers False), never a closed one's number.
        self._fd = -1
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reopen_after_fork(self) -> None:
        """A forked worker must share neither the parent's open file (a flock belongs to the
        open file, so both would hold it at once) nor a lock held at the fork. Turns taken
        before the fork belong to the old generation and are not given back here."""
        os.close(self._fd)
        self._open()

    def take(self, timeout: float = TURN_TIMEOUT_SECONDS) -> bool:
        """Wait for this process's turn, then the file's; False if none came in time."""
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            return False
        try:
            with self._handover:
                # The file is this process's when no one holds it elsewhere, unless the
                # keeper is still waiting for it on behalf of a writer that gave up: a flock
                # belongs to the open file, so taking it now would be taking the keeper's.
                if not self._keeper_waiting:
                    try:
                        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return True
                    except BlockingIOError:
                        pass
            if self._wait_for_keeper(deadline):
                return True
        except (OSError, ValueError):  # ValueError: no descriptor (-1), see _open
            pass
        self._threads.release()
        return False

    def give_back(self, generation: int) -> None:
        if generation != self.generation:
            return  # taken in the parent before a fork: not this process's locks
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _wait_for_keeper(self, deadline: float) -> bool:
        """Have the keeper wait in the kernel's queue for the file, and wait for the keeper
        until the deadline. Only the holder of the thread lock gets here, one at a time."""
        with self._handover:
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep, name="bucket-sqlite-turns", daemon=True
                )
                self._keeper.start()
            self._wanted, self._granted = True, False
            self._handover.notify_all()
            granted = self._handover.wait_for(
                lambda: self._granted, timeout=max(0.0, deadline - time.monotonic())
            )
            self._wanted = self._granted = False
            return granted

    def _keep(self) -> None:
        """Take the file for whoever wants it; give it back if they stopped waiting."""
        while True:
            with self._handover:
                self._handover.wait_for(lambda: self._wanted)
                self._keeper_waiting = True
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError:
                # The kernel refused the wait (out of locks, say): try again shortly; the
                # writer gives up at its deadline and SQLite's busy timeout decides.
                time.sleep(0.01)
                with self._handover:
                    self._keeper_waiting = False
                continue
            with self._handover:
                self._keeper_waiting = False
                if self._wanted:
                    # Granted, and no longer wanted: this loop must not come round and take
                    # (or let go of) the file again before the writer has even woken up.
                    self._wanted, self._granted = False, True
                    self._handover.notify_all()
                else:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


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
    for path, turns in list(_turns_by_path.items()):
        try:
            turns.reopen_after_fork()
        except OSError:
            # Its directory is gone (a deleted temporary database): forget it, and go on, or
            # the turns after it would keep the parent's open file and locks in this child.
            del _turns_by_path[path]


os.register_at_fork(after_in_child=_reopen_all_after_fork)


class TurnTakingConnection(sqlite3.Connection):
    """A connection that begins its transactions in turn and hands the turn on when it ends them."""

    turns: WriterTurns | None = None
    _holding: int = 0  # the generation of the turn held, 0 for none

    def begin_immediate(self) -> None:
        took_turn = False
        if self.turns is not None and not self._holding and self.turns.take():
            self._holding = self.turns.generation
            took_turn = True
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
            if not self._still_in_transaction():  # a failed COMMIT leaves it open, still ours
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

    def __del__(self) -> None:
        # Collected without close(): SQLite closes it in C, so the turn is handed on here.
        try:
            self._hand_on()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone
            pass

    def _still_in_transaction(self) -> bool:
        try:
            return self.in_transaction
        except sqlite3.ProgrammingError:  # closed
            return False

    def _hand_on(self) -> None:
        if self._holding:
            generation, self._holding = self._holding, 0
            self.turns.give_back(generation)
