"""Opt-in auto-start (``GRAPHITI_QUEUE_AUTOSTART=1``): hooks that fire at once start at most one
supervisor, it serves every job, and nothing starts without the setting or beside a
supervisor that already serves the queue.

Every process a test starts carries a marker in its environment (``MPQ_TEST_MARK``), which
the detached supervisor, its pool and its jobs inherit; the ``processes`` fixture stops the
supervisors with SIGTERM at the end and fails the test if any marked process survives them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("graphiti_mpq"))
EXAMPLE_CLI = str(ROOT / "examples" / "graphiti_cli.py")
MARK = "MPQ_TEST_MARK"

#: Generous: other test runs share this machine's two cores.
SOON = 60.0

# Each enqueuer says it is ready, then waits for the starting gun, then becomes the enqueue.
_AT_THE_GUN = 'touch "$1"; while [ ! -e "$2" ]; do sleep 0.01; done; shift 2; exec "$@"'


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


class Processes:
    """The live processes started (directly or not) by one test, found by their marker."""

    def __init__(self, tmp_path: Path) -> None:
        self.mark = str(tmp_path)
        self.db = str(tmp_path / "queue.db")
        self._needle = f"{MARK}={self.mark}".encode()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)  # the clean environment of conftest (queue in tmp_path)
        env[MARK] = self.mark
        env["PYTHONPATH"] = str(ROOT)
        env["GRAPHITI_BIN"] = "/bin/true"
        env["GRAPHITI_QUEUE_WORKERS"] = "2"
        env["GRAPHITI_QUEUE_LEASE"] = "6"
        env["GRAPHITI_QUEUE_GRACE"] = "5"
        env["GRAPHITI_QUEUE_BACKOFF_BASE"] = "0.1"
        env.update(extra)
        return env

    def marked(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            if self._needle in _read(f"/proc/{entry}/environ").split(b"\0"):
                pids.append(int(entry))
        return pids

    def supervisors(self) -> list[int]:
        """Live processes running ``graphiti_mpq ... supervise`` on this test's queue."""
        found = []
        for pid in self.marked():
            argv = _read(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")
            text = " ".join(argv)
            if "graphiti_mpq" in text and "supervise" in argv and self.db in text:
                found.append(pid)
        return found

    def stop_all(self) -> list[str]:
        """SIGTERM every supervisor; return the marked processes still alive after it."""
        for pid in self.supervisors():
            _signal(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not self.marked(), timeout=SOON, what="marked processes to exit")
        except AssertionError:
            pass
        survivors = [describe(pid) for pid in self.marked()]
        for pid in self.marked():
            _signal(pid, signal.SIGKILL)
        return survivors


def describe(pid: int) -> str:
    """pid, parent, state and command line: what a survivor was."""
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    fields = stat.rpartition(")")[2].split()
    argv = _read(f"/proc/{pid}/cmdline").decode(errors="replace").replace("\0", " ")
    return f"{pid} (parent {fields[1] if fields else '?'}, {fields[0] if fields else '?'}): {argv}"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    survivors = procs.stop_all()
    assert survivors == [], f"processes survived the test: {survivors}"


def enqueuer(i: int) -> list[str]:
    """Half use ``graphiti_mpq enqueue``, half the ``--async`` option of a click CLI."""
    if i % 2:
        return [sys.executable, EXAMPLE_CLI, "add", "--async", f"note {i}"]
    return [CONSOLE_SCRIPT, "enqueue", "add", f"note {i}"]


def enqueue_at_once(procs: Processes, tmp_path: Path, count: int, env: dict[str, str]) -> None:
    """Start ``count`` enqueuers, let them go together, and check each exited 0 silently."""
    gun = tmp_path / "go"
    started = []
    for i in range(count):
        ready = tmp_path / f"ready-{i}"
        started.append(
            subprocess.Popen(
                ["sh", "-c", _AT_THE_GUN, "sh", str(ready), str(gun), *enqueuer(i)],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    wait_until(
        lambda: all((tmp_path / f"ready-{i}").exists() for i in range(count)),
        timeout=SOON,
        what="every enqueuer to be ready",
    )
    gun.touch()
    for i, proc in enumerate(started):
        out, err = proc.communicate(timeout=SOON)
        assert proc.returncode == 0, (i, proc.returncode, out, err)
        assert err == "", (i, err)
        if i % 2:
            assert out == "", out  # --async in a hook context prints nothing at all
        else:
            assert re.fullmatch(r"[0-9a-f]{28}\n", out), out


def states(db: str) -> list[str]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [row[0] for row in conn.execute("SELECT state FROM jobs ORDER BY seq")]
    finally:
        conn.close()


def status(procs: Processes) -> dict[str, Any]:
    proc = subprocess.run(
        [CONSOLE_SCRIPT, "status", "--json"],
        env=procs.env(),
        capture_output=True,
        text=True,
        timeout=SOON,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def live_supervisors(report: dict[str, Any]) -> list[int]:
    return [p["pid"] for p in report["supervisors"] if p["kind"] == "supervise" and p["alive"]]


def wait_all_succeeded(procs: Processes, count: int) -> None:
    wait_until(
        lambda: states(procs.db) == ["succeeded"] * count,
        timeout=SOON * 2,
        interval=0.2,
        what=f"{count} jobs to succeed",
    )
    report = status(procs)
    assert report["succeeded"] == count and report["pending"] == 0, report


def test_ten_enqueues_at_once_start_exactly_one_supervisor(
    processes: Processes, tmp_path: Path
) -> None:
    env = processes.env(GRAPHITI_QUEUE_AUTOSTART="1")
    enqueue_at_once(processes, tmp_path, 10, env)
    wait_all_succeeded(processes, 10)

    (pid,) = processes.supervisors()
    assert live_supervisors(status(processes)) == [pid]
    argv = _read(f"/proc/{pid}/cmdline").decode().split("\0")
    assert argv[argv.index("--idle-exit") + 1] == "10m"
    assert argv[argv.index("--log-format") + 1] == "json"
    assert argv[argv.index("--db") + 1] == processes.db
    assert os.getsid(pid) == pid  # detached: its own session

    log = Path(processes.db + ".supervisor.log")
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines, "the supervisor log is empty"
    events = [json.loads(line) for line in lines]  # JSON lines, every one
    assert any(event.get("event") == "job_completed" for event in events), events[-5:]

    # Once it is gone (its lock with it), the next enqueue starts a new one.
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not processes.marked(), timeout=SOON, what="the supervisor to exit")
    proc = subprocess.run(enqueuer(0), env=env, capture_output=True, text=True, timeout=SOON)
    assert proc.returncode == 0, proc.stderr
    wait_all_succeeded(processes, 11)
    (second,) = processes.supervisors()
    assert second != pid


def test_without_the_setting_no_supervisor_starts(processes: Processes, tmp_path: Path) -> None:
    enqueue_at_once(processes, tmp_path, 4, processes.env())
    # A supervisor is started before the enqueue exits: none now means none at all.
    assert processes.marked() == []
    report = status(processes)  # (ingests what a busy first enqueue spooled)
    assert report["supervisors"] == [] and report["pending"] == 4, report
    assert states(processes.db) == ["pending"] * 4
    assert not Path(processes.db + ".supervisor.log").exists()


def test_no_second_supervisor_beside_one_that_serves(processes: Processes, tmp_path: Path) -> None:
    log = open(tmp_path / "manual.log", "wb")
    try:
        manual = subprocess.Popen(
            [sys.executable, "-m", "graphiti_mpq", "--db", processes.db, "supervise"],
            env=processes.env(),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    try:
        wait_until(
            lambda: live_supervisors(status(processes)) == [manual.pid],
            timeout=SOON,
            interval=0.2,
            what="the manual supervisor to serve",
        )
        enqueue_at_once(processes, tmp_path, 6, processes.env(GRAPHITI_QUEUE_AUTOSTART="1"))
        wait_all_succeeded(processes, 6)
        assert processes.supervisors() == [manual.pid]
        assert live_supervisors(status(processes)) == [manual.pid]
        assert not Path(processes.db + ".supervisor.log").exists()
    finally:
        manual.send_signal(signal.SIGTERM)
        assert manual.wait(timeout=SOON) == 0


# -- in-process: auto-start is best effort and never fails the enqueue ------------------------


def test_a_failing_autostart_does_not_fail_the_enqueue(
    monkeypatch: pytest.MonkeyPatch, queue_path: str
) -> None:
    from graphiti_mpq import autostart, quick

    def broken(location: str, fd: int) -> None:
        raise OSError("cannot start anything")

    monkeypatch.setattr(autostart, "_spawn", broken)
    monkeypatch.setenv("GRAPHITI_QUEUE_AUTOSTART", "1")
    job_id = quick.enqueue_one("add", {"command": "add", "args": ["x"]})
    assert states(queue_path) == ["pending"]
    assert len(job_id) == 28


def test_autostart_after_a_spool_at_open_still_starts_one(
    monkeypatch: pytest.MonkeyPatch, queue_path: str
) -> None:
    """The enqueue could not even open the database (spooled): nobody can be seen serving it,
    so one supervisor starts (the lock still allows only one)."""
    from graphiti_mpq import autostart

    spawned: list[str] = []
    monkeypatch.setattr(autostart, "_spawn", lambda location, fd: spawned.append(location))
    assert autostart.maybe_autostart(queue_path, None) is True  # a new, empty database
    assert spawned == [queue_path]
