"""The storage layer: one ``JobQueue`` interface, chosen once by the queue location.

Names resolve lazily so that the light enqueue path (``insert``, ``spool``,
``sqlite_conn``) can be imported without the full store.
"""

from __future__ import annotations

from importlib import import_module

from ..locate import is_postgres_url

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


if TYPE_CHECKING:
    from .base import Finished, QueueBarrier, QueueListener, QueueStore, Recovered, Waiting
    from .postgres import PostgresQueue
    from .sqlite import JobQueue

__all__ = [
    "Finished",
    "JobQueue",
    "PostgresQueue",
    "QueueBarrier",
    "QueueListener",
    "QueueStore",
    "Recovered",
    "Waiting",
    "open_queue",
]

_LAZY = {
    "Finished": ".base",
    "Recovered": ".base",
    "Waiting": ".base",
    "QueueStore": ".base",
    "QueueBarrier": ".base",
    "QueueListener": ".base",
    "JobQueue": ".sqlite",
    "PostgresQueue": ".postgres",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_queue(location: str, capacity: int = 100, **options: Any) -> QueueStore:
    """The queue at ``location`` (a SQLite path, or a ``postgresql://`` URL), opened.

    A PostgreSQL queue takes ``max_retries``, ``backoff_base``, ``busy_timeout`` and
    ``schema``; SQLite-only options (``synchronous``) are dropped for it.
    """
    if is_postgres_url(location):
        from .pg_conn import need_psycopg

        need_psycopg()
        from .postgres import PostgresQueue

        options.pop("synchronous", None)
        return PostgresQueue(location, capacity, **options).open()
    from .sqlite import JobQueue

    return JobQueue(location, capacity, **options).open()
