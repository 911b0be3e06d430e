"""Helpers for the tests that run real serving processes (``supervise``, ``drain``).

A :class:`Serving` is one ``python -m graphiti_mpq ... supervise|drain`` subprocess with JSON
logs in a file, started in its own session so a failed test can still kill whatever it left.
:func:`replay_program` writes a small shell program for replay jobs. Everything waits on
conditions with deadlines (``wait_until``), never on bare sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graphiti_mpq import procinfo
from graphiti_mpq.storage.sqlite import JobQueue

from .helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "tests.jobs_fixture"

#: Deadlines: generous, since other test runs share this machine's two cores.
START = 30.0
SOON = 20.0


def serving_env(db: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHITI_")}
    env["GRAPHITI_QUEUE_PATH"] = db
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


class Serving:
    """One serving process and its JSON log."""

    def __init__(
        self,
        tmp_path: Path,
        db: str,
        command: str,
        *args: str,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or command
        self.log_path = tmp_path / f"{self.name}-{time.monotonic_ns()}.log"
        self.out_path = self.log_path.with_suffix(".out")
        argv = [sys.executable, "-m", "graphiti_mpq", "--log-format", "json", command, *args]
        with open(self.log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env or serving_env(db),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=tmp_path,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def wait_event(self, name: str, timeout: float = SOON, **fields: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events(name):
                if all(event.get(k) == v for k, v in fields.items()):
                    return event
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return None

        return wait_until(found, timeout, 0.02, f"{name} {fields} in the {self.name} log")

    def wait_ready(self) -> Serving:
        self.wait_event("supervisor_started", timeout=START)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stdout(self) -> str:
        return self.out_path.read_text()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = SOON) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still runs after {timeout}s:\n{self.log()}"
            ) from None

    def descendants(self) -> list[int]:
        return descendants(self.pid)

    def kill_all(self) -> None:
        """Teardown: kill the process and everything in its session, then reap it.

        The session's group is killed even when the process already ended: after a failed test
        something of it may still run (the group keeps its number while any member runs).
        """
        if self.proc.poll() is None:
            for pid in self.descendants():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()
        if fields and fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_gone(pids: list[int], timeout: float = SOON, what: str = "processes to die") -> None:
    """Poll until none of ``pids`` runs (a zombie counts as gone: it runs no code)."""
    starts = {pid: procinfo.process_start_time(pid) for pid in pids}

    def alive() -> list[str]:
        return [
            describe(pid)
            for pid, start in starts.items()
            if start is not None and procinfo.is_alive(pid, start)
        ]

    try:
        wait_until(lambda: not alive(), timeout, 0.05, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still alive: {alive()}") from None


def describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        argv = "?"
    return f"{pid} {argv[:100]}"


def read_pids(path: Path, timeout: float = SOON) -> list[int]:
    """The pids a handler or program wrote into ``path``, once it exists."""
    wait_until(path.exists, timeout, 0.02, f"{path.name} to be written")
    return [int(word) for word in path.read_text().split()]


def tracked() -> Iterator[list[Serving]]:
    """For a ``servers`` fixture: whatever still runs at the end is killed and reaped."""
    started: list[Serving] = []
    yield started
    for serving in started:
        serving.kill_all()


def start(
    servers: list[Serving],
    tmp_path: Path,
    db: str,
    command: str,
    *args: str,
    env: dict[str, str] | None = None,
    ready: bool = True,
    name: str | None = None,
) -> Serving:
    serving = Serving(tmp_path, db, command, *args, env=env, name=name)
    servers.append(serving)
    if ready:
        serving.wait_ready()
    return serving


PROGRAM = """\
    #!/bin/sh
    # A stand-in for `graphiti`: argv is COMMAND [FLAGS] [-- ARGS]; ARGS name files to write.
    cmd=$1; shift
    [ "$1" = "--" ] && shift
    case "$cmd" in
      ok) echo "ok $GRAPHITI_MPQ_JOB_ID $GRAPHITI_MPQ_ATTEMPT"; exit 0 ;;
      fail) echo "it went wrong" >&2; exit 4 ;;
      attempt) echo "$GRAPHITI_MPQ_ATTEMPT" >> "$1"; [ "$GRAPHITI_MPQ_ATTEMPT" -ge "$2" ] ;;
      hang)
        # a grandchild in the command's process group, then hang; record both pids
        echo "$GRAPHITI_MPQ_ATTEMPT" >> "$1.attempts"
        if [ -e "$1.release" ]; then exit 0; fi
        sleep 1000 &
        echo "$$ $!" > "$1.tmp"; mv "$1.tmp" "$1"
        wait ;;
      hang_once)
        # like hang on attempt 1; succeeds on a later attempt
        echo "$GRAPHITI_MPQ_ATTEMPT" >> "$1.attempts"
        if [ "$GRAPHITI_MPQ_ATTEMPT" -ge 2 ]; then exit 0; fi
        sleep 1000 &
        echo "$$ $!" > "$1.tmp"; mv "$1.tmp" "$1"
        wait ;;
      *) echo "unknown command $cmd" >&2; exit 2 ;;
    esac
"""


def replay_program(tmp_path: Path) -> str:
    path = tmp_path / "fakegraphiti"
    path.write_text(textwrap.dedent(PROGRAM))
    path.chmod(0o755)
    return str(path)


def open_db(db: str) -> JobQueue:
    return JobQueue(db, busy_timeout=30.0).open()


def attempts_of(queue: JobQueue, job_id: str) -> list[tuple[int, str | None]]:
    return [(a.attempt, a.outcome) for a in queue.get_attempts(job_id)]


def job_state(queue: JobQueue, job_id: str) -> str:
    return queue.get_job(job_id).public_state


def wait_state(queue: JobQueue, job_id: str, state: str, timeout: float = SOON) -> None:
    wait_until(
        lambda: job_state(queue, job_id) == state,
        timeout,
        0.05,
        f"job {job_id} to be {state} (attempts {attempts_of(queue, job_id)})",
    )
