"""A supervisor survives whatever its children do: crashes, exits and hangs.

Real ``supervise`` processes, real signals. Each misbehaving attempt is recorded with a clear
reason within seconds, the pool is restored, and a later job still runs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from .helpers import wait_until
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


def test_crashing_children_are_recorded_and_the_pool_is_restored(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    crashers = {
        "sigkill": ("SIGKILL", None),
        "exit3": (None, 3),
        "segv": ("SIGSEGV", None),
    }
    ids = {t: q.enqueue(t, {}, parallel=True, max_retries=0) for t in crashers}
    sup = start(
        servers,
        tmp_path,
        queue_path,
        "supervise",
        "--workers",
        "2",
        "--import",
        FIXTURE,
        "--backoff-base",
        "0.1",
    )
    for job_type, (sig, code) in crashers.items():
        wait_state(q, ids[job_type], "dead")
        (attempt,) = q.get_attempts(ids[job_type])
        assert attempt.outcome == "crashed", attempt
        assert attempt.signal == sig
        assert attempt.exit_code == code
        assert attempt.error is not None
        assert (sig or f"status {code}") in attempt.error
        assert attempt.finished_at is not None and attempt.started_at is not None
        assert attempt.finished_at - attempt.started_at < 10.0
    # The supervisor still serves, with a full pool.
    later = q.enqueue("noop", {"value": 7}, parallel=True)
    wait_state(q, later, "succeeded")
    assert q.get_job(later).result == 7
    assert sup.proc.poll() is None
    wait_until(lambda: len(_pool_children(sup)) == 2, 20.0, what="a full pool of 2 children")
    q.close()


def test_a_crash_inside_a_chunk_keeps_the_outcomes_before_it_and_hands_back_the_rest(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """Short jobs go to a child many at a time: when one of them kills the child, the jobs it
    finished before stay recorded (none runs again), and those it had not started go back
    without using an attempt and run once."""
    q = open_db(queue_path)
    log = tmp_path / "tally.log"

    def job(name: str, **extra: object) -> dict[str, object]:
        payload = {"log": str(log), "name": name, **extra}
        return {"job_type": "tally", "payload": payload, "parallel": True, "max_retries": 0}

    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "1", "--import", FIXTURE)
    # Teach the supervisor that this job type is short, so the next batch goes as one chunk.
    warm = q.enqueue_many([job(f"warm{i}") for i in range(5)])
    for job_id in warm:
        wait_state(q, job_id, "succeeded")
    before = [f"before{i}" for i in range(5)]
    after = [f"after{i}" for i in range(5)]
    ids = q.enqueue_many(
        [job(n) for n in before] + [job("killer", die=True)] + [job(n) for n in after]
    )
    by_name = dict(zip([*before, "killer", *after], ids, strict=True))
    wait_state(q, by_name["killer"], "dead")
    for name in before + after:
        wait_state(q, by_name[name], "succeeded")
    ran = log.read_text().split()
    assert sorted(ran) == sorted([f"warm{i}" for i in range(5)] + before + after)  # each once
    (crash,) = q.get_attempts(by_name["killer"])
    assert crash.outcome == "crashed" and crash.signal == "SIGKILL"
    for name in before:
        assert [a.outcome for a in q.get_attempts(by_name[name])] == ["succeeded"]
    for name in after:
        history = q.get_attempts(by_name[name])
        assert [a.outcome for a in history] == ["handed_back", "succeeded"], name
        assert "not started" in (history[0].error or "")
        assert q.get_job(by_name[name]).attempts == 1
    assert sup.proc.poll() is None
    q.close()


def test_jobs_waiting_in_a_chunk_behind_a_long_job_go_to_a_free_child(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """Short jobs are handed out many at a time; when the first of them turns out long, the
    rest do not wait for it while another child is free (a free slot takes the next job)."""
    q = open_db(queue_path)
    log = tmp_path / "tally.log"
    release = tmp_path / "release"

    def job(name: str, **extra: object) -> dict[str, object]:
        payload = {"log": str(log), "name": name, **extra}
        return {"job_type": "tally", "payload": payload, "parallel": True}

    start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    for job_id in q.enqueue_many([job(f"warm{i}") for i in range(5)]):  # known to be short
        wait_state(q, job_id, "succeeded")
    names = [f"short{i}" for i in range(10)]
    long_job, *short = q.enqueue_many(
        [job("long", release=str(release))] + [job(name) for name in names]
    )
    for job_id in short:  # while the long job still waits for its release
        wait_state(q, job_id, "succeeded")
    assert q.get_job(long_job).state == "running"
    release.touch()
    wait_state(q, long_job, "succeeded")
    ran = log.read_text().split()[5:]
    assert sorted(ran) == sorted([*names, "long"]) and ran[-1] == "long"  # each once
    for job_id in [long_job, *short]:
        assert attempts_of(q, job_id) == [(1, "succeeded")]
    q.close()


def test_a_hung_python_handler_times_out_and_its_child_is_killed(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    pidfile = tmp_path / "hang.pid"
    job = q.enqueue("hang", {"pidfile": str(pidfile)}, timeout=1.0, max_retries=0)
    start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    (child,) = read_pids(pidfile)
    wait_state(q, job, "dead")
    (attempt,) = q.get_attempts(job)
    assert attempt.outcome == "timeout"
    assert attempt.error == "timed out after 1s"
    assert attempt.finished_at is not None and attempt.started_at is not None
    assert 1.0 <= attempt.finished_at - attempt.started_at < 8.0
    wait_gone([child], what="the hung child")
    later = q.enqueue("noop", {"value": 1})
    wait_state(q, later, "succeeded")
    q.close()


def test_a_hung_replay_times_out_and_no_grandchild_survives(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    program = replay_program(tmp_path)
    pidfile = tmp_path / "replay.pid"
    job = q.enqueue("hang", {"command": "hang", "args": [str(pidfile)]}, max_retries=0)
    start(
        servers,
        tmp_path,
        queue_path,
        "supervise",
        "--workers",
        "2",
        "--program",
        program,
        "--job-timeout",
        "1",
    )
    command, grandchild = read_pids(pidfile)
    wait_state(q, job, "dead")
    (attempt,) = q.get_attempts(job)
    assert attempt.outcome == "timeout", attempt
    assert attempt.error == "timed out after 1s"
    wait_gone([command, grandchild], what="the command and its grandchild")
    later = q.enqueue("ok", {"command": "ok"})
    wait_state(q, later, "succeeded")
    q.close()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[1])


def _pool_children(sup: Serving) -> list[int]:
    """The pool's children: under forkserver, the fork server's children."""
    tree = sup.descendants()
    servers = [
        pid
        for pid in tree
        if _ppid(pid) == sup.pid and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return [pid for pid in tree if _ppid(pid) in servers]


def _kill_both_idle_children(sup: Serving) -> None:
    children = wait_until(
        lambda: len(_pool_children(sup)) == 2 and _pool_children(sup), 20.0, what="two children"
    )
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_gone(children)


def test_children_killed_while_idle_do_not_wedge_the_pool(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """An idle child may die holding the pool's task lock: the pool is replaced at once."""
    q = open_db(queue_path)
    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    _kill_both_idle_children(sup)
    enqueued = time.time()
    job = q.enqueue("noop", {"value": "after"}, parallel=True)
    wait_state(q, job, "succeeded")
    started = q.get_job(job).started_at
    assert started is not None
    # Not the 10 s stall detection: the idle deaths were noticed and the pool replaced.
    assert [a.outcome for a in q.get_attempts(job)] in (["succeeded"], ["handed_back", "succeeded"])
    assert q.get_attempts(job)[-1].started_at is not None
    assert (q.get_attempts(job)[-1].started_at or 0) - enqueued < 5.0, sup.log()
    sup.wait_event("pool_child_died")
    assert sup.proc.poll() is None
    q.close()


def test_a_supervisor_whose_idle_children_were_killed_still_stops_on_sigterm(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """Found by the soak: both idle children SIGKILLed, then SIGTERM before the loop had
    replaced the pool. ``Pool.terminate`` then waited for ever on the task queue's lock; the
    stop must end anyway, with exit status 0."""
    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    _kill_both_idle_children(sup)
    sup.signal(signal.SIGTERM)
    assert sup.wait(20.0) == 0, sup.log()
    sup.wait_event("supervisor_stopped")


def test_a_replayed_commands_group_is_recorded_and_dies_with_its_killed_child(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """The child reports the command's process group through its slot: the job's row names it
    (with the child) while it runs, and killing the child takes the whole group along."""
    q = open_db(queue_path)
    program = replay_program(tmp_path)
    pidfile = tmp_path / "replay.pid"
    job = q.enqueue("hang", {"command": "hang", "args": [str(pidfile)]}, max_retries=0)
    start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--program", program)
    command, grandchild = read_pids(pidfile)
    child = _ppid(command)

    def recorded() -> tuple[int | None, int | None]:
        with sqlite3.connect(queue_path) as conn:
            row = conn.execute("SELECT pgid, worker_pid FROM jobs WHERE id = ?", (job,)).fetchone()
        return row[0], row[1]

    wait_until(lambda: recorded() == (command, child), 10.0, what="the command's group recorded")
    os.kill(child, signal.SIGKILL)
    wait_state(q, job, "dead")
    (attempt,) = q.get_attempts(job)
    assert attempt.outcome == "crashed", attempt
    assert attempt.signal == "SIGKILL"
    wait_gone([command, grandchild], what="the command and its grandchild")
    q.close()
