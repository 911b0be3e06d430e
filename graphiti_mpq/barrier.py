"""The cross-process barrier of a SQLite queue: a filelock ``ReadWriteLock`` beside the database.

A process holds the lock *shared* while it runs parallel jobs and *exclusive* while it runs a
sequential job, so a sequential job never overlaps any job of any process on this host.

Why this lock: filelock's ``ReadWriteLock`` is a SQLite transaction on its own lock file, i.e.
POSIX record locks. Those belong to the holding process: a forked child does not inherit them
(so a pool child can neither release nor keep the barrier, unlike ``flock``, filelock issue
634), and the kernel drops them when the holder dies, so a barrier never outlives a crashed
holder. Only the serving process's main loop touches the lock, from one thread.

The database decides *which* job may start (``JobQueue.claim`` never hands out a sequential job
while another job is owned); this lock enforces that no job code overlaps it even if a row is
stale.
"""

from __future__ import annotations

from filelock import ReadWriteLock, Timeout


class Barrier:
    """Shared holds for parallel work, the exclusive hold for a sequential job."""

    def __init__(self, location: str) -> None:
        self.path = location + ".lock"
        self._lock = ReadWriteLock(self.path, is_singleton=False)
        self.mode: str | None = None  # None, "shared" or "exclusive"

    def try_shared(self) -> bool:
        """Hold shared (no wait); False while some process holds it exclusive."""
        if self.mode == "shared":
            return True
        if self.mode == "exclusive":
            raise RuntimeError("the barrier is held exclusive")
        try:
            self._lock.acquire_read(blocking=False)
        except Timeout:
            return False
        self.mode = "shared"
        return True

    def acquire_exclusive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the exclusive hold; False if others still hold it."""
        if self.mode == "exclusive":
            return True
        if self.mode == "shared":
            raise RuntimeError("release the shared hold before waiting for the exclusive one")
        try:
            self._lock.acquire_write(timeout=timeout)
        except Timeout:
            return False
        self.mode = "exclusive"
        return True

    def healthy(self) -> bool:
        """Always True: the kernel keeps a file lock for as long as this process lives."""
        return True

    def release(self) -> None:
        if self.mode is not None:
            self._lock.release()
            self.mode = None

    def close(self) -> None:
        self.mode = None
        self._lock.close()
