"""The barrier and the wake-up of a PostgreSQL queue, each on a connection of its own.

``PgBarrier`` holds a session-level advisory lock of the queue: shared while parallel jobs
run, exclusive while a sequential job runs, across every host that serves the queue. The
server drops the lock with the session, so a dead holder never keeps it; the other side of
that coin is that a holder whose connection dies has lost the barrier while its jobs may
still run. ``healthy()`` tells the serving loop so (without a round trip: it reads what the
socket says, and TCP keepalives make a silent partition speak); the loop must then stop the
jobs running under the lost hold and hand them back before it takes the barrier again.

``PgWakeListener`` LISTENs on the queue's channel; enqueues NOTIFY it when they commit. It
waits on the socket with ``select`` (no polling) and reconnects by itself when its connection
dies, reporting a wake-up then, since a notification may have been missed meanwhile.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from .pg_conn import PgTarget, connect, drop, is_connection_error

if TYPE_CHECKING:
    import psycopg


def _socket_dead(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server closed (or TCP gave up on) an idle connection; never blocks."""
    import psycopg
    from psycopg import pq

    if conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
        if readable:
            conn.pgconn.consume_input()
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(conn.pgconn.status == pq.ConnStatus.BAD)


class PgBarrier:
    """Shared holds for parallel work, the exclusive hold for a sequential job (all hosts)."""

    def __init__(self, target: PgTarget, key: int) -> None:
        self.target = target
        self.key = key
        self.mode: str | None = None  # None, "shared" or "exclusive"
        self._conn: psycopg.Connection[Any] | None = None
        self._lock_timeout: int | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            drop(self._conn)
            self._conn = connect(self.target, "barrier")
            self._lock_timeout = None
        return self._conn

    def _ask(self, sql: str) -> bool:
        """Run one lock function; on a dead connection reconnect once (nothing is held)."""
        import psycopg

        for attempt in (1, 2):
            try:
                row = self._connection().execute(sql, (self.key,)).fetchone()
                return bool(row and row[0])
            except psycopg.Error as exc:
                if not is_connection_error(exc) or attempt == 2:
                    raise
                self._forget()
        return False  # pragma: no cover

    def _forget(self) -> None:
        drop(self._conn)
        self._conn = None

    def try_shared(self) -> bool:
        """Hold shared (no wait); False while some process holds it exclusive.

        Also False while a shared hold is held but was lost with its connection: nothing new
        may start under it until the holder releases (and so learns of the loss).
        """
        if self.mode == "shared":
            return self.healthy()
        if self.mode == "exclusive":
            raise RuntimeError("the barrier is held exclusive")
        if not self._safely(lambda: self._ask("SELECT pg_try_advisory_lock_shared(%s)")):
            return False
        self.mode = "shared"
        return True

    def acquire_exclusive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the exclusive hold; False if others still hold it.

        The wait queues in the server's lock manager, so shared requests that come later wait
        behind it: a sequential job is not starved by a stream of parallel holders.
        """
        if self.mode == "exclusive":
            return self.healthy()
        if self.mode == "shared":
            raise RuntimeError("release the shared hold before waiting for the exclusive one")
        if timeout <= 0:
            got = self._safely(lambda: self._ask("SELECT pg_try_advisory_lock(%s)"))
        else:
            got = self._safely(lambda: self._wait_exclusive(timeout))
        if got:
            self.mode = "exclusive"
        return got

    def _wait_exclusive(self, timeout: float) -> bool:
        import psycopg
        import psycopg.errors as pe

        millis = max(1, int(timeout * 1000))
        for attempt in (1, 2):
            try:
                conn = self._connection()
                if self._lock_timeout != millis:  # a new connection waits forever otherwise
                    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{millis}ms",))
                    self._lock_timeout = millis
                conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
                return True
            except pe.LockNotAvailable:
                return False
            except psycopg.Error as exc:
                if not is_connection_error(exc) or attempt == 2:
                    raise
                self._forget()
        return False  # pragma: no cover

    def _safely(self, action: Any) -> bool:
        """Nothing held yet: a database that cannot be reached just means "not now"."""
        import psycopg

        try:
            return bool(action())
        except psycopg.Error as exc:
            if not is_connection_error(exc):
                raise
            self._forget()
            return False

    def healthy(self) -> bool:
        """False once a hold was lost with its connection (until ``release``)."""
        if self.mode is None:
            return True
        conn = self._conn
        return conn is not None and not _socket_dead(conn)

    def release(self) -> None:
        """Give up the hold; after a lost connection there is nothing left to give up."""
        import psycopg

        if self.mode is None:
            return
        function = "pg_advisory_unlock_shared" if self.mode == "shared" else "pg_advisory_unlock"
        self.mode = None
        conn = self._conn
        if conn is None or conn.closed:
            self._forget()
            return
        try:
            conn.execute(f"SELECT {function}(%s)", (self.key,))
        except psycopg.Error:
            self._forget()  # the session, and with it the hold, is gone

    def close(self) -> None:
        self.mode = None
        self._forget()


class PgWakeListener:
    """LISTEN on the queue's channel; ``wait(timeout)`` returns True when an enqueue notified.

    ``close()`` may be called from another thread while ``wait`` blocks: it wakes the waiter,
    which then raises ``ValueError`` (as a closed SQLite listener does).
    """

    _RETRY = 1.0  # seconds between reconnection attempts

    def __init__(self, target: PgTarget, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self._next_try = 0.0
        with self._lock:
            self._listen()  # errors surface now; later losses are survived

    def _listen(self) -> psycopg.Connection[Any]:
        conn = connect(self.target, "listener")
        try:
            conn.execute(f'LISTEN "{self.channel}"')
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds; True on a notification or after a reconnection."""
        with self._lock:
            self._check_open()
            conn = self._conn
            if conn is None or conn.closed:
                return self._reconnect(timeout)
            fd = conn.pgconn.socket
        ready, _, _ = select.select([fd, self._wake_r], [], [], timeout)
        with self._lock:
            self._check_open()
            if not ready:
                return False
            return self._consume(conn)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the wake-up listener is closed")

    def _consume(self, conn: psycopg.Connection[Any]) -> bool:
        import psycopg

        got = False
        try:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                got = True
        except psycopg.OperationalError:
            got = True  # lost: reconnect on the next wait, and look for work meanwhile
        if _socket_dead(conn):
            drop(conn)
            self._conn = None
            return True
        return got

    def _reconnect(self, timeout: float | None) -> bool:
        """Called with the lock held and no connection: try again, at most once a second."""
        from ..errors import QueueError

        now = time.monotonic()
        if now < self._next_try:
            pause = self._next_try - now if timeout is None else min(timeout, self._next_try - now)
            self._lock.release()
            try:
                select.select([self._wake_r], [], [], pause)
            finally:
                self._lock.acquire()
            self._check_open()
            if time.monotonic() < self._next_try:
                return False
        try:
            self._listen()
        except QueueError:
            self._next_try = time.monotonic() + self._RETRY
            return False
        return True  # a notification may have been missed while disconnected

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass
        with self._lock:
            drop(self._conn)
            self._conn = None
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
