"""The process pool: a ``multiprocessing.Pool`` plus what it lacks for a job queue.

``Pool`` replaces a dead child but never reports the task that child was running (CPython
issue 22393). Children therefore report the job they start (see ``child.py``) and this class
keeps each child's ``Process`` object, so the serving loop can tell a crash from a slow job and
name the signal or exit status that ended it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.pool import Pool
from typing import Any

from . import procinfo
from .child import Task, init_child, run_task
from .models import AttemptResult, Outcome

#: Events pushed to the serving loop: ("start"|"spawn", job_id, pid, pgid),
#: ("result", job_id, AttemptResult), ("error", job_id, text).
Event = tuple[Any, ...]


class WorkerPool:
    """``workers`` children of the chosen start method, feeding one event queue."""

    def __init__(
        self,
        workers: int,
        start_method: str,
        imports: tuple[str, ...],
        events: queue.SimpleQueue[Event],
    ) -> None:
        self.workers = workers
        self._context = multiprocessing.get_context(start_method)
        self._imports = imports
        self._events = events
        self._child_events: Any = self._context.SimpleQueue()
        self._pool: Pool | None = None
        self._known: dict[int, Any] = {}  # pid -> Process, kept after Pool forgets it
        self._reader = threading.Thread(target=self._read_child_events, daemon=True)
        self._reader.start()
        self.start()

    def start(self) -> None:
        if self._context.get_start_method() == "forkserver":
            # Load the package once in the fork server; each child forks with it imported.
            self._context.set_forkserver_preload(["graphiti_mpq.child"])
        self._pool = self._context.Pool(
            self.workers, initializer=init_child, initargs=(self._child_events, self._imports)
        )
        self.refresh()

    def _read_child_events(self) -> None:
        while True:
            try:
                item = self._child_events.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            self._events.put(item)

    def submit(self, task: Task) -> None:
        assert self._pool is not None
        job_id = task.job_id

        def done(value: tuple[str, AttemptResult]) -> None:
            self._events.put(("result", value[0], value[1]))

        def failed(exc: BaseException) -> None:
            self._events.put(("error", job_id, f"{type(exc).__name__}: {exc}"))

        self._pool.apply_async(run_task, (task,), callback=done, error_callback=failed)

    def refresh(self) -> None:
        """Remember the current children (Pool drops a dead one from its list when it reaps it)."""
        if self._pool is None:
            return
        for process in list(getattr(self._pool, "_pool", [])):
            if process.pid is not None:
                self._known.setdefault(process.pid, process)

    def child_pids(self) -> list[int]:
        self.refresh()
        return [pid for pid, p in self._known.items() if p.exitcode is None]

    def exit_of(self, pid: int) -> AttemptResult | None:
        """A CRASHED result if child ``pid`` has ended, else None (still alive)."""
        self.refresh()
        process = self._known.get(pid)
        code = process.exitcode if process is not None else None
        if code is None and procinfo.is_alive(pid):
            return None
        if code is None:
            return AttemptResult(Outcome.CRASHED, error="the worker process died")
        exit_code, sig = procinfo.describe_exit(code)
        if sig is not None:
            return AttemptResult(
                Outcome.CRASHED, error=f"the worker process was killed by {sig}", signal=sig
            )
        return AttemptResult(
            Outcome.CRASHED,
            error=f"the worker process exited with status {exit_code} before reporting",
            exit_code=exit_code,
        )

    def forget_dead(self, keep: set[int]) -> None:
        """Drop ended children, except those whose crash is still being confirmed."""
        for pid in [pid for pid, p in self._known.items() if p.exitcode is not None]:
            if pid not in keep:
                del self._known[pid]

    def kill_child(self, pid: int) -> None:
        """Stop one child now (a job past its time limit); the pool starts a replacement."""
        if pid in self._known or procinfo.is_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_all(self, pgids: list[int]) -> None:
        """Hard stop: kill the commands' process groups, then every child, then reap them."""
        for pgid in pgids:
            procinfo.kill_process_group(pgid)
        for pid in self.child_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def close(self) -> None:
        """Stop every child and reap it (no zombie is left).

        Always ``terminate``: ``close`` + ``join`` waits forever for a task whose child died,
        since ``Pool`` keeps it in its cache. The loop calls this only with no job running.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()
        self._known.clear()

    def shutdown(self) -> None:
        self.close()
        self._child_events.put(None)
        self._reader.join(timeout=5)
        self._child_events.close()

    def restart(self, on_killed: Callable[[list[int]], None] | None = None) -> None:
        """Replace a pool that stopped taking work (a child died holding its task lock)."""
        pids = self.child_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()
        if on_killed is not None:
            on_killed(pids)
        self.start()
