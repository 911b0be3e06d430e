"""Crash safety: a supervisor SIGKILLed mid-job leaves no job code behind and loses no job.

The jobs of a dead supervisor are recovered at once by the next serving process on this host
(the owner is provably dead), the interrupted attempt counts as ``lost``, and a job that kills
its supervisor every time ends in the dead-letter table instead of looping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from graphiti_mpq import procinfo
from graphiti_mpq.config import Settings
from graphiti_mpq.supervisor import Supervisor

from .helpers import run_child, wait_until
from .serving import (
    FIXTURE,
    Serving,
    attempts_of,
    open_db,
    read_pids,
    replay_program,
    start,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("restart_with", ["supervise", "drain"])
def test_sigkill_mid_job_leaves_nothing_running_and_loses_nothing(
    tmp_path: Path, queue_path: str, servers: list[Serving], restart_with: str
) -> None:
    q = open_db(queue_path)
    program = replay_program(tmp_path)
    replay_pids = tmp_path / "replay.pids"
    python_pids = tmp_path / "python.pids"
    replay = q.enqueue(
        "replay", {"command": "hang_once", "args": [str(replay_pids)]}, parallel=True
    )
    python = q.enqueue(
        "hang_with_grandchild",
        {"pidfile": str(python_pids), "marker": str(tmp_path / "python.marker")},
        parallel=True,
    )
    options = ["--workers", "2", "--import", FIXTURE, "--program", program, "--lease", "60"]
    options += ["--backoff-base", "0.1"]
    first = start(servers, tmp_path, queue_path, "supervise", *options)
    command, command_grandchild = read_pids(replay_pids)
    child, child_grandchild = read_pids(python_pids)
    tree = first.descendants()
    assert {command, command_grandchild, child} <= set(tree)

    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    wait_gone(
        [*tree, command, command_grandchild, child, child_grandchild],
        what="the pool, the command and every grandchild",
    )
    # Still marked running: nobody has recovered them yet.
    assert q.get_job(replay).state == "running"
    assert q.get_job(python).state == "running"

    # The owner is provably dead on this host: recovery is immediate, well within the lease.
    if restart_with == "supervise":
        start(servers, tmp_path, queue_path, "supervise", *options)
    else:
        drain = start(
            servers,
            tmp_path,
            queue_path,
            "drain",
            *options,
            "--wait-retries",
            "--json",
            ready=False,
        )
        assert drain.wait() == 0, drain.log()
        summary = json.loads(drain.stdout())
        # The lost attempts are recorded (as failures) by this run, then the retries succeed.
        assert (summary["succeeded"], summary["failed"], summary["dead"]) == (2, 2, 0), summary
    for job in (replay, python):
        wait_state(q, job, "succeeded", timeout=15.0)
        assert attempts_of(q, job) == [(1, "lost"), (2, "succeeded")]
        lost = q.get_attempts(job)[0]
        assert lost.error is not None and "its process died" in lost.error
    assert (tmp_path / "replay.pids.attempts").read_text().split() == ["1", "2"]
    q.close()


def test_a_job_that_kills_its_supervisor_every_time_ends_dead(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    log = tmp_path / "killer.log"
    job = q.enqueue("kill_supervisor", {"log": str(log)}, max_retries=2)
    options = ["--workers", "2", "--import", FIXTURE, "--backoff-base", "0.1"]
    for round_ in range(1, 4):
        sup = start(servers, tmp_path, queue_path, "supervise", *options)
        assert sup.wait() == -signal.SIGKILL, sup.log()
        lines = log.read_text().splitlines()
        assert len(lines) == round_
        wait_gone([json.loads(line)["pid"] for line in lines], what="the killer's child")
    # The third death used the last attempt: the next serving process recovers it as dead.
    drain = start(servers, tmp_path, queue_path, "drain", *options, "--json", ready=False)
    assert drain.wait() == 1, drain.log()
    assert json.loads(drain.stdout())["dead"] == 1
    wait_state(q, job, "dead")
    assert attempts_of(q, job) == [(1, "lost"), (2, "lost"), (3, "lost")]
    (entry,) = q.get_dead_letter_jobs()
    assert entry.id == job
    assert len(entry.errors) == 3 and all("lost" in e for e in entry.errors)
    assert len(log.read_text().splitlines()) == 3
    # Nothing ran it again.
    wait_until(lambda: drain.proc.poll() is not None)
    q.close()


def test_jobs_a_killed_supervisor_claimed_but_never_started_use_no_attempt(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """A chunk claimed as running but not reached by any child when its supervisor is
    SIGKILLed goes back without using an attempt: even with no retries left, nothing of it
    ends dead. The job that was running counts its attempt, as before."""
    q = open_db(queue_path)
    log = tmp_path / "tally.log"

    def tally(name: str) -> dict[str, object]:
        payload = {"log": str(log), "name": name}
        return {"job_type": "tally", "payload": payload, "parallel": True, "max_retries": 0}

    options = ["--workers", "1", "--import", FIXTURE, "--backoff-base", "0.1"]
    first = start(servers, tmp_path, queue_path, "supervise", *options)
    for job_id in q.enqueue_many([tally(f"warm{i}") for i in range(5)]):  # known to be short
        wait_state(q, job_id, "succeeded")
    release = tmp_path / "release"
    gate_payload = {
        "started": str(tmp_path / "gate.pid"),
        "release": str(release),
        "log": str(tmp_path / "gate.log"),
        "name": "gate",
    }
    names = [f"queued{i}" for i in range(10)]
    gate, *queued = q.enqueue_many(
        [{"job_type": "gate", "payload": gate_payload, "parallel": True}]
        + [tally(name) for name in names]
    )
    (child,) = read_pids(tmp_path / "gate.pid")
    assert all(q.get_job(job_id).state == "running" for job_id in queued)  # claimed with it
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    wait_gone([child], what="the killed supervisor's child")
    assert not log.read_text().split()[5:]  # none of the queued jobs ran

    release.touch()
    drain = start(
        servers, tmp_path, queue_path, "drain", *options, "--wait-retries", "--json", ready=False
    )
    assert drain.wait() == 0, drain.log()
    assert attempts_of(q, gate) == [(1, "lost"), (2, "succeeded")]
    for job_id in queued:
        history = q.get_attempts(job_id)
        assert [a.outcome for a in history] == ["handed_back", "succeeded"], history
        assert "not started" in (history[0].error or "")
        assert q.get_job(job_id).attempts == 1
    assert sorted(log.read_text().split()[5:]) == sorted(names)  # each ran once
    assert os.listdir(queue_path + ".started") == []  # no marks are left behind
    q.close()


def test_recovery_kills_only_processes_that_provably_run_the_attempt(queue_path: str) -> None:
    """A recorded process group may have been reused (or the machine rebooted) since; a command
    spawned just before its pool child died was never recorded. The job's own processes are
    found by their environment either way, and nothing else is touched."""
    host = "this-host"
    sup = Supervisor(open_db(queue_path), Settings(location=queue_path, host_id=host))
    procs = {
        name: subprocess.Popen(
            ["sleep", "1000"],
            start_new_session=True,
            env={**os.environ, "GRAPHITI_MPQ_JOB_ID": job_id},
        )
        for name, job_id in (("mine", "j1"), ("unrecorded", "j2"), ("unrelated", "other"))
    }
    try:
        now = time.time()
        row = {"id": "j1", "owner_host": host, "started_at": now, "worker_pid": None}
        # An attempt on another host: nothing to kill here.
        sup._kill_recorded({**row, "owner_host": "elsewhere", "pgid": procs["mine"].pid})
        assert all(p.poll() is None for p in procs.values())
        # The recorded group now runs another job (the number was reused): left alone, while
        # the attempt's own command goes.
        sup._kill_recorded({**row, "pgid": procs["unrelated"].pid})
        assert procs["mine"].wait(10) == -signal.SIGKILL
        assert procs["unrecorded"].poll() is None and procs["unrelated"].poll() is None
        # No group recorded at all: found by its environment.
        sup._kill_recorded({**row, "id": "j2", "pgid": None})
        assert procs["unrecorded"].wait(10) == -signal.SIGKILL
        assert procs["unrelated"].poll() is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
        sup.queue.close()


def test_a_job_of_another_host_is_recovered_when_its_lease_expires(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """Another host's pid proves nothing here: only the lease says its owner is gone."""
    q = open_db(queue_path)
    pidfile = tmp_path / "hang.pid"
    job = q.enqueue("hang", {"pidfile": str(pidfile), "marker": str(tmp_path / "marker")})
    options = ["--workers", "2", "--import", FIXTURE, "--backoff-base", "0.1", "--lease", "2"]
    first = start(servers, tmp_path, queue_path, "supervise", *options, "--host-id", "host-a")
    (child,) = read_pids(pidfile)
    first.signal(signal.SIGKILL)
    first.wait()
    wait_gone([child])
    killed_at = time.time()
    start(servers, tmp_path, queue_path, "supervise", *options, "--host-id", "host-b")
    wait_state(q, job, "succeeded")
    lost, done = q.get_attempts(job)
    assert (lost.outcome, done.outcome) == ("lost", "succeeded")
    assert lost.error is not None and "lease expired" in lost.error
    assert lost.finished_at is not None and lost.finished_at - killed_at < 20.0
    # Not before the lease (2 s, renewed by heartbeats) ran out.
    assert lost.started_at is not None and lost.finished_at >= lost.started_at + 2.0
    q.close()


def test_a_child_writes_nothing_to_the_log_once_its_supervisor_is_gone(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """A killed supervisor's log ends with what it wrote: its orphaned children, until they
    die, add nothing (no traceback of a result they can no longer send)."""
    q = open_db(queue_path)
    pidfile = tmp_path / "chatter.pid"
    q.enqueue("chatter", {"pidfile": str(pidfile)}, parallel=True)
    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "1", "--import", FIXTURE)
    child, _ = read_pids(pidfile)
    try:
        wait_until(lambda: "chatter: supervisor alive" in sup.log(), 10.0, what="the chatter")
        sup.signal(signal.SIGKILL)
        assert sup.wait() == -signal.SIGKILL
        wait_gone([child], what="the orphaned child")
    finally:
        if procinfo.is_alive(child):  # (it leads its own group: the fixture's kill misses it)
            os.kill(child, signal.SIGKILL)
    text = sup.log_path.read_text(errors="replace")
    assert "chatter: supervisor alive" in text
    assert "chatter: supervisor gone" not in text
    q.close()


#: A process whose main thread has exited while another thread still runs: what /proc shows of
#: a SIGKILLed supervisor for a few milliseconds, before its pidfd turns readable.
_HALF_EXITED = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(60,)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_supervisor_whose_main_thread_has_exited_is_gone_for_a_childs_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io
    import select
    import sys

    from graphiti_mpq import child

    proc = subprocess.Popen([sys.executable, "-c", _HALF_EXITED], stdout=subprocess.PIPE)
    pidfd = os.pidfd_open(proc.pid)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        start_time = procinfo.process_start_time(proc.pid)
        out = io.StringIO()
        monkeypatch.setattr(child, "_supervisor", (proc.pid, start_time, pidfd))
        wait_until(
            lambda: (procinfo._stat_fields(proc.pid) or [b""])[0] == b"Z",
            what="the main thread to exit",
        )
        assert not select.select([pidfd], [], [], 0)[0]  # its other thread still runs
        guard = child._SilentOnceOrphaned(out)
        guard.write("after its main thread exited\n")
        assert "after its main thread exited" not in out.getvalue()
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_child_that_runs_out_of_descriptors_still_writes_to_its_stderr() -> None:
    """Only evidence that the supervisor ended silences a child: its /proc entry unreadable
    for want of a descriptor is not that."""
    out = run_child(
        """
        import io, os, resource, subprocess, sys
        from graphiti_mpq import child, procinfo

        parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            pidfd = os.pidfd_open(parent.pid)
            child._supervisor = (parent.pid, procinfo.process_start_time(parent.pid), pidfd)
            sink = io.StringIO()
            guard = child._SilentOnceOrphaned(sink)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
            held = []
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            guard.write("while out of descriptors\\n")
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            guard.write("after\\n")
            print(sink.getvalue(), end="")
        finally:
            parent.kill()
            parent.wait()
        """
    )
    assert out == "while out of descriptors\nafter\n"
