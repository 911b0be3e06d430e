"""The status report of a queue: counts, health, serving processes, dead letters."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage.base import QueueStore


def health(pending: int, capacity: int) -> str:
    """ok below 80 % of capacity pending, warning from 80 %, error from 100 %."""
    if pending >= capacity:
        return "error"
    if pending * 5 >= capacity * 4:
        return "warning"
    return "ok"


def build_status(
    queue: QueueStore, capacity: int | None = None, dead_letter_limit: int = 100
) -> dict[str, Any]:
    capacity = queue.capacity if capacity is None else capacity
    stats = queue.get_stats()
    processes = queue.list_processes()
    now = time.time()
    return {
        "pending": stats.pending,
        "retrying": stats.retrying,
        "running": stats.running,
        "succeeded": stats.succeeded,
        "cancelled": stats.cancelled,
        "dead_letter": stats.dead_letter,
        "capacity": capacity,
        "health": health(stats.pending, capacity),
        "worker_running": any(p.alive and p.kind != "api" for p in processes),
        "supervisors": [p.to_json() for p in processes if p.kind != "api"],
        "dead_letter_jobs": [d.to_json() for d in queue.get_dead_letter_jobs(dead_letter_limit)],
        "oldest_pending_age": (
            round(now - stats.oldest_pending_at, 3) if stats.oldest_pending_at is not None else None
        ),
    }
