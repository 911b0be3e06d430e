"""What runs inside a pool child: set-up once per child, then a chunk of jobs per task.

A child writes which job of its chunk it starts, and each job's outcome as soon as it has one,
to the chunk's slot of shared memory (see ``slots.py``): the parent can tell a child that died
mid-job (``multiprocessing.Pool`` never reports that) from one that finished, and no outcome
of a finished job is lost when a later job of the chunk crashes the child. The process group of
a replayed command goes there too, the moment it exists: no message a killed child could leave
half-sent, and no wake-up of the parent for each spawn. A child never touches the database or
the barrier.

No job code outlives the supervisor: each child watches the supervisor's pid (a pidfd; the
parent-death signal alone fails under forkserver, whose server outlives it) and, when it goes,
kills the running command's process group and its own (a child leads one, so whatever a Python
handler started goes too) before it exits.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

from . import handlers, procinfo
from .models import AttemptResult, Outcome
from .slots import Slots, SlotWriter
from .startlog import StartMarks

_events: Any = None
_slots: Slots | None = None
_init_error: str | None = None
_stopping: Any = None
#: (pid, start time, pidfd or None) of the serving process, once the watcher runs.
_supervisor: tuple[int, int | None, int | None] | None = None
#: Without pidfds, how often a child checks that its supervisor still runs.
_WATCH_POLL = 0.5


@dataclass(frozen=True)
class Task:
    """One attempt handed to a child (picklable)."""

    job_id: str
    job_type: str
    payload: dict[str, Any]
    attempt: int
    timeout: float | None
    program: str


@dataclass(frozen=True)
class Chunk:
    """Jobs run one after another by one child, reporting through shared-memory ``slot``."""

    chunk_id: int
    slot: int
    tasks: tuple[Task, ...]
    start_marks: str | None = None  # the file where each start is marked first (startlog)


def _die(code: int) -> None:
    """Take every process of this child's attempt along, then exit now.

    The replayed commands lead their own sessions; whatever a Python handler started stays in
    this child's process group, which the child leads (see ``init_child``).

    Called from signal handlers (which may nest: parent death and a pool shutdown both send
    SIGTERM) and from the supervisor watcher thread, so it takes no lock: the registry's lock
    may be held by the very frame a handler interrupted. A copy of the dict's values is atomic
    under the GIL.
    """
    # From the watcher thread: wait for a command being spawned to be registered, and keep
    # the lock so no other spawn starts before we exit (bounded; skipped from a signal
    # handler, which may have interrupted that very spawn).
    if threading.current_thread() is not threading.main_thread():
        handlers.spawn_lock.acquire(timeout=5.0)
    for pgid in list(handlers._active_groups.values()):
        procinfo.kill_process_group(pgid)
    if os.getpgrp() == os.getpid():
        try:
            os.killpg(os.getpid(), signal.SIGKILL)  # our own group: ends us too
        except OSError:
            pass
    os._exit(code)


def _die_with_parent(signum: int, frame: FrameType | None) -> None:
    """Parent death (or pool shutdown): take the running command's process group along."""
    _die(128 + signum)


def _watch_supervisor(pid: int, start: int | None) -> None:
    """Die when the serving process dies, whichever process is our parent.

    The parent-death signal is not enough: under forkserver our parent is the fork server,
    which lives as long as any of its children holds its "alive" pipe, that is as long as we
    do. A pidfd tells us at once when the supervisor ends; without one we poll.
    """
    global _supervisor
    fd: int | None
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    _supervisor = (pid, start, fd)
    try:
        if procinfo.is_alive(pid, start):
            if fd is not None:
                select.select([fd], [], [])  # readable once the process has ended
            else:
                while procinfo.is_alive(pid, start):
                    time.sleep(_WATCH_POLL)
    finally:
        _die(1)


class _SilentOnceOrphaned:
    """This child's ``sys.stderr``: what it would write once its supervisor is gone goes
    nowhere, instead of into the log of a supervisor that crashed (the traceback of a result
    it can no longer send, say). Only Python-level writes through ``sys.stderr``: a command's
    own output, or a stream a handler took before this child started, are their own.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._gone = False
        self._next_look = 0.0  # without a pidfd, the supervisor is looked up at most so often

    def _orphaned(self) -> bool:
        if not self._gone and _supervisor is not None:
            if _supervisor[2] is not None or time.monotonic() >= self._next_look:
                self._next_look = time.monotonic() + _WATCH_POLL / 10
                try:
                    # The pidfd turns readable only once every thread of the supervisor has
                    # exited; a SIGKILLed one shows a zombie main thread for a few ms before
                    # that, and a result sent then already fails: that counts as gone too.
                    self._gone = _supervisor_gone() or not procinfo.is_alive(
                        _supervisor[0], _supervisor[1]
                    )
                except (OSError, ValueError):  # our pidfd closed under us: keep writing
                    pass
        return self._gone

    def write(self, text: str) -> int:
        if self._orphaned():
            return len(text)
        written = self._stream.write(text)
        return len(text) if written is None else int(written)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def init_child(
    events: Any,
    imports: tuple[str, ...],
    supervisor: tuple[int, int | None] | None = None,
    stopping: Any = None,
    slots: Slots | None = None,
) -> None:
    """Pool initializer: die with the supervisor, leave Ctrl-C to it, load handler modules.

    ``supervisor`` is (pid, start time) of the serving process. The child leads its own process
    group, so a crash, a time limit or a stop can end whatever a Python handler started.
    ``stopping`` is a shared flag the supervisor raises on a graceful stop: a task the pool
    still held is then handed back instead of started. ``slots`` is where chunks report.
    """
    global _events, _init_error, _stopping, _slots
    _events = events
    _stopping = stopping
    _slots = slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _die_with_parent)
    procinfo.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        os._exit(1)
    try:
        os.setpgid(0, 0)
        # Out of the terminal's foreground group now: let a handler still write to it
        # (under ``stty tostop`` a background write would stop the child).
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    except OSError:
        pass
    if supervisor is not None:
        # The watcher must never take the signals meant for the main thread: a SIGTERM that
        # lands on it would leave the main thread blocked and the handler never run.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            threading.Thread(
                target=_watch_supervisor, args=supervisor, name="supervisor-watch", daemon=True
            ).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if sys.stderr is not None:
            sys.stderr = _SilentOnceOrphaned(sys.stderr)
    try:
        handlers.import_handler_modules(imports)
    except Exception as exc:  # every task of this child fails with it, instead of a respawn loop
        _init_error = str(exc)


def _supervisor_gone() -> bool:
    """Whether the serving process has ended (the watcher may not have acted yet)."""
    if _supervisor is None:
        return False
    pid, start, fd = _supervisor
    if fd is not None:
        return bool(select.select([fd], [], [], 0)[0])
    return not procinfo.is_alive(pid, start)


def run_chunk(chunk: Chunk) -> int:
    """Run a chunk's jobs in order until done or stopping; returns how many were started.

    Before each job: no job starts once the supervisor is gone (this child dies instead) or
    once a graceful stop began (the parent hands the rest back). The start is published before
    the job runs, the outcome right after, so the parent always knows which job a dead child
    was running.
    """
    assert _slots is not None
    writer = SlotWriter(_slots, chunk.slot, os.getpid())
    marks = StartMarks(chunk.start_marks)
    started = 0
    try:
        for index, task in enumerate(chunk.tasks):
            if _supervisor_gone():
                _die(1)  # our supervisor died: no job code may start now
            if _stopping is not None and _stopping.value:
                break
            if not writer.start(index):
                break  # the parent moved the rest to a free child (this one was busy)
            started = index + 1
            began = time.monotonic()
            result = _run_marked(task, marks, partial(writer.spawned, index))
            if not writer.finish(index, time.monotonic() - began, result) and _events is not None:
                # Too large for the slot: by the event queue, with its command's group.
                _events.put(("result", chunk.chunk_id, task.job_id, result, writer.pgid_of(index)))
    finally:
        marks.close()
    return started


def _run_marked(task: Task, marks: StartMarks, on_spawn: Callable[[int], None]) -> AttemptResult:
    """Mark the start durably, then run; a job whose start cannot be marked does not run."""
    try:
        marks.mark(task.job_id, task.attempt)
    except OSError as exc:
        return AttemptResult(
            Outcome.FAILED, error=f"cannot mark its start: {exc}", finished_at=time.time()
        )
    return _run_one(task, on_spawn)


def _run_one(task: Task, on_spawn: Callable[[int], None]) -> AttemptResult:
    """One attempt; every failure comes back as an AttemptResult, never as an exception."""
    if _init_error is not None:
        return AttemptResult(Outcome.FAILED, error=_init_error, finished_at=time.time())
    try:
        result = handlers.run_job(
            task.job_type,
            task.payload,
            program=task.program,
            job_id=task.job_id,
            attempt=task.attempt,
            timeout=task.timeout,
            on_spawn=on_spawn,
        )
    except BaseException as exc:  # a handler that raises SystemExit or the like
        result = AttemptResult(Outcome.FAILED, error=f"{type(exc).__name__}: {exc}")
    if result.finished_at is None:
        result = AttemptResult(
            result.outcome,
            result.error,
            result.exit_code,
            result.signal,
            result.output_tail,
            result.result,
            time.time(),
        )
    return result
