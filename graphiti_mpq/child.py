"""What runs inside a pool child: set-up once per child, then one job per task.

A child tells the serving process which job it starts (and the process group of a replayed
command) through a small event queue, so the parent can notice a child that dies mid-job
(``multiprocessing.Pool`` never reports that) and kill the right process group. A child never
touches the database or the barrier.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import handlers, procinfo
from .models import AttemptResult, Outcome

_events: Any = None
_init_error: str | None = None


@dataclass(frozen=True)
class Task:
    """One attempt handed to a child (picklable)."""

    job_id: str
    job_type: str
    payload: dict[str, Any]
    attempt: int
    timeout: float | None
    program: str


def _die_with_parent(signum: int, frame: FrameType | None) -> None:
    """Parent death (or pool shutdown): take the running command's process group along."""
    for pgid in handlers.active_process_groups():
        procinfo.kill_process_group(pgid)
    os._exit(128 + signum)


def init_child(events: Any, imports: tuple[str, ...]) -> None:
    """Pool initializer: die with the parent, leave Ctrl-C to it, load handler modules."""
    global _events, _init_error
    _events = events
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _die_with_parent)
    procinfo.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        os._exit(1)
    try:
        handlers.import_handler_modules(imports)
    except Exception as exc:  # every task of this child fails with it, instead of a respawn loop
        _init_error = str(exc)


def _report(kind: str, job_id: str, pgid: int | None = None) -> None:
    if _events is not None:
        _events.put((kind, job_id, os.getpid(), pgid))


def run_task(task: Task) -> tuple[str, AttemptResult]:
    """Run one attempt; every failure comes back as an AttemptResult, never as an exception."""
    _report("start", task.job_id)
    if _init_error is not None:
        return task.job_id, AttemptResult(
            Outcome.FAILED, error=_init_error, finished_at=time.time()
        )
    try:
        result = handlers.run_job(
            task.job_type,
            task.payload,
            program=task.program,
            job_id=task.job_id,
            attempt=task.attempt,
            timeout=task.timeout,
            on_spawn=lambda pgid: _report("spawn", task.job_id, pgid),
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
    return task.job_id, result
