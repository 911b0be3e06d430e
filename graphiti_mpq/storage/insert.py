"""Turning enqueue arguments into rows, and inserting them with dedupe, on a plain connection.

Shared by ``JobQueue.enqueue`` and the enqueue fast path; stdlib only.
"""

from __future__ import annotations

import os
import sqlite3
import time

from ..errors import InvalidJobError
from ..validation import (
    validate_dedupe_key,
    validate_int,
    validate_job_type,
    validate_payload,
    validate_seconds,
)

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any


ENQUEUE_OPTIONS = frozenset({"priority", "delay", "dedupe_key", "max_retries", "timeout"})
_LIVE = "('pending', 'claimed', 'running')"

INSERT_SQL = (
    "INSERT INTO jobs (id, job_type, payload, parallel, priority, state, attempts, max_retries,"
    " timeout, dedupe_key, run_at, created_at, round)"
    " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?, 0)"
)


def new_job_id() -> str:
    """Time-ordered: milliseconds since the epoch (48 bits), then 64 random bits; 28 hex digits.

    Ids of jobs enqueued one after another sit side by side in the id index, so an insert
    lands on its last page and the lookups that record outcomes (of the oldest jobs, claimed
    first) stay on a few pages, however big the table: with random ids, claims on a queue of a
    million jobs grew twice as slow as the enqueues and lookups spread over the whole index.
    The random half keeps ids unique across processes and clocks (the column is UNIQUE).
    """
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"


def prepare_row(
    job_type: Any, payload: Any, parallel: Any = False, now: float | None = None, **options: Any
) -> tuple[Any, ...]:
    """Validate one job and return its INSERT parameters; raise naming the bad field."""
    unknown = set(options) - ENQUEUE_OPTIONS
    if unknown:
        raise InvalidJobError(sorted(unknown)[0], "unknown enqueue option")
    validate_job_type(job_type)
    text = validate_payload(payload)
    if not isinstance(parallel, bool):
        raise InvalidJobError("parallel", f"must be true or false, got {parallel!r}")
    # None means "not given"; anything else is checked (``x or 0`` would let False through).
    priority = options.get("priority")
    priority = 0 if priority is None else validate_int(priority, "priority")
    delay = options.get("delay")
    delay = 0.0 if delay is None else validate_seconds(delay, "delay")
    dedupe_key = validate_dedupe_key(options.get("dedupe_key"))
    max_retries = options.get("max_retries")
    if max_retries is not None:
        max_retries = validate_int(max_retries, "max_retries", minimum=0)
    timeout = options.get("timeout")
    if timeout is not None:
        timeout = validate_seconds(timeout, "timeout", positive=True)
    created = time.time() if now is None else now
    return (
        new_job_id(),
        job_type,
        text,
        int(parallel),
        priority,
        max_retries,
        timeout,
        dedupe_key,
        created + delay,
        created,
    )


def prepare_many(jobs: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows for ``enqueue_many``: each item a dict of ``enqueue``'s arguments."""
    rows = []
    now = time.time()
    for index, item in enumerate(jobs):
        if not isinstance(item, dict):
            raise InvalidJobError(f"jobs[{index}]", "must be a dict")
        fields = dict(item)
        if "job_type" not in fields or "payload" not in fields:
            raise InvalidJobError(f"jobs[{index}]", "needs job_type and payload")
        try:
            rows.append(prepare_row(now=now, **fields))
        except InvalidJobError as exc:
            problem = str(exc).removeprefix(f"invalid job: {exc.field}: ")
            raise InvalidJobError(f"jobs[{index}].{exc.field}", problem) from None
        except TypeError as exc:
            raise InvalidJobError(f"jobs[{index}]", str(exc)) from None
    return rows


def insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[str]:
    """Insert inside the caller's write transaction; a live duplicate returns the existing id."""
    if not any(row[7] is not None for row in rows):
        if len(rows) == 1:
            conn.execute(INSERT_SQL, rows[0])  # (executemany costs more for one row)
        else:
            conn.executemany(INSERT_SQL, rows)
        return [row[0] for row in rows]
    ids = []
    for row in rows:
        if row[7] is not None:
            found = conn.execute(
                f"SELECT id FROM jobs WHERE dedupe_key = ? AND state IN {_LIVE}", (row[7],)
            ).fetchone()
            if found is not None:
                ids.append(found[0])
                continue
        conn.execute(INSERT_SQL, row)
        ids.append(row[0])
    return ids


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def insert_or_spool(
    conn: sqlite3.Connection,
    location: str,
    rows: list[tuple[Any, ...]],
    wait: float,
    busy_timeout: float | None,
) -> list[str]:
    """Insert in one transaction, waiting at most ``wait`` for the write lock; else spool.

    A hook must never fail or hang on a busy database: after ``wait`` the rows go to the spool
    (see ``spool``), durably, with the ids they were given. ``busy_timeout`` is restored after;
    None means the connection already waits ``wait`` and keeps doing so.
    """
    if busy_timeout is not None:
        conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
    single = len(rows) == 1 and rows[0][7] is None and not conn.in_transaction
    try:
        if single:
            # One row and no duplicate to look for: a lone INSERT outside BEGIN is its own
            # transaction, which takes the write lock as it starts (as BEGIN IMMEDIATE does),
            # waits as long, and commits when it ends: one statement instead of three (about
            # 7 µs of an enqueue's 68, measured in a loop of single inserts).
            conn.execute(INSERT_SQL, rows[0])
            return [rows[0][0]]
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
        from . import spool

        return spool.write(location, rows)
    finally:
        if busy_timeout is not None:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    try:
        ids = insert_rows(conn, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ids
