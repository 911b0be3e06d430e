"""graphiti_mpq: a durable job queue with a multiprocessing supervisor.

Names resolve lazily (PEP 562) so that ``import graphiti_mpq`` for an enqueue stays cheap: the
worker, structlog, filelock and multiprocessing load only when used.
"""

from __future__ import annotations

from importlib import import_module

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


__version__ = "0.1.0"

_EXPORTS = {
    "enqueue": "api",
    "enqueue_many": "api",
    "get_status": "api",
    "process_queue": "api",
    "start_worker": "api",
    "stop_worker": "api",
    "get_queue": "api",
    "get_worker": "api",
    "reset": "api",
    "is_hook_context": "hookctx",
    "handler": "handlers",
    "async_option": "async_click",
    "JobQueue": "storage.sqlite",
    "BackgroundWorker": "worker",
    "QueuedJob": "models",
    "JobStatus": "models",
    "QueueStats": "models",
    "DeadLetterJob": "models",
    "QueueError": "errors",
}

__all__ = [
    "BackgroundWorker",
    "DeadLetterJob",
    "JobQueue",
    "JobStatus",
    "QueueError",
    "QueueStats",
    "QueuedJob",
    "async_option",
    "enqueue",
    "enqueue_many",
    "get_queue",
    "get_status",
    "get_worker",
    "handler",
    "is_hook_context",
    "process_queue",
    "reset",
    "start_worker",
    "stop_worker",
]

if TYPE_CHECKING:
    from .api import (
        enqueue,
        enqueue_many,
        get_queue,
        get_status,
        get_worker,
        process_queue,
        reset,
        start_worker,
        stop_worker,
    )
    from .async_click import async_option
    from .errors import QueueError
    from .handlers import handler
    from .hookctx import is_hook_context
    from .models import DeadLetterJob, JobStatus, QueuedJob, QueueStats
    from .storage.sqlite import JobQueue
    from .worker import BackgroundWorker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphiti_mpq' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
