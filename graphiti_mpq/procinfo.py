"""Small Linux process utilities for the supervisor and crash recovery.

Stdlib only and cheap to import (``ctypes`` is loaded on first use): the handler registry, which
the enqueue fast path may import, depends on this module.

Crash recovery must decide whether a recorded pid is still the process that claimed a job, so
:func:`is_alive` compares the kernel start time as well (pids are reused), and treats a zombie as
dead (it runs no code any more). Killing recorded process groups is guarded so that a corrupt or
stale record can never make us signal init or our own group.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

#: prctl(2) option that sets the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1

_prctl: Any = None
_prctl_loaded = False


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (state) on, or None if it is gone.

    ``comm`` (field 2) may hold spaces and parentheses, so we split after the last ``)``.
    Any other failure to read it (no descriptor left, say) is raised: it says nothing of the
    process.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    _, sep, rest = data.rpartition(b")")
    if not sep:
        return None
    fields = rest.split()
    return fields if len(fields) >= 20 else None


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of its stat), or None if gone.

    Together with the pid this identifies a process for good: a reused pid has a later start.
    """
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    if fields is None:
        return None
    try:
        return int(fields[22 - 3])
    except ValueError:
        return None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, was started at ``start_time``."""
    if pid <= 0:
        # 0 and negative pids address process groups in kill(2), never one process.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it just belongs to someone else
    try:
        fields = _stat_fields(pid)
    except OSError:
        # It exists (kill said so) and nothing shows it has ended: callers take "not alive"
        # as proof of death (recovery hands its jobs to others), so unknown counts as alive.
        return True
    if fields is None:
        return False  # it went away between the two checks
    if fields[0] == b"Z":
        return False
    if start_time is not None:
        try:
            return int(fields[22 - 3]) == start_time
        except ValueError:
            return False
    return True


def _load_prctl() -> Any:
    """libc's prctl, loaded once in the parent (never first in a freshly forked child)."""
    global _prctl, _prctl_loaded
    if not _prctl_loaded:
        _prctl_loaded = True
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                func = libc.prctl
            except (OSError, AttributeError):
                func = None
            if func is not None:
                func.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
                func.restype = ctypes.c_int
            _prctl = func
    return _prctl


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Returns True on success, False where unsupported (not Linux) or refused. Note the kernel's
    notion of "parent" is the thread that forked us: the signal also fires if that thread exits.
    """
    prctl = _load_prctl()
    if prctl is None:
        return False
    return bool(prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)


def parent_death_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess that makes the child die with ``sig`` when we die.

    Prepared in the parent (libc is loaded here, not in the forked child). It also closes the
    race where the parent died before the child could arm the signal: the child then kills
    itself instead of running orphaned.
    """
    _load_prctl()
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


#: Run by ``sh`` after setpriv armed the signal: if the parent that spawned us (``$1``) died
#: before that, the signal will never come, so die now rather than run orphaned.
_ORPHAN_GUARD = '[ "$PPID" = "$1" ] || kill -KILL $$; shift; exec "$@"'
_wrapper: list[str] | None = None
_wrapper_checked = False


def parent_death_wrapper() -> list[str] | None:
    """An exec wrapper that arms the parent-death signal in the command itself.

    util-linux ``setpriv --pdeathsig KILL`` sets it, then execs ``sh``, which checks that its
    parent is still this process (the guard a ``preexec_fn`` would run) and execs the command.
    subprocess can then spawn without a ``preexec_fn``, on its fast path (vfork) instead of a
    full fork of the interpreter. None where setpriv or sh is missing (checked once). Append
    the program and its arguments.
    """
    global _wrapper, _wrapper_checked
    if not _wrapper_checked:
        _wrapper_checked = True
        import shutil
        import subprocess

        setpriv, sh = shutil.which("setpriv"), shutil.which("sh")
        if setpriv is not None and sh is not None and sys.platform.startswith("linux"):
            argv = [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", _ORPHAN_GUARD, "sh"]
            try:
                ok = (
                    subprocess.run(
                        [*argv, str(os.getpid()), setpriv, "--version"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=10,
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.SubprocessError):
                ok = False
            _wrapper = argv if ok else None
    if _wrapper is None:
        return None
    return [*_wrapper, str(os.getpid())]


def job_process_groups(job_id: str) -> set[int]:
    """Process groups with a live member that runs job ``job_id``.

    A replayed command gets ``GRAPHITI_MPQ_JOB_ID`` in its environment and so do the processes
    it starts; a group that reused the number of a dead one has no such member. Walks /proc:
    for crashes and recovery, not for every job.
    """
    wanted = f"GRAPHITI_MPQ_JOB_ID={job_id}".encode()
    groups: set[int] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return groups
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if len(fields) < 3 or fields[0] == b"Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    groups.add(int(fields[2]))
        except (OSError, ValueError):
            continue
    return groups


def kill_process_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to process group ``pgid``; True if it was delivered.

    Never signals groups 0 and 1 or our own group (a stale or corrupt record must not take down
    init or ourselves); a group that is gone or not ours is ignored.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_name(signum: int) -> str:
    """``"SIGKILL"`` for 9; ``"signal 99"`` for a number Python has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> tuple[int | None, str | None]:
    """Split a subprocess/Process exit code into (exit status, signal name); one is None."""
    if returncode < 0:
        return None, signal_name(-returncode)
    return returncode, None
