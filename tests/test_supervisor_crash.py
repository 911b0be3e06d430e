"""A supervisor survives whatever its children do: crashes, exits and hangs.

Real ``supervise`` processes, real signals. Each misbehaving attempt is recorded with a clear
reason within seconds, the pool is restored, and a later job still runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .serving import (
    FIXTURE,
    Serving,
    open_db,
    read_pids,
    replay_program,
    start,
    tracked,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def servers() -> Iterator[list[Serving]]:
    yield from tracked()


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
    pool_before = len(sup.descendants())
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
    assert len(sup.descendants()) == pool_before
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
