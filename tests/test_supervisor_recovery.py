"""Crash safety: a supervisor SIGKILLed mid-job leaves no job code behind and loses no job.

The jobs of a dead supervisor are recovered at once by the next serving process on this host
(the owner is provably dead), the interrupted attempt counts as ``lost``, and a job that kills
its supervisor every time ends in the dead-letter table instead of looping.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
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
    tracked,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def servers() -> Iterator[list[Serving]]:
    yield from tracked()


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
        drain = start(servers, tmp_path, queue_path, "drain", *options, "--json", ready=False)
        assert drain.wait() == 0, drain.log()
        summary = json.loads(drain.stdout())
        assert summary["succeeded"] == 2, summary
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
