"""The storage layer: one ``JobQueue`` interface, chosen once by the queue location.

Names resolve lazily so that the light enqueue path (``insert``, ``spool``,
``sqlite_conn``) can be imported without the full store.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import BackendMissingError
from ..locate import is_postgres_url

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


if TYPE_CHECKING:
    from .sqlite import Finished, JobQueue, Recovered, Waiting

__all__ = ["Finished", "JobQueue", "Recovered", "Waiting", "open_queue"]


def __getattr__(name: str) -> Any:
    if name in ("Finished", "JobQueue", "Recovered", "Waiting"):
        return getattr(import_module(".sqlite", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .sqlite import JobQueue

    return JobQueue(location, capacity, **options).open()
