"""Opening a SQLite queue: file permissions, pragmas, schema check, and clear errors.

Stdlib only until a migration is needed (the schema module imports sqlite-utils), so the
enqueue fast path opens a current database without the heavy imports.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import DatabaseBusyError, DatabaseError, QueueError

SCHEMA_VERSION = 3  # kept equal to schema.SCHEMA_VERSION (a test checks it)
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


def _prepare_file(path: str) -> None:
    """Create the folder (0700) and the database file (0600) before SQLite touches them."""
    if os.path.isdir(path):
        raise DatabaseError(f"{path} is a directory, not a queue database")
    folder = os.path.dirname(path) or "."
    try:
        _make_private_dirs(folder)
    except OSError as exc:
        raise DatabaseError(f"cannot create {folder}: {exc.strerror}") from exc
    if not os.path.exists(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise DatabaseError(f"cannot create {path}: {exc.strerror}") from exc
        os.close(fd)


def _make_private_dirs(folder: str) -> None:
    """Create ``folder`` and its missing parents, each 0700 (``os.makedirs`` would give the
    parents 0777 & ~umask)."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise


def translate(exc: sqlite3.Error, location: str) -> QueueError:
    """One clear error for a driver error; the caller raises it ``from exc``."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return DatabaseBusyError(f"database busy: {location} is locked by another process")
    if "readonly" in lowered or "read-only" in lowered:
        return DatabaseError(f"database is read-only: {location}")
    if "not a database" in lowered or "malformed" in lowered:
        return DatabaseError(f"{location} is not a graphiti_mpq queue database ({text})")
    if "unable to open" in lowered:
        return DatabaseError(f"cannot open {location}: {text}")
    if "disk" in lowered and "full" in lowered:
        return DatabaseError(f"disk full writing {location}")
    return DatabaseError(f"database error on {location}: {text}")


@contextmanager
def translated(location: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, location) from exc


def connect(
    path: str, busy_timeout: float = 5.0, synchronous: str = "normal"
) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit) to a migrated queue database."""
    _prepare_file(path)
    with translated(path):
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                # Before anything writes (the switch to WAL rewrites the header): a newer or
                # foreign database is refused and left exactly as it was.
                from .schema import migrate

                _refuse_foreign(conn, path, version)
                migrate(conn, path)
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS.get(synchronous, 'NORMAL')}")
        except BaseException:
            conn.close()
            raise
    return conn


def _refuse_foreign(conn: sqlite3.Connection, path: str, version: int) -> None:
    """A SQLite file with tables but no queue schema belongs to something else: leave it."""
    if version != 0:
        return
    # Migrations set user_version in the transaction that creates the tables, so a queue
    # database at version 0 has no tables at all: any table (even one named "jobs") is foreign.
    tables = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    # Read after the tables: another process may have migrated since our first read of the
    # version (first use by hooks firing at once); its tables then come with its version.
    if tables and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        raise DatabaseError(f"{path} is a SQLite database of something else, not a queue")
