"""The process pool: a ``multiprocessing.Pool`` plus what it lacks for a job queue.

``Pool`` replaces a dead child but never reports the task that child was running (CPython
issue 22393). Children therefore report the job they start (see ``child.py``) and this class
keeps each child's ``Process`` object, so the serving loop can tell a crash from a slow job and
name the signal or exit status that ended it.

Shutting a ``Pool`` down is made robust here (see ``close``): a child killed at the wrong
moment holds one of ``Pool``'s locks for ever, and ``terminate`` would wait on it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.pool import Pool
from typing import Any

from . import procinfo
from .child import Chunk, init_child, run_chunk
from .models import AttemptResult, Outcome
from .slots import Slots

#: How often a stalled pool shutdown is helped along (children killed, locks freed).
_CLOSE_TICK = 0.1
#: How long an ended child stays known (its last reports may still be on their way).
_FORGET_AFTER = 2.0

#: Events pushed to the serving loop: ("result", chunk_id, job_id, AttemptResult, pgid or
#: None) from children (an outcome too large for the chunk's slot); ("chunk", chunk_id,
#: jobs started) when a chunk returns, ("chunk_error", chunk_id, text) when it raised;
#: ("wake",) and ("stop",) from elsewhere.
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
        # Raised on a graceful stop; a byte in shared memory, no lock a killed child could hold.
        self._stopping: Any = self._context.RawValue("b", 0)
        #: Two chunks per child: one running, one waiting, so a child never waits for the loop.
        self.slots = Slots(self._context, 2 * workers)
        self._pool: Pool | None = None
        self._known: dict[int, Any] = {}  # pid -> Process, kept after Pool forgets it
        #: (when, Process) of every child the pool made, appended by the pool's own thread.
        self._created: list[tuple[float, Any]] = []
        self._dead_since: dict[int, float] = {}  # pid -> when we saw it ended
        self._reader = threading.Thread(target=self._read_child_events, daemon=True)
        self._reader.start()
        self.start()

    def start(self) -> None:
        if self._context.get_start_method() == "forkserver":
            # Load the package once in the fork server; each child forks with it imported.
            self._context.set_forkserver_preload(["graphiti_mpq.child"])
        me = os.getpid()
        self._pool = _TrackingPool(
            self._created,
            self.workers,
            initializer=init_child,
            initargs=(
                self._child_events,
                self._imports,
                (me, procinfo.process_start_time(me)),
                self._stopping,
                self.slots,
            ),
            context=self._context,
        )
        self.refresh()

    def stop_starting(self) -> None:
        """Graceful stop: children hand back the tasks they have not started yet."""
        self._stopping.value = 1

    def _read_child_events(self) -> None:
        while True:
            try:
                item = self._child_events.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            self._events.put(item)

    def submit(self, chunk_id: int, chunk: Chunk) -> None:
        assert self._pool is not None

        def done(started: int) -> None:
            self._events.put(("chunk", chunk_id, started))

        def failed(exc: BaseException) -> None:
            self._events.put(("chunk_error", chunk_id, f"{type(exc).__name__}: {exc}"))

        self._pool.apply_async(run_chunk, (chunk,), callback=done, error_callback=failed)

    def refresh(self) -> None:
        """Remember the current children (Pool drops a dead one from its list when it reaps it)."""
        if self._pool is None:
            return
        for process in list(getattr(self._pool, "_pool", [])):
            if process.pid is not None:
                self._known.setdefault(process.pid, process)

    def _created_child(self, pid: int) -> Any:
        """A child the pool made and reaped before ``refresh`` saw it (see ``_TrackingPool``)."""
        for _, process in list(self._created):
            if process.pid == pid:
                return process
        return None

    def child_pids(self) -> list[int]:
        self.refresh()
        return [pid for pid, p in self._known.items() if not _ended(p)]

    def exit_of(self, pid: int) -> AttemptResult | None:
        """A CRASHED result if child ``pid`` has ended, else None (still alive)."""
        self.refresh()
        process = self._known.get(pid) or self._created_child(pid)
        code = _returncode(process) if process is not None else None
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

    def forget_dead(self, keep: set[int]) -> list[int]:
        """Drop children that ended a while ago, except those whose crash is being confirmed.

        A child's "start" report may still be on its way when it dies: it stays known for
        ``_FORGET_AFTER`` seconds, so its crash is still told with its signal. Returns the
        pids dropped.
        """
        self.refresh()
        now = time.monotonic()
        dropped = []
        for pid, process in list(self._known.items()):
            if not _ended(process) or pid in keep:
                continue
            since = self._dead_since.setdefault(pid, now)
            if now - since >= _FORGET_AFTER:
                del self._known[pid]
                del self._dead_since[pid]
                dropped.append(pid)
        for item in list(self._created):  # ended children are kept a while for exit_of
            when, process = item
            if now - when >= _FORGET_AFTER and process.pid not in keep and _ended(process):
                self._created.remove(item)  # the pool's thread may append meanwhile: no rebuild
        return dropped

    def kill_child(self, pid: int) -> None:
        """Stop one child now (a job past its time limit); the pool starts a replacement.

        The child leads its own process group: whatever its handler started goes with it.
        """
        if pid in self._known or procinfo.is_alive(pid):
            _kill_tree(pid)

    def kill_all(self, pgids: list[int]) -> None:
        """Hard stop: kill the commands' process groups, then every child, then reap them."""
        for pgid in pgids:
            procinfo.kill_process_group(pgid)
        for pid in self.child_pids():
            _kill_tree(pid)
        self.close()

    def close(self) -> None:
        """Stop every child and reap it (no zombie is left), whatever state the pool is in.

        Always ``terminate``: ``close`` + ``join`` waits forever for a task whose child died,
        since ``Pool`` keeps it in its cache. ``terminate`` alone can hang too: it takes the
        task queue's read lock, which a child killed while idle holds for ever (a hard stop, a
        restart), and it joins children after a SIGTERM they may act on late. So it runs on a
        helper thread, and while it has not finished we kill every child and release the locks
        a dead child may have held.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            done = threading.Event()

            def terminate() -> None:
                pool.terminate()
                done.set()

            helper = threading.Thread(target=terminate, name="pool-terminate", daemon=True)
            helper.start()
            while not done.wait(_CLOSE_TICK):
                _force_down(pool)
            helper.join()
            pool.join()
        self._known.clear()
        self._dead_since.clear()
        # A child killed while it reported an event holds the event queue's write lock.
        _unwedge(getattr(self._child_events, "_wlock", None))

    def shutdown(self) -> None:
        self.close()
        self._child_events.put(None)
        self._reader.join(timeout=5)
        self._child_events.close()
        self.slots.close()

    def restart(self, on_killed: Callable[[list[int]], None] | None = None) -> None:
        """Replace a pool that stopped taking work (a child died holding its task lock)."""
        pids = self.child_pids()
        for pid in pids:
            _kill_tree(pid)
        self.close()
        if on_killed is not None:
            on_killed(pids)
        self.start()


def _force_down(pool: Pool) -> None:
    """Unblock a stalled ``Pool.terminate``: kill every child, free what dead children held."""
    for process in list(getattr(pool, "_pool", [])):
        if process.pid is not None and procinfo.is_alive(process.pid):
            _kill_tree(process.pid)
    # Every child is dead (replacements included): nobody may hold these any more.
    _release(getattr(getattr(pool, "_inqueue", None), "_rlock", None))
    _release(getattr(getattr(pool, "_outqueue", None), "_wlock", None))


class _TrackingPool(Pool):
    """A ``Pool`` that remembers every child it creates, as it creates it.

    ``Pool`` replaces a dead child from its own thread and drops the dead one from its list
    when it reaps it; a child that starts a job and dies before the loop next looks would
    otherwise be unknown, and its signal or exit status lost.
    """

    def __init__(self, created: list[Any], *args: Any, **kwargs: Any) -> None:
        self.created = created  # set first: Pool.__init__ starts the children
        super().__init__(*args, **kwargs)

    def Process(self, ctx: Any, *args: Any, **kwds: Any) -> Any:  # type: ignore[override]
        process = super().Process(ctx, *args, **kwds)
        self.created.append((time.monotonic(), process))
        return process


def _returncode(process: Any) -> int | None:
    """A child's exit code once ``Pool`` has collected it, else None.

    Never ``Process.exitcode`` from our thread: it polls, and ``Pool``'s worker handler polls
    the same object from its own thread. Under forkserver the status is one message on a
    pipe: whichever thread reads second finds the pipe at its end and records 255, losing the
    signal. ``Pool`` collects every ended child within moments; we read what it recorded.
    """
    popen = getattr(process, "_popen", None)
    code = getattr(popen, "returncode", None)
    return code if isinstance(code, int) else None


def _ended(process: Any) -> bool:
    """Whether a child has ended (collected by ``Pool``, or no longer running)."""
    if _returncode(process) is not None:
        return True
    return process.pid is None or not procinfo.is_alive(process.pid)


def _release(lock: Any) -> None:
    """Release a multiprocessing lock held by a dead process; when it is free already, take
    and give it back once, to wake a thread still asleep on it.

    A waiter SIGKILLed while asleep on the semaphore can swallow the one wake-up a release
    sends (glibc wakes a single sleeper, and the dead one never takes its turn): the lock is
    free, yet ``Pool.terminate`` slept on for good (the soak, after both idle children were
    killed just before a stop). Giving it back again wakes the next sleeper.
    """
    if lock is None:
        return
    try:
        lock.release()
    except (ValueError, AssertionError):  # not held: "released too many times"
        if lock.acquire(False):
            lock.release()


def _unwedge(lock: Any) -> None:
    """Free ``lock`` if it stays held while no process may hold it (its holder died)."""
    if lock is None:
        return
    if lock.acquire(timeout=0.05):
        lock.release()
    else:
        _release(lock)


def _kill_tree(pid: int) -> None:
    """SIGKILL a child and its process group (it leads one: what its handler started)."""
    procinfo.kill_process_group(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
