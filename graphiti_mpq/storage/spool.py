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

from .insert import INSERT_SQL

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


_LIVE = "('pending', 'claimed', 'running')"


def spool_dir(location: str) -> str:
    return location + ".spool"


def write(location: str, rows: list[tuple[Any, ...]]) -> list[str]:
    """Record rows durably in the spool; returns their ids."""
    folder = spool_dir(location)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for row in rows:
        name = f"{time.time_ns():020d}-{os.getpid()}-{row[0]}.job"
        temp = os.path.join(folder, f".{name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(list(row), ensure_ascii=False).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, os.path.join(folder, name))
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return [row[0] for row in rows]


def pending_files(location: str) -> list[str]:
    try:
        names = os.listdir(spool_dir(location))
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.endswith(".job"))


def ingest(conn: sqlite3.Connection, location: str) -> int:
    """Move spooled jobs into the queue inside the caller's write transaction.

    Returns how many were added. The caller removes the files (``remove``) after COMMIT.
    """
    added = 0
    folder = spool_dir(location)
    for name in pending_files(location):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as handle:
                row = tuple(json.load(handle))
        except (OSError, ValueError):
            os.replace(path, path + ".bad")  # not ours or damaged: keep it aside, say so
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
