"""Python handlers for the serving tests, imported by serving processes with ``--import``.

Each handler misbehaves in one precise way (crash, hang, kill its supervisor...) or records
what it did in files under ``payload["dir"]`` so a test can check it from outside. Files are
written whole and renamed into place, or appended one line at a time, so a reader never sees
half a record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import graphiti_mpq


def _write(path: str | Path, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _append(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _first_time(marker: str) -> bool:
    """True the first time it is called with this marker file (any process), then False."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def serving_ancestor() -> int:
    """The pid of the ``graphiti_mpq`` process above this child.

    Not simply ``os.getppid()``: under forkserver a pool child's parent is the fork server.
    """
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            break
        if b"graphiti_mpq" in argv and b"-m" in argv:
            return pid
        pid = int(stat.rpartition(b")")[2].split()[1])
    raise RuntimeError("no graphiti_mpq process above this child")


@graphiti_mpq.handler("noop")
def noop(payload: dict[str, Any]) -> Any:
    return payload.get("value")


@graphiti_mpq.handler("fail")
def fail(payload: dict[str, Any]) -> Any:
    raise RuntimeError(payload.get("message", "boom"))


@graphiti_mpq.handler("exit3")
def exit3(payload: dict[str, Any]) -> Any:
    os._exit(3)


@graphiti_mpq.handler("sigkill")
def sigkill(payload: dict[str, Any]) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


@graphiti_mpq.handler("segv")
def segv(payload: dict[str, Any]) -> Any:
    os.kill(os.getpid(), signal.SIGSEGV)


@graphiti_mpq.handler("record")
def record(payload: dict[str, Any]) -> Any:
    """Append {name, start, end, by} to payload["log"] (by: the serving process's pid)."""
    start = time.time()
    time.sleep(float(payload.get("seconds", 0.2)))
    end = time.time()
    _append(
        payload["log"],
        {"name": payload["name"], "start": start, "end": end, "by": serving_ancestor()},
    )
    return payload["name"]


@graphiti_mpq.handler("hang")
def hang(payload: dict[str, Any]) -> Any:
    """Write this child's pid to payload["pidfile"], then sleep until killed.

    With payload["marker"], only the first attempt hangs; later attempts succeed.
    """
    marker = payload.get("marker")
    if marker is not None and not _first_time(marker):
        return "second time"
    _write(payload["pidfile"], str(os.getpid()))
    while True:
        time.sleep(1000)


@graphiti_mpq.handler("hang_with_grandchild")
def hang_with_grandchild(payload: dict[str, Any]) -> Any:
    """Start a sleeping grandchild (its own session), record both pids, and hang."""
    marker = payload.get("marker")
    if marker is not None and not _first_time(marker):
        return "second time"
    grandchild = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=False
    )
    _write(payload["pidfile"], f"{os.getpid()} {grandchild.pid}")
    while True:
        time.sleep(1000)


@graphiti_mpq.handler("kill_supervisor")
def kill_supervisor(payload: dict[str, Any]) -> Any:
    """SIGKILL the process serving this job: every attempt takes its supervisor down."""
    _append(payload["log"], {"pid": os.getpid(), "at": time.time()})
    os.kill(serving_ancestor(), signal.SIGKILL)
    while True:
        time.sleep(1000)


@graphiti_mpq.handler("sleep")
def sleep(payload: dict[str, Any]) -> Any:
    """Record the start in payload["log"], sleep, return."""
    if "log" in payload:
        _append(payload["log"], {"name": payload.get("name"), "pid": os.getpid()})
    time.sleep(float(payload.get("seconds", 1.0)))
    return payload.get("name")


@graphiti_mpq.handler("gate")
def gate(payload: dict[str, Any]) -> Any:
    """Record the start, wait until the file payload["release"] exists, record the interval."""
    start = time.time()
    _write(payload["started"], str(os.getpid()))
    deadline = time.monotonic() + 60.0
    while not os.path.exists(payload["release"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    end = time.time()
    _append(
        payload["log"],
        {"name": payload["name"], "start": start, "end": end, "by": serving_ancestor()},
    )
    return payload["name"]


@graphiti_mpq.handler("tally")
def tally(payload: dict[str, Any]) -> Any:
    """A short job that appends its name to payload["log"]; with "die", SIGKILLs its child;
    with "release", first waits (up to 60 s) for that file to exist."""
    if payload.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.monotonic() + 60.0
    while payload.get("release") and not os.path.exists(payload["release"]):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    with open(payload["log"], "a") as f:
        f.write(payload["name"] + "\n")
    return payload["name"]


@graphiti_mpq.handler("big")
def big(payload: dict[str, Any]) -> Any:
    """A result of payload["size"] characters: too large for a chunk's shared-memory slot."""
    return "x" * int(payload["size"])


@graphiti_mpq.handler("chatter")
def chatter(payload: dict[str, Any]) -> Any:
    """Writes to stderr without pause, saying each time whether its supervisor has ended (as
    the kernel tells it: its pidfd is readable once the whole process is gone)."""
    import select

    supervisor = serving_ancestor()
    ended = os.pidfd_open(supervisor)
    _write(payload["pidfile"], f"{os.getpid()} {supervisor}")
    gone_at = None
    while gone_at is None or time.monotonic() - gone_at < 2.0:  # should be killed long before
        state = "gone" if select.select([ended], [], [], 0)[0] else "alive"
        if state == "gone" and gone_at is None:
            gone_at = time.monotonic()
        sys.stderr.write(f"chatter: supervisor {state}\n")
        sys.stderr.flush()
