"""Shared fixtures: every test gets its own queue file and a clean environment.

``backend`` runs a test on SQLite and on PostgreSQL; ``store_location`` is then a fresh queue
of that backend (a file in tmp_path, or a fresh schema of the PostgreSQL test server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphiti_mpq import api

from .backends import PgSchemas, pg_unavailable_reason, pg_url, skip_or_fail, with_schema
from .serving import Serving, tracked


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No GRAPHITI_* setting leaks in from the caller's shell; the queue lives in tmp_path."""
    for name in list(os.environ):
        if name.startswith("GRAPHITI_") and name != "GRAPHITI_TEST_PG_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("GRAPHITI_QUEUE_PATH", str(tmp_path / "queue.db"))
    api.reset()
    yield
    api.reset()


@pytest.fixture
def servers() -> Iterator[list[Serving]]:
    """Serving processes a test starts; any still running at its end are killed."""
    yield from tracked()


@pytest.fixture
def queue_path(tmp_path: Path) -> str:
    return str(tmp_path / "queue.db")


# -- backends ------------------------------------------------------------------------------

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[PgSchemas]:
    """The PostgreSQL test server, checked once; every schema a test made is dropped at the end.

    Skips (fails under CI=true) when the server cannot be reached.
    """
    reason = pg_unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    schemas = PgSchemas(pg_url())
    yield schemas
    schemas.drop()


@pytest.fixture
def pg_location(pg_schemas: PgSchemas) -> Iterator[str]:
    """A ``postgresql://...?schema=...`` queue location of its own (a fresh, empty schema)."""
    name = pg_schemas.new()
    yield with_schema(pg_schemas.url, name)
    api.reset()  # the API's queue may hold a connection to it
    pg_schemas.drop(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_location(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh queue location of the test's backend."""
    if backend == "sqlite":
        return str(request.getfixturevalue("queue_path"))
    return str(request.getfixturevalue("pg_location"))
