"""Test helpers: waiting on conditions with deadlines instead of sleeping."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def child_env() -> dict[str, str]:
    """This environment, with the repository importable (for ``python -c`` children)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(script: str, *args: str) -> str:
    """Run a Python snippet in a real child process until it exits; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_dies_with_its_spawner(start: str, prelude: str = "") -> None:
    """A middle process runs ``prelude`` then ``p = <start>`` (a long ``sleep``), reports the
    sleep's pid and is SIGKILLed: the kernel must kill the sleep with it (a parent-death signal
    armed in the sleep itself)."""
    import signal

    from graphiti_mpq import procinfo

    script = "\n".join(
        [
            "import os, subprocess, sys, time",
            "from graphiti_mpq import procinfo, spawn",
            prelude,
            f"p = {start}",
            "print(p.pid, flush=True)",
            "time.sleep(30)",
        ]
    )
    argv = [sys.executable, "-c", script]
    middle = subprocess.Popen(argv, stdout=subprocess.PIPE, env=child_env())
    assert middle.stdout is not None
    with middle.stdout:
        line = middle.stdout.readline()
    if not line:
        middle.kill()
        middle.wait()
        raise AssertionError("the middle process did not start its command")
    sleeper = int(line)
    try:
        # Through an exec wrapper, the pid is the sleep's once the wrapper has done its part.
        wait_until(
            lambda: Path(f"/proc/{sleeper}/comm").read_text().strip() == "sleep",
            10.0,
            what="the sleep to be exec'd",
        )
        middle.kill()
        middle.wait()
        wait_until(lambda: not procinfo.is_alive(sleeper), 10.0, what="the sleep to die")
    finally:
        middle.kill()
        middle.wait()
        if procinfo.is_alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def schema_v2_queue(path: str) -> sqlite3.Connection:
    """A queue database as schema version 2 left it, inside an open write transaction on the
    returned autocommit connection (the caller adds rows, then commits)."""
    from graphiti_mpq.storage import schema

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    schema.MIGRATIONS[1](conn)
    schema.MIGRATIONS[2](conn)
    conn.execute("PRAGMA user_version = 2")
    return conn
