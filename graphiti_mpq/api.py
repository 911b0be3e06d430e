"""The module-level Python API of the seed: one queue and one background worker per process.

``get_queue()`` and ``get_worker()`` are lazy singletons; ``reset()`` forgets them (tests, or a
host that changed ``GRAPHITI_QUEUE_PATH``). Enqueueing stays cheap: nothing here imports the
worker, structlog or multiprocessing until it is used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import load_settings
from .hookctx import is_hook_context
from .storage.sqlite import JobQueue

if TYPE_CHECKING:
    from .storage.base import QueueStore
    from .worker import BackgroundWorker

_lock = threading.RLock()
_queue: QueueStore | None = None
_worker: BackgroundWorker | None = None


def get_queue(db_path: str | Path | None = None, max_size: int | None = None) -> QueueStore:
    """The process's queue (``db_path`` > ``GRAPHITI_QUEUE_PATH`` > the XDG default)."""
    global _queue
    with _lock:
        if _queue is None or db_path is not None or max_size is not None:
            settings = load_settings(str(db_path) if db_path is not None else None)
            capacity = max_size if max_size is not None else settings.capacity
            if _queue is not None and _queue.location == settings.location:
                _queue.capacity = capacity
            else:
                from .storage import open_queue

                _queue = open_queue(
                    settings.location,
                    capacity,
                    max_retries=settings.max_retries,
                    backoff_base=settings.backoff_base,
                )
        return _queue


def enqueue(
    job_type: str,
    payload: dict[str, Any],
    parallel: bool = False,
    silent: bool | None = None,
    **options: Any,
) -> str:
    """Record a job durably and return its id; never writes to stdout.

    Options: ``priority``, ``delay`` (seconds), ``dedupe_key``, ``max_retries``, ``timeout``.
    Unless silent (by default: silent in a hook context) it logs ``job_enqueued`` on stderr.
    """
    queue = get_queue()
    job_id = queue.enqueue(job_type, payload, parallel, **options)
    if os.environ.get("GRAPHITI_QUEUE_AUTOSTART") == "1" and isinstance(queue, JobQueue):
        from .autostart import maybe_autostart

        with queue.locked_connection() as conn:
            maybe_autostart(queue.location, conn)
    if silent is None:
        silent = is_hook_context()
    if not silent:
        from .logs import ensure_configured, get_logger

        ensure_configured()
        get_logger().info("job_enqueued", job_id=job_id, job_type=job_type, parallel=parallel)
    return job_id


def enqueue_many(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Record many jobs in one transaction (all or nothing); returns their ids in order."""
    return get_queue().enqueue_many(jobs)


def get_status() -> dict[str, Any]:
    from .status import build_status

    return build_status(get_queue())


def get_worker() -> BackgroundWorker:
    global _worker
    with _lock:
        if _worker is None:
            from .worker import BackgroundWorker

            _worker = BackgroundWorker(get_queue())
        return _worker


def start_worker(force: bool = False) -> bool:
    """Start this process's background worker if jobs are pending (always with ``force``).

    Returns whether the worker is running afterwards.
    """
    worker = get_worker()
    if force or get_queue().get_pending_count() > 0:
        worker.start()
    return worker.is_running()


def stop_worker(timeout: float = 30.0) -> None:
    with _lock:
        worker = _worker
    if worker is not None:
        worker.stop(timeout)


def process_queue() -> tuple[int, int]:
    """Work every job eligible now in this call; returns (attempts succeeded, attempts failed)."""
    from .worker import drain_once

    return drain_once(get_queue())


def reset() -> None:
    """Stop the worker and forget the singletons."""
    global _queue, _worker
    with _lock:
        worker, queue = _worker, _queue
        _worker = None
        _queue = None
    if worker is not None:
        worker.stop()
    if queue is not None:
        queue.close()
