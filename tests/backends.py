"""Test helpers for running one test on both backends: the PostgreSQL test server, fresh
schemas for each test, and raw SQL on a queue's database whatever its backend.

The PostgreSQL server comes from ``GRAPHITI_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Where it cannot be reached the PostgreSQL
tests skip with the reason, except under ``CI=true``, where they fail: CI must not go green
by skipping half the suite.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from typing import Any

import pytest

from graphiti_mpq.storage.base import QueueStore

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("GRAPHITI_TEST_PG_URL") or DEFAULT_PG_URL


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pg_unavailable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]', or scripts/test)"
    from graphiti_mpq.storage.pg_conn import parse_location

    target = parse_location(pg_url())
    try:
        with psycopg.connect(target.conninfo, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {target.display} (GRAPHITI_TEST_PG_URL) is unreachable: {first}"
    return None


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true, and {reason}", pytrace=False)
    pytest.skip(reason)


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


class PgSchemas:
    """Fresh schema names for one test run (``gmpq_t<run>_<n>``), all dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run = f"gmpq_t{uuid.uuid4().hex[:10]}"
        self.count = 0
        self.made: list[str] = []

    def new(self) -> str:
        self.count += 1
        name = f"{self.run}_{self.count}"
        self.made.append(name)
        return name

    def location(self) -> str:
        return with_schema(self.url, self.new())

    def drop(self, *names: str) -> None:
        import psycopg

        from graphiti_mpq.storage.pg_conn import parse_location

        target = parse_location(self.url)
        with psycopg.connect(target.conninfo, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '20s'")
            for name in names or tuple(self.made):
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def leftovers(self) -> list[str]:
        """Schemas of this run still present (should be none after ``drop()``)."""
        import psycopg

        from graphiti_mpq.storage.pg_conn import parse_location

        target = parse_location(self.url)
        with psycopg.connect(target.conninfo, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (self.run,)
            ).fetchall()
        return [row[0] for row in rows]


def raw_sql(
    queue: QueueStore, statement: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement on a separate connection to the queue's database (committed at once).

    Write it with ``?`` placeholders; they become ``%s`` on PostgreSQL.
    """
    if queue.backend == "sqlite":
        conn = sqlite3.connect(queue.location, isolation_level=None)
        try:
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    from graphiti_mpq.storage.pg_conn import connect, parse_location

    with connect(parse_location(queue.location), "test") as pg:
        cursor = pg.execute(statement.replace("?", "%s"), params)
        return list(cursor.fetchall()) if cursor.description else []


def count(queue: QueueStore, table: str = "jobs") -> int:
    return int(raw_sql(queue, f"SELECT count(*) FROM {table}")[0][0])
