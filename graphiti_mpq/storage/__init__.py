"""The storage layer: one ``JobQueue`` interface, chosen once by the queue location."""

from __future__ import annotations

from typing import Any

from ..config import is_postgres_url
from ..errors import BackendMissingError
from .sqlite import Finished, JobQueue, Recovered, Waiting

__all__ = ["Finished", "JobQueue", "Recovered", "Waiting", "open_queue"]


def open_queue(location: str, capacity: int = 100, **options: Any) -> JobQueue:
    """The queue at ``location`` (a SQLite path, or a ``postgresql://`` URL), opened."""
    if is_postgres_url(location):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise BackendMissingError(
                "a postgresql:// queue needs the postgres extra:"
                " pip install 'graphiti-mpq[postgres]'"
            ) from None
        raise BackendMissingError("the PostgreSQL backend is not part of this version yet")
    return JobQueue(location, capacity, **options).open()
