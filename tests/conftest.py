"""Shared fixtures: every test gets its own queue file and a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphiti_mpq import api


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
def queue_path(tmp_path: Path) -> str:
    return str(tmp_path / "queue.db")
