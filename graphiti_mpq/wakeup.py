"""Wake-up of idle serving processes: a FIFO beside the database that enqueuers poke.

A poke is one non-blocking open and a one-byte write; with no process listening the open fails
at once (ENXIO) and the poke is skipped. Listeners also poll slowly, so a lost poke only delays
a job, never loses it. Stdlib only: the enqueue fast path pokes.
"""

from __future__ import annotations

import errno
import os
import select
import stat


def fifo_path(location: str) -> str:
    return location + ".wake"


def poke(location: str) -> None:
    """Tell a listening process that work arrived; never fails the caller."""
    try:
        fd = os.open(fifo_path(location), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, b"!")
    except OSError:
        pass  # the pipe is full: a wake-up is already pending
    finally:
        os.close(fd)


class WakeListener:
    """The reading end of the FIFO; ``wait(timeout)`` returns True when poked."""

    def __init__(self, location: str) -> None:
        path = fifo_path(location)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                os.unlink(path)
                os.mkfifo(path, 0o600)
        self._read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Holding a writer open ourselves keeps the reader from seeing EOF (and spinning)
        # between pokes.
        self._keep_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._read_fd

    def wait(self, timeout: float | None) -> bool:
        ready, _, _ = select.select([self._read_fd], [], [], timeout)
        return bool(ready) and self.consume()

    def consume(self) -> bool:
        """Empty the pipe; True if there was anything in it."""
        got = False
        while True:
            try:
                data = os.read(self._read_fd, 4096)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return got
                raise
            if not data:
                return got
            got = True

    def close(self) -> None:
        for fd in (self._read_fd, self._keep_fd):
            try:
                os.close(fd)
            except OSError:
                pass
