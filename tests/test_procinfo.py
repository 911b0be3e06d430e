"""procinfo against real processes: start times, liveness, zombies and the group-kill guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from graphiti_mpq import procinfo

from .helpers import assert_dies_with_its_spawner

pytestmark = pytest.mark.timeout(30)

ROOT = str(Path(__file__).resolve().parents[1])


def _wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def _state(pid: int) -> str | None:
    fields = procinfo._stat_fields(pid)
    return None if fields is None else fields[0].decode()


def test_start_time_of_self() -> None:
    start = procinfo.process_start_time(os.getpid())
    assert isinstance(start, int) and start > 0
    assert procinfo.process_start_time(os.getpid()) == start
    assert procinfo.is_alive(os.getpid())
    assert procinfo.is_alive(os.getpid(), start)
    assert not procinfo.is_alive(os.getpid(), start + 1)


def test_child_starts_after_us() -> None:
    proc = subprocess.Popen(["sleep", "5"])
    try:
        child = procinfo.process_start_time(proc.pid)
        mine = procinfo.process_start_time(os.getpid())
        assert child is not None and mine is not None and child >= mine
        assert procinfo.is_alive(proc.pid, child)
    finally:
        proc.kill()
        proc.wait()


def test_reaped_child_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not procinfo.is_alive(proc.pid)
    assert procinfo.process_start_time(proc.pid) is None


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    try:
        assert _wait_until(lambda: _state(proc.pid) == "Z")
        os.kill(proc.pid, 0)  # the pid still exists...
        assert not procinfo.is_alive(proc.pid)  # ...but runs nothing
    finally:
        proc.wait()


@pytest.mark.parametrize("pid", [0, -1, -os.getpid()])
def test_nonpositive_pids_are_never_alive(pid: int) -> None:
    assert not procinfo.is_alive(pid)
    assert procinfo.process_start_time(pid) is None


def test_pid_of_another_user_counts_as_alive() -> None:
    if os.geteuid() == 0:
        pytest.skip("root may signal every process")
    assert procinfo.is_alive(1)


def test_kill_process_group_refuses_own_group_and_init() -> None:
    # Signal 0 only checks: if the guard were missing this would return True, not kill us.
    assert not procinfo.kill_process_group(os.getpgrp(), 0)
    assert not procinfo.kill_process_group(1, 0)
    assert not procinfo.kill_process_group(0, 0)
    assert not procinfo.kill_process_group(-5, 0)


def test_kill_process_group_kills_the_whole_group() -> None:
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $! ; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    proc.stdout.close()
    assert procinfo.is_alive(grandchild)
    assert procinfo.kill_process_group(proc.pid)
    assert proc.wait() == -signal.SIGKILL
    assert _wait_until(lambda: not procinfo.is_alive(grandchild))


def test_kill_process_group_of_a_gone_group() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    assert not procinfo.kill_process_group(proc.pid)


def test_parent_death_signal() -> None:
    # Armed in a child; the child reports whether prctl succeeded.
    script = (
        "import signal, sys; from graphiti_mpq import procinfo; "
        "sys.exit(0 if procinfo.set_parent_death_signal(signal.SIGKILL) else 1)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 0


def test_parent_death_preexec_kills_child_when_parent_dies() -> None:
    assert_dies_with_its_spawner(
        "subprocess.Popen(['sleep', '30'], preexec_fn=procinfo.parent_death_preexec())"
    )


def _wrapper_or_skip() -> list[str]:
    wrapper = procinfo.parent_death_wrapper()
    if wrapper is None:
        pytest.skip("setpriv (util-linux) or sh is missing: replays use the preexec_fn instead")
    return wrapper


def test_parent_death_wrapper_kills_command_when_parent_dies() -> None:
    _wrapper_or_skip()
    assert_dies_with_its_spawner(
        "subprocess.Popen([*procinfo.parent_death_wrapper(), 'sleep', '30'])"
    )


def test_parent_death_wrapper_never_runs_a_command_whose_spawner_is_gone(tmp_path: Path) -> None:
    """The race the signal cannot cover: the spawner died before setpriv armed it, and the
    command was reparented. Built by another (now gone) process, the wrapper names that one."""
    mine = _wrapper_or_skip()
    script = (
        "import json; from graphiti_mpq import procinfo; "
        "print(json.dumps(procinfo.parent_death_wrapper()))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    theirs = json.loads(out.stdout)
    assert theirs[:-1] == mine[:-1] and theirs[-1] != mine[-1]
    orphan, adopted = tmp_path / "orphan", tmp_path / "adopted"
    ran = subprocess.run([*theirs, "touch", str(orphan)])
    assert ran.returncode == -signal.SIGKILL and not orphan.exists()
    ran = subprocess.run([*mine, "touch", str(adopted)])
    assert ran.returncode == 0 and adopted.exists()


def test_signal_name_and_describe_exit() -> None:
    assert procinfo.signal_name(9) == "SIGKILL"
    assert procinfo.signal_name(signal.SIGTERM) == "SIGTERM"
    assert procinfo.signal_name(999) == "signal 999"
    assert procinfo.describe_exit(-9) == (None, "SIGKILL")
    assert procinfo.describe_exit(0) == (0, None)
    assert procinfo.describe_exit(3) == (3, None)
