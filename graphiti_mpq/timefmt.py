"""Time stamps: stored as float epoch seconds, shown as ISO 8601 in UTC with milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
    """``2026-12-03T16:05:00.123+00:00`` for a stored time stamp, None for None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def ago(ts: float | None, at: float | None = None) -> str:
    """A short human age: ``12s ago``, ``3m ago``, ``2h ago``, ``4d ago``."""
    if ts is None:
        return "-"
    delta = (at if at is not None else time.time()) - ts
    future = delta < 0
    delta = abs(delta)
    if delta < 60:
        text = f"{int(delta)}s"
    elif delta < 3600:
        text = f"{int(delta // 60)}m"
    elif delta < 86400:
        text = f"{int(delta // 3600)}h"
    else:
        text = f"{int(delta // 86400)}d"
    return f"in {text}" if future else f"{text} ago"
