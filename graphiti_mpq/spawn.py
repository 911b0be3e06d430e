"""Starting a replayed command so that it dies with the process that started it.

SIGKILLed before anyone learnt the command's process group, a pool child would leave its
command running unsupervised; a parent-death signal armed in the command closes that gap.
Three ways, fastest first:

- ``_spawn`` (a small C module, built at install where a compiler is found) arms the signal
  between vfork and exec, at the cost of a plain spawn;
- else the exec wrappers ``setpriv --pdeathsig KILL -- sh -c <parent check>`` (two more
  execs per command);
- else a ``preexec_fn``, which makes subprocess fork the whole interpreter.

Each starts the command in a new session (its own process group), stdin from /dev/null,
stdout and stderr into one pipe, and raises OSError when it cannot start (``filename`` names the
working directory when that is what failed), ValueError for an argument it cannot pass (a NUL
byte, an ``=`` in an environment variable's name).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import IO, Protocol

from . import procinfo

_spawn: ModuleType | None
try:
    from . import _spawn
except ImportError:  # not built here: the exec wrappers do it
    _spawn = None

#: Off: always the exec wrappers (tests run both ways).
use_compiled = _spawn is not None


class Command(Protocol):
    """What the replay handler needs of a started command (``subprocess.Popen`` has it)."""

    pid: int
    returncode: int | None
    stdout: IO[bytes] | None

    def wait(self) -> int: ...


class _Started:
    """A command started by ``_spawn``: its pid, its output pipe, and its exit status."""

    def __init__(self, pid: int, stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def start(
    argv: list[str], executable: str | None, cwd: str | None, env: Mapping[str, str]
) -> Command:
    """Start ``argv``: the program ``executable``, else ``argv[0]`` found on ``env``'s PATH
    (unless it is a path)."""
    if use_compiled:
        return _start_compiled(argv, resolve_program(executable or argv[0], env), cwd, env)
    wrapper = procinfo.parent_death_wrapper()
    if wrapper is None:
        preexec = procinfo.parent_death_preexec(signal.SIGKILL)
        return _popen(argv, executable, cwd, env, preexec)
    # The wrapper cannot report a missing program to us: find it first.
    target = resolve_program(executable or argv[0], env)
    return _popen([*wrapper, target, *argv[1:]], None, cwd, env, None)


def resolve_program(program: str, env: Mapping[str, str]) -> str:
    """The path to exec for ``program``; FileNotFoundError or PermissionError if none."""
    import shutil

    if os.sep not in program:
        # The first executable one on the PATH, as execvp would take: a non-executable file of
        # the same name earlier on the PATH does not hide it.
        search = env.get("PATH", os.defpath)
        found = shutil.which(program, path=search)
        if found is not None:
            return found
        if shutil.which(program, mode=os.F_OK, path=search) is not None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if not os.path.exists(program):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return program


def _start_compiled(
    argv: list[str], target: str, cwd: str | None, env: Mapping[str, str]
) -> Command:
    assert _spawn is not None
    # Encoded (and refused: ValueError, UnicodeEncodeError) before any descriptor is opened.
    if any("=" in key for key in env):
        raise ValueError("illegal environment variable name")
    args = (
        os.fsencode(target),
        [os.fsencode(arg) for arg in argv],
        [os.fsencode(f"{key}={value}") for key, value in env.items()],
        None if cwd is None else os.fsencode(cwd),
    )
    read_end, write_end = os.pipe()  # both close-on-exec: the C side dup2s the write end
    try:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = _spawn.spawn(*args, devnull, write_end, os.getpid())
        finally:
            os.close(devnull)
    except BaseException as exc:
        os.close(read_end)
        if isinstance(exc, OSError) and isinstance(exc.filename, bytes):
            raise type(exc)(exc.errno, exc.strerror, os.fsdecode(exc.filename)) from None
        raise
    finally:
        os.close(write_end)
    return _Started(pid, os.fdopen(read_end, "rb", buffering=0))


def _popen(
    argv: list[str],
    executable: str | None,
    cwd: str | None,
    env: Mapping[str, str],
    preexec: Callable[[], None] | None,
) -> Command:
    import subprocess

    return subprocess.Popen(
        argv,
        executable=executable,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group, so the whole of it can be killed
        preexec_fn=preexec,
    )
