"""The light enqueue path: validate, insert (or spool when busy), poke, maybe autostart.

Used by ``graphiti_mpq enqueue`` (through ``fastpath``) and by ``async_option``. It imports
no click, structlog, sqlite-utils, filelock or multiprocessing: hooks pay for every import.
"""

from __future__ import annotations

import os
import sqlite3

from . import wakeup
from .errors import DatabaseBusyError
from .locate import is_postgres_url, parse_duration, queue_location
from .storage import insert
from .storage.sqlite_conn import connect, translate

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


ENQUEUE_WAIT = 0.05
BUSY_TIMEOUT = 5.0


def enqueue_wait() -> float:
    """How long a single enqueue waits for the write lock before spooling (50 ms)."""
    raw = os.environ.get("GRAPHITI_QUEUE_ENQUEUE_WAIT", "")
    return parse_duration(raw, "GRAPHITI_QUEUE_ENQUEUE_WAIT") if raw else ENQUEUE_WAIT


def enqueue_one(
    job_type: str,
    payload: dict[str, Any],
    parallel: bool = False,
    location: str | None = None,
    **options: Any,
) -> str:
    """Record one job at ``location`` (default: the configured queue) and return its id."""
    location = queue_location(location)
    if is_postgres_url(location):
        from .storage import open_queue

        queue = open_queue(location)
        try:
            return queue.enqueue(job_type, payload, parallel, **options)
        finally:
            queue.close()
    row = insert.prepare_row(job_type, payload, parallel, **options)
    return enqueue_rows(location, [row])[0]


def enqueue_rows(location: str, rows: list[tuple[Any, ...]]) -> list[str]:
    """Insert prepared rows (one transaction) or spool them; then wake a serving process.

    Once the rows are stored (or spooled) nothing else raises: the wake-up and the auto-start
    are best effort, so a caller that sees an error knows nothing was written.
    """
    wait = enqueue_wait()
    conn = None
    try:
        try:
            conn = connect(location, wait)
        except DatabaseBusyError:
            from .storage import spool  # only when busy: hooks pay for every import

            ids = spool.write(location, rows)
        else:
            try:
                ids = insert.insert_or_spool(conn, location, rows, wait, BUSY_TIMEOUT)
            except sqlite3.Error as exc:
                raise translate(exc, location) from exc
        wakeup.poke(location)
        if os.environ.get("GRAPHITI_QUEUE_AUTOSTART") == "1":
            from .autostart import maybe_autostart

            maybe_autostart(location, conn)
    finally:
        if conn is not None:
            conn.close()
    return ids
