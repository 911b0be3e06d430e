"""The barrier's file lock: held by one process, never by its children, never after its death.

A holder process takes the lock and then forks and spawns children that exit, crash or keep
running. None of that releases the barrier (another process still cannot take it), and none
of it keeps the barrier either (once the holder releases, it is free while a forked child still
runs). A SIGKILLed holder leaves the lock free: a barrier never outlives a crashed holder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphiti_mpq.barrier import Barrier

from .helpers import wait_until
from .serving import REPO, wait_gone

pytestmark = pytest.mark.timeout(60)

HOLDER = """
    import multiprocessing, os, signal, sys, time
    from graphiti_mpq.barrier import Barrier

    def spawned(how):
        if how == "crash":
            os.kill(os.getpid(), signal.SIGKILL)

    def fork(barrier, how):
        pid = os.fork()
        if pid == 0:
            if how == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif how == "release":  # try to let go of the parent's hold
                try:
                    barrier.release()
                    barrier.close()
                except Exception:
                    pass
            elif how == "sleep":
                time.sleep(1000)
            os._exit(0)
        if how == "sleep":
            return str(pid)
        os.waitpid(pid, 0)
        return "ok"

    def main():
        barrier = Barrier(sys.argv[1])
        for line in sys.stdin:
            cmd = line.split()
            reply = "ok"
            if cmd[0] == "exclusive":
                wait = float(cmd[1]) if len(cmd) > 1 else 10.0
                reply = "ok" if barrier.acquire_exclusive(timeout=wait) else "busy"
            elif cmd[0] == "shared":
                reply = "ok" if barrier.try_shared() else "busy"
            elif cmd[0] == "release":
                barrier.release()
            elif cmd[0] == "fork":  # exit, crash, segv, release or sleep
                reply = fork(barrier, cmd[1])
            elif cmd[0] == "spawn":  # exit or crash, under every start method
                for method in ("fork", "forkserver", "spawn"):
                    ctx = multiprocessing.get_context(method)
                    p = ctx.Process(target=spawned, args=(cmd[1],))
                    p.start()
                    p.join()
            print(reply, flush=True)

    if __name__ == "__main__":
        main()
"""


class Holder:
    """A process that holds the barrier of ``location`` on command."""

    def __init__(self, tmp_path: Path, location: str) -> None:
        script = tmp_path / "holder.py"
        script.write_text(textwrap.dedent(HOLDER))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), location],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def do(self, *command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(command) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holder(tmp_path: Path, queue_path: str) -> Iterator[Holder]:
    h = Holder(tmp_path, queue_path)
    yield h
    h.close()


@pytest.fixture
def barrier(queue_path: str) -> Iterator[Barrier]:
    b = Barrier(queue_path)
    yield b
    b.close()


def _free_for_shared(barrier: Barrier) -> bool:
    if barrier.try_shared():
        barrier.release()
        return True
    return False


def _free_for_exclusive(barrier: Barrier) -> bool:
    if barrier.acquire_exclusive(timeout=0.05):
        barrier.release()
        return True
    return False


def test_children_of_an_exclusive_holder_neither_release_nor_keep_it(
    holder: Holder, barrier: Barrier
) -> None:
    assert holder.do("exclusive") == "ok"
    assert not _free_for_shared(barrier)
    for how in ("exit", "crash", "segv", "release"):
        assert holder.do("fork", how) == "ok"
        assert not _free_for_shared(barrier), f"a forked child that did {how} released it"
    for how in ("exit", "crash"):
        assert holder.do("spawn", how) == "ok"
        assert not _free_for_shared(barrier), f"a started child that did {how} released it"
    sleeper = int(holder.do("fork", "sleep"))
    assert not _free_for_shared(barrier)
    # The holder lets go while its forked child still runs: the child keeps nothing.
    assert holder.do("release") == "ok"
    assert _free_for_shared(barrier)
    assert _free_for_exclusive(barrier)
    os.kill(sleeper, signal.SIGKILL)
    wait_gone([sleeper])


def test_children_of_a_shared_holder_neither_release_nor_keep_it(
    holder: Holder, barrier: Barrier
) -> None:
    assert holder.do("shared") == "ok"
    assert _free_for_shared(barrier)  # shared holds coexist
    assert not _free_for_exclusive(barrier)
    for how in ("exit", "crash", "release"):
        assert holder.do("fork", how) == "ok"
        assert not _free_for_exclusive(barrier), f"a forked child that did {how} released it"
    sleeper = int(holder.do("fork", "sleep"))
    assert holder.do("release") == "ok"
    assert _free_for_exclusive(barrier)
    os.kill(sleeper, signal.SIGKILL)
    wait_gone([sleeper])


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_a_killed_holder_leaves_the_barrier_free(
    holder: Holder, barrier: Barrier, mode: str
) -> None:
    assert holder.do(mode) == "ok"
    assert not _free_for_exclusive(barrier)
    holder.proc.kill()
    holder.proc.wait(10)
    wait_until(lambda: _free_for_exclusive(barrier), 10.0, 0.05, "the barrier to be free")


def test_exclusive_waits_for_shared_holds_and_blocks_new_ones(
    holder: Holder, barrier: Barrier
) -> None:
    assert barrier.try_shared()
    assert holder.do("exclusive", "0.2") == "busy"
    barrier.release()
    assert holder.do("exclusive") == "ok"
    assert not _free_for_shared(barrier)
    assert holder.do("release") == "ok"
    assert _free_for_shared(barrier)
