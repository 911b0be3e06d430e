"""The handler registry and the handlers that run one attempt of a job.

A job type runs its registered Python handler if there is one, else the replay handler, which
re-runs a recorded CLI invocation (``payload["command"]``) through the configured program.

Kept light at import time (no sqlite_utils, structlog, filelock, multiprocessing; subprocess is
imported on first replay): ``@handler`` and the registry are used from the enqueue fast path.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from . import procinfo, spawn
from .errors import HandlerError
from .models import AttemptResult, Outcome

#: A Python handler: called with the job's payload; its return value is the job's result.
Handler = Callable[[dict[str, Any]], Any]
H = TypeVar("H", bound=Handler)

#: How much of a command's output (or a traceback) is kept with the attempt, in characters.
TAIL_CHARS = 4000
#: Bytes kept while reading: enough for TAIL_CHARS of 4-byte UTF-8, bounded whatever the output.
_TAIL_BYTES = 4 * TAIL_CHARS
#: After a command ended, how long we keep reading output that is still in flight. Bounds the
#: wait for a grandchild that escaped the process group and still holds the pipe open.
_DRAIN_SECONDS = 0.5
#: Without pidfds, how often we check whether the command exited.
_POLL_SECONDS = 0.05
_READ_SIZE = 65536
#: The longest error line we copy from a command's output.
_ERROR_LINE_CHARS = 500

_registry: dict[str, Handler] = {}
_active_groups: dict[int, int] = {}  # thread ident -> process group of its running replay
_active_lock = threading.Lock()
#: Held from the spawn of a command until its group is registered, so whoever kills the
#: registered groups (the pool child's supervisor watch) never misses one being born.
spawn_lock = threading.Lock()


# --- registry -------------------------------------------------------------------------------


def handler(job_type: str) -> Callable[[H], H]:
    """Decorator registering ``fn(payload) -> result`` for ``job_type`` (replacing any other)."""
    if not isinstance(job_type, str) or not job_type.strip():
        raise HandlerError(f"a handler's job type must be a non-empty string, got {job_type!r}")

    def register(fn: H) -> H:
        if not callable(fn):
            raise HandlerError(f"the handler for {job_type!r} is not callable: {fn!r}")
        _registry[job_type] = fn
        return fn

    return register


def get_handler(job_type: str) -> Handler | None:
    """The Python handler registered for ``job_type``, or None (the job is replayed)."""
    return _registry.get(job_type)


def registered_types() -> list[str]:
    """The job types with a registered Python handler, sorted."""
    return sorted(_registry)


def unregister(job_type: str) -> bool:
    """Remove the handler of ``job_type``; True if there was one. For tests and reloads."""
    return _registry.pop(job_type, None) is not None


def import_handler_modules(names: Iterable[str]) -> None:
    """Import the modules that register handlers (``--import`` / ``GRAPHITI_QUEUE_IMPORTS``).

    Every process that runs jobs must import them itself (a forkserver child does not inherit
    the parent's registry), so failures name the module instead of surfacing later as
    "no handler registered".
    """
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise HandlerError(f"cannot import handler module {name!r}: {exc}") from exc
        except Exception as exc:
            raise HandlerError(
                f"handler module {name!r} failed to import: {type(exc).__name__}: {exc}"
            ) from exc


# --- the replay handler ---------------------------------------------------------------------


def _flag_value(value: Any) -> str:
    # str() of a float is its shortest repr (0.1 -> "0.1"); ints and strings are themselves.
    return value if isinstance(value, str) else str(value)


def _flags(kwargs: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + str(key).replace("_", "-")
        items = value if isinstance(value, list) else [value]
        for item in items:
            # ``is`` on purpose: 0 and 0.0 are values, only False and None mean "not set".
            if item is None or item is False:
                continue
            if item is True:
                out.append(flag)
            else:
                out.extend((flag, _flag_value(item)))
    return out


def build_argv(program: str, payload: Mapping[str, Any]) -> list[str]:
    """``[program, *command, *flags, "--", *args]`` for a replay payload (no ``--`` without args).

    The ``--`` keeps arguments that start with ``-`` from being read as options.
    """
    command = payload.get("command")
    if isinstance(command, str):
        parts = [command]
    elif isinstance(command, list) and command and all(isinstance(p, str) for p in command):
        parts = list(command)
    else:
        raise HandlerError(
            f"payload.command must be a string or a non-empty list of strings, got {command!r}"
        )
    args = payload.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise HandlerError(f"payload.args must be a list of strings, got {args!r}")
    kwargs = payload.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise HandlerError(f"payload.kwargs must be an object, got {kwargs!r}")
    argv = [program, *parts, *_flags(kwargs)]
    if args:
        argv += ["--", *args]
    return argv


def current_process_group() -> int | None:
    """The process group of the replay running now (the latest one, if threads run several).

    For a signal handler of the process running jobs: it kills this group when it must die.
    """
    with _active_lock:
        groups = list(_active_groups.values())
    return groups[-1] if groups else None


def active_process_groups() -> list[int]:
    """The process groups of every replay this process runs now (one per running thread)."""
    with _active_lock:
        return list(_active_groups.values())


class _Tail:
    """The last bytes of a stream, in bounded memory."""

    def __init__(self, limit: int = _TAIL_BYTES) -> None:
        self.limit = limit
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line:
            return line[-_ERROR_LINE_CHARS:]
    return ""


def _failed(error: str, **fields: Any) -> AttemptResult:
    return AttemptResult(outcome=Outcome.FAILED, error=error, finished_at=time.time(), **fields)


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


def _spawn_error(exc: OSError | ValueError, program: str, cwd: str | None) -> AttemptResult:
    if cwd is not None and getattr(exc, "filename", None) == cwd:
        # The directory vanished between our check and the spawn.
        return _failed(f"working directory does not exist: {cwd}")
    if isinstance(exc, FileNotFoundError):
        return _failed(f"program not found: {program}")
    if isinstance(exc, PermissionError):
        return _failed(f"program is not executable: {program}")
    return _failed(f"cannot start {program}: {getattr(exc, 'strerror', None) or exc}")


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has ended, without reaping it.

    Left unreaped, its pid keeps naming its process group, so the group kill that follows can
    never hit an unrelated process that reused the number.
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _pump(proc: spawn.Command, tail: _Tail, deadline: float | None) -> tuple[bool, bool]:
    """Read the command's output until it exits or the deadline passes.

    Returns (exited, pipe_open). Exit is noticed through a pidfd where the kernel has them, so a
    grandchild that keeps the pipe open cannot keep us waiting for an end of file.
    """
    import selectors

    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    pipe_open = True
    exited = False
    with selectors.DefaultSelector() as selector:
        selector.register(out_fd, selectors.EVENT_READ)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ)
        try:
            while not exited:
                wait: float | None = None
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                if pidfd is None:
                    wait = _POLL_SECONDS if wait is None else min(wait, _POLL_SECONDS)
                for key, _ in selector.select(wait):
                    if key.fd == out_fd:
                        chunk = os.read(out_fd, _READ_SIZE)
                        if chunk:
                            tail.feed(chunk)
                        else:
                            selector.unregister(out_fd)
                            pipe_open = False
                    else:
                        exited = True
                if pidfd is None or not pipe_open:
                    exited = exited or _has_exited(proc.pid)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return exited, pipe_open


def _drain(proc: spawn.Command, tail: _Tail) -> None:
    """Read what is left in the pipe, for at most _DRAIN_SECONDS."""
    import selectors

    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()
    deadline = time.monotonic() + _DRAIN_SECONDS
    with selectors.DefaultSelector() as selector:
        selector.register(out_fd, selectors.EVENT_READ)
        while (wait := deadline - time.monotonic()) > 0:
            if not selector.select(wait):
                continue
            chunk = os.read(out_fd, _READ_SIZE)
            if not chunk:
                return
            tail.feed(chunk)


def _replay_result(returncode: int, tail_text: str) -> AttemptResult:
    exit_code, sig = procinfo.describe_exit(returncode)
    output = tail_text or None
    if returncode == 0:
        return AttemptResult(
            outcome=Outcome.SUCCEEDED, exit_code=0, output_tail=output, finished_at=time.time()
        )
    if sig is not None:
        return _failed(f"killed by {sig}", signal=sig, output_tail=output)
    line = _last_line(tail_text)
    error = f"exit status {exit_code}: {line}" if line else f"exit status {exit_code}"
    return _failed(error, exit_code=exit_code, output_tail=output)


def run_replay(
    payload: Mapping[str, Any],
    *,
    program: str,
    job_id: str,
    attempt: int,
    timeout: float | None,
    on_spawn: Callable[[int], None] | None = None,
) -> AttemptResult:
    """Run the recorded command once and report how it ended.

    The command runs without a shell, in its own process group (which we kill as a whole on a
    timeout and after it exits, so no grandchild outlives the attempt), with a parent-death
    signal so it dies with the process running the job. ``on_spawn(pgid)`` lets the caller
    record the group for crash recovery. ``timeout`` None (or not positive) means no limit.
    """
    try:
        argv = build_argv(program, payload)
    except HandlerError as exc:
        return _failed(exc.message)
    cwd = payload.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str):
            return _failed(f"payload.cwd must be a path, got {cwd!r}")
        if not os.path.isdir(cwd):
            if os.path.exists(cwd):
                return _failed(f"working directory is not a directory: {cwd}")
            return _failed(f"working directory does not exist: {cwd}")
    # A relative program path means the serving process's directory, not the job's cwd.
    executable = os.path.abspath(program) if os.sep in program else None
    env = dict(os.environ)
    env["GRAPHITI_MPQ_JOB_ID"] = str(job_id)
    env["GRAPHITI_MPQ_ATTEMPT"] = str(attempt)
    deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
    spawning = spawn_lock.acquire(timeout=5.0)
    try:
        proc = spawn.start(argv, executable, cwd, env)
    except BaseException as exc:
        if spawning:
            spawn_lock.release()
        if isinstance(exc, OSError | ValueError):  # ValueError: a NUL byte in an argument
            return _spawn_error(exc, program, cwd)
        raise
    pgid = proc.pid  # a new session: the command leads its own group
    me = threading.get_ident()
    with _active_lock:
        _active_groups[me] = pgid
    if spawning:
        spawn_lock.release()
    tail = _Tail()
    timed_out = False
    try:
        if on_spawn is not None:
            on_spawn(pgid)
        exited, _ = _pump(proc, tail, deadline)
        timed_out = not exited and not _has_exited(pgid)
        # Timeout or not, nothing of this attempt may survive it: kill the whole group.
        procinfo.kill_process_group(pgid, signal.SIGKILL)
        returncode = proc.wait()
        _drain(proc, tail)
    finally:
        if proc.returncode is None:  # interrupted (an exception in on_spawn, a signal handler)
            procinfo.kill_process_group(pgid, signal.SIGKILL)
            proc.wait()
        with _active_lock:
            _active_groups.pop(me, None)
        if proc.stdout is not None:
            proc.stdout.close()
    if timed_out:
        assert timeout is not None
        return AttemptResult(
            outcome=Outcome.TIMEOUT,
            error=f"timed out after {_format_seconds(timeout)}s",
            output_tail=tail.text() or None,
            finished_at=time.time(),
        )
    return _replay_result(returncode, tail.text())


# --- Python handlers and dispatch -----------------------------------------------------------


def run_python(fn: Handler, payload: dict[str, Any]) -> AttemptResult:
    """Call a Python handler; raising fails the attempt, the JSON return value is the result."""
    try:
        result = fn(payload)
    except Exception as exc:
        message = str(exc)
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        tail = traceback.format_exc()[-TAIL_CHARS:]
        return _failed(error[:TAIL_CHARS], output_tail=tail)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return _failed(f"result is not JSON-serialisable: {exc}")
    return AttemptResult(outcome=Outcome.SUCCEEDED, result=result, finished_at=time.time())


def run_job(
    job_type: str,
    payload: dict[str, Any],
    *,
    program: str,
    job_id: str,
    attempt: int,
    timeout: float | None,
    on_spawn: Callable[[int], None] | None = None,
) -> AttemptResult:
    """Run one attempt: the registered Python handler of ``job_type``, else the replay handler.

    ``timeout`` applies to replays here; a Python handler's limit is enforced by whoever runs
    this (the supervisor kills the pool child).
    """
    fn = get_handler(job_type)
    if fn is not None:
        return run_python(fn, payload)
    if isinstance(payload, dict) and "command" in payload:
        return run_replay(
            payload,
            program=program,
            job_id=job_id,
            attempt=attempt,
            timeout=timeout,
            on_spawn=on_spawn,
        )
    return _failed(
        f"no handler registered for job type {job_type!r} and the payload has no 'command'"
    )
