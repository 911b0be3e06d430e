"""The spool: where an enqueue goes when the database is busy, so a hook never fails or waits.

Each spooled job is one file in ``<db>.spool/``, written to a temporary name, synced and
renamed, so a file either exists whole or not at all. Its id is assigned at spool time. The
next serving process or reading command ingests the files in name (= spool) order in one
transaction; a job whose id is already stored is skipped, so a crash between the commit and
the removal of the files never ingests a job twice. Stdlib only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

from ..errors import DatabaseError
from .insert import INSERT_SQL

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


_LIVE = "('pending', 'claimed', 'running')"
_ROW_LENGTH = INSERT_SQL.count("?")


def spool_dir(location: str) -> str:
    return location + ".spool"


def write(location: str, rows: list[tuple[Any, ...]]) -> list[str]:
    """Record rows durably in the spool; returns their ids.

    A real fault (the folder cannot be made or written, the disk is full) is one
    :class:`DatabaseError` naming the spool; no partial file is left behind.
    """
    folder = spool_dir(location)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        for row in rows:
            _write_one(folder, row)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DatabaseError(
            f"database busy and the job cannot be spooled in {folder}: {reason}"
        ) from exc
    return [row[0] for row in rows]


def _write_one(folder: str, row: tuple[Any, ...]) -> None:
    name = f"{time.time_ns():020d}-{os.getpid()}-{row[0]}.job"
    temp = os.path.join(folder, f".{name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, json.dumps(list(row), ensure_ascii=False).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, os.path.join(folder, name))
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def pending_files(location: str) -> list[str]:
    try:
        names = os.listdir(spool_dir(location))
    except OSError:
        return []  # no spool (or none readable: the enqueue that could not spool said so)
    return sorted(name for name in names if name.endswith(".job"))


def _read_row(path: str, name: str) -> tuple[Any, ...] | None:
    """The INSERT parameters stored in a spool file, or None if it is not a whole job row."""
    try:
        with open(path, encoding="utf-8") as handle:
            row = json.load(handle)
    except (OSError, ValueError):
        return None
    if not (isinstance(row, list) and len(row) == _ROW_LENGTH):
        return None
    job_id, job_type, payload, parallel, priority, max_retries, timeout, dedupe, run_at, created = (
        row
    )
    numbers = (int, float)
    valid = (
        isinstance(job_id, str)
        and name[:-4].rsplit("-", 1)[-1] == job_id  # the name says which job it holds
        and isinstance(job_type, str)
        and isinstance(payload, str)
        and parallel in (0, 1)
        and type(priority) is int
        and (max_retries is None or type(max_retries) is int)
        and (timeout is None or isinstance(timeout, numbers))
        and (dedupe is None or isinstance(dedupe, str))
        and isinstance(run_at, numbers)
        and isinstance(created, numbers)
    )
    return tuple(row) if valid else None


def _set_aside(path: str) -> None:
    """A damaged or foreign file: keep it beside the others as ``.bad`` so it blocks nothing."""
    try:
        os.replace(path, path + ".bad")
    except OSError:
        pass  # cannot rename it either: it is skipped again next time, and blocks nothing


def ingest(conn: sqlite3.Connection, location: str) -> int:
    """Move spooled jobs into the queue inside the caller's write transaction.

    Returns how many were added. The caller removes the files (``remove``) after COMMIT.
    """
    added = 0
    folder = spool_dir(location)
    for name in pending_files(location):
        path = os.path.join(folder, name)
        row = _read_row(path, name)
        if row is None:
            _set_aside(path)
            continue
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (row[0],)).fetchone():
            continue
        duplicate = None
        if row[7] is not None:
            found = conn.execute(
                f"SELECT id FROM jobs WHERE dedupe_key = ? AND state IN {_LIVE}", (row[7],)
            ).fetchone()
            duplicate = found[0] if found else None
        if duplicate is None:
            conn.execute(INSERT_SQL, row)
        else:  # recorded, but cancelled: it names the live job it duplicates
            conn.execute(INSERT_SQL.replace("'pending'", "'cancelled'"), row)
            conn.execute(
                "UPDATE jobs SET finished_at = ?, duplicate_of = ?, last_error = ? WHERE id = ?",
                (time.time(), duplicate, f"duplicate of job {duplicate}", row[0]),
            )
        added += 1
    return added


def remove_ingested(conn: sqlite3.Connection, location: str) -> None:
    """Delete the spool files whose jobs are now stored (after the ingest committed)."""
    folder = spool_dir(location)
    for name in pending_files(location):
        job_id = name[:-4].rsplit("-", 1)[-1]
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
