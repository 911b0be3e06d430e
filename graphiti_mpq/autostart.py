"""Opt-in auto-start (``GRAPHITI_QUEUE_AUTOSTART=1``): after an enqueue, if no supervisor
serves the queue, start one detached.

At most one starts however many hooks fire at once: the enqueuer must first win a
non-blocking ``flock`` on ``<db>.autostart``, and hands that locked descriptor to the
supervisor it starts, which keeps it for its whole life. The kernel drops the lock when that
supervisor exits or dies, so the next enqueue can start another. Stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import sys
import time

from . import procinfo

#: Tells a started supervisor which inherited descriptor holds the auto-start lock.
FD_ENV = "GRAPHITI_MPQ_AUTOSTART_FD"
IDLE_EXIT = "10m"


def someone_serves(conn: sqlite3.Connection) -> bool:
    """A supervisor or API worker with a fresh heartbeat (and, on this host, a live pid)."""
    host = socket.gethostname()
    now = time.time()
    rows = conn.execute(
        "SELECT host, pid, pid_start, last_heartbeat, lease FROM processes"
        " WHERE stopped_at IS NULL AND kind IN ('supervise', 'worker')"
    ).fetchall()
    for row_host, pid, pid_start, beat, lease in rows:
        if now - beat > (lease or 60.0):
            continue
        if row_host != host or procinfo.is_alive(pid, pid_start):
            return True
    return False


def maybe_autostart(location: str, conn: sqlite3.Connection | None = None) -> bool:
    """Start a detached supervisor for ``location`` if none serves it; True if one started.

    Called after the job is stored, so it never raises: a failure to start a supervisor must
    not fail the enqueue (the job waits for the next supervisor or drain). ``conn`` is None
    when the enqueue spooled because the database could not even be opened in time.
    """
    try:
        if _serving(location, conn):
            return False
        fd = os.open(location + ".autostart", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another enqueuer started one, or its supervisor is starting
            _spawn(location, fd)
            return True
        finally:
            os.close(fd)
    except Exception:
        return False


def _serving(location: str, conn: sqlite3.Connection | None) -> bool:
    """``someone_serves``; on a database too busy to open, read it on a plain connection.

    If even that read fails (a new queue being set up by hooks that fired at once), nobody
    is taken to serve it: the lock of ``maybe_autostart`` still lets only one start, and a
    spooled job must not wait for a supervisor that nobody starts.
    """
    if conn is not None:
        return someone_serves(conn)
    try:
        plain = sqlite3.connect(location, timeout=0.05)
    except sqlite3.Error:
        return False
    try:
        return someone_serves(plain)
    except sqlite3.Error:
        return False
    finally:
        plain.close()


def _spawn(location: str, fd: int) -> None:
    import subprocess

    log = os.open(location + ".supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "graphiti_mpq", "--db", location, "--log-format", "json",
             "supervise", "--idle-exit", IDLE_EXIT],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            pass_fds=(fd,),
            env={**os.environ, FD_ENV: str(fd)},
        )  # fmt: skip
    finally:
        os.close(log)


def adopt_lock() -> int | None:
    """In a started supervisor: keep the inherited lock, hide it from what we start."""
    raw = os.environ.pop(FD_ENV, None)
    if raw is None or not raw.isdigit():
        return None
    fd = int(raw)
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return None
    return fd
