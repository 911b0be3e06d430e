"""SIGTERM and SIGINT noted from a serving command's first moments, before its supervisor exists.

Opening the queue (a migration may wait for the write lock) and importing the supervisor take
a while; a stop asked for meanwhile must not end the process by the signal's default action.
The serving commands call ``catch_early()`` first; the supervisor, once its own handlers are
in place, acts on what was noted (``take()``): it starts, stops at once and exits 0. A second
signal of the same kind before then has its default effect.
"""

from __future__ import annotations

import signal
from types import FrameType

_noted = 0


def _note(signum: int, frame: FrameType | None) -> None:
    global _noted
    _noted += 1
    # The next one acts as it would have without us (SIGTERM ends the process at once, SIGINT
    # raises KeyboardInterrupt): a start-up that waits on a busy database stays stoppable.
    default = signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
    signal.signal(signum, default)


def catch_early() -> None:
    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)


def take() -> int:
    """How many stop signals arrived before the supervisor's handlers (and forget them)."""
    global _noted
    noted, _noted = _noted, 0
    return noted
