"""Graceful and hard stops of a supervisor (SIGTERM, a second SIGTERM, the end of the grace).

A first signal stops claiming and lets running jobs finish within the grace period; a second
one (or the end of the grace) stops the children and hands their jobs back without using an
attempt. Either way the supervisor exits 0 and leaves no process behind.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from .helpers import schema_v2_queue, wait_until
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


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_running_jobs_finish_and_claims_nothing_more(
    tmp_path: Path, queue_path: str, servers: list[Serving], sig: int
) -> None:
    q = open_db(queue_path)
    log = tmp_path / "sleep.log"
    sleepers = [
        q.enqueue("sleep", {"log": str(log), "name": f"s{i}", "seconds": 1.5}, parallel=True)
        for i in range(2)
    ]
    # Behind them, a job the pool may already hold but that no child has started.
    behind = q.enqueue("noop", {"value": 1}, parallel=True)
    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    wait_until(lambda: len(_lines(log)) == 2, 20.0, what="both sleepers to start")
    tree = sup.descendants()
    sup.signal(sig)
    sup.wait_event("supervisor_stopping")
    late = q.enqueue("noop", {"value": 2}, parallel=True)
    assert sup.wait() == 0, sup.log()
    for job in sleepers:
        assert q.get_job(job).state == "succeeded"
        assert attempts_of(q, job) == [(1, "succeeded")]
    # No claim after the signal; a job the pool held but had not started went back untouched.
    assert q.get_job(late).state == "pending"
    assert q.get_attempts(late) == []
    assert q.get_job(behind).state == "pending"
    assert q.get_job(behind).attempts == 0
    assert [a.outcome for a in q.get_attempts(behind)] in ([], ["handed_back"])
    wait_gone(tree, what="the pool")
    assert not q.list_processes()
    q.close()


@pytest.mark.parametrize("how", ["second-signal", "grace-expiry"])
def test_hard_stop_hands_running_jobs_back_without_using_an_attempt(
    tmp_path: Path, queue_path: str, servers: list[Serving], how: str
) -> None:
    q = open_db(queue_path)
    program = replay_program(tmp_path)
    replay_pids = tmp_path / "replay.pids"
    python_pids = tmp_path / "python.pids"
    replay = q.enqueue("replay", {"command": "hang", "args": [str(replay_pids)]}, parallel=True)
    python = q.enqueue(
        "hang_with_grandchild",
        {"pidfile": str(python_pids), "marker": str(tmp_path / "python.marker")},
        parallel=True,
    )
    grace = "30" if how == "second-signal" else "0.5"
    # More children than jobs: idle children are killed too (one holds the pool's task lock).
    options = ["--workers", "4", "--import", FIXTURE, "--program", program]
    sup = start(servers, tmp_path, queue_path, "supervise", *options, "--grace", grace)
    command, command_grandchild = read_pids(replay_pids)
    child, child_grandchild = read_pids(python_pids)
    tree = sup.descendants()
    sup.signal(signal.SIGTERM)
    sup.wait_event("supervisor_stopping")
    if how == "second-signal":
        sup.signal(signal.SIGTERM)
    assert sup.wait() == 0, sup.log()
    wait_gone(
        [*tree, command, command_grandchild, child, child_grandchild],
        what="the pool, the command and every grandchild",
    )
    for job in (replay, python):
        stored = q.get_job(job)
        assert stored.state == "pending"
        assert stored.attempts == 0
        assert attempts_of(q, job) == [(1, "handed_back")]
    assert not q.list_processes()

    # The rerun gets the same attempt number: the handed-back attempt did not count.
    (tmp_path / "replay.pids.release").touch()
    drain = start(servers, tmp_path, queue_path, "drain", *options, "--json", ready=False)
    assert drain.wait() == 0, drain.log()
    for job in (replay, python):
        wait_state(q, job, "succeeded")
        assert attempts_of(q, job) == [(1, "handed_back"), (1, "succeeded")]
    assert (tmp_path / "replay.pids.attempts").read_text().split() == ["1", "1"]
    q.close()


def _catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


@pytest.mark.parametrize("command", ["supervise", "drain"])
def test_a_stop_asked_for_while_the_command_starts_is_a_clean_stop(
    tmp_path: Path, queue_path: str, servers: list[Serving], command: str
) -> None:
    """A SIGTERM that comes while the serving command still opens its queue (here: waiting to
    migrate it, another process holds the write lock) stops it cleanly once it has started."""
    conn = schema_v2_queue(queue_path)
    conn.execute("COMMIT")
    conn.execute("BEGIN IMMEDIATE")  # the lock its migration waits for (up to 5 s)
    try:
        sup = start(servers, tmp_path, queue_path, command, "--workers", "1", ready=False)
        wait_until(lambda: _catches(sup.pid, signal.SIGTERM), 4.0, what="the early handler")
        assert not sup.events("supervisor_started")
        sup.signal(signal.SIGTERM)
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert sup.wait() == 0, sup.log()
    assert [e["event"] for e in sup.events() if e["event"].startswith("supervisor_")] == [
        "supervisor_started",
        "supervisor_stopping",
        "supervisor_stopped",
    ]
    q = open_db(queue_path)
    assert q.get_stats().pending == 0  # migrated, and usable
    q.close()


def test_a_second_early_signal_has_its_default_effect() -> None:
    """The first stop signal of a starting command is kept for the supervisor; the next one
    acts as it would have without the early handler (a start-up stuck waiting stays
    stoppable)."""
    import os

    from graphiti_mpq import stopsignals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopsignals.catch_early()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, 5.0)
        assert signal.getsignal(signal.SIGINT) is stopsignals._note  # one kind at a time
        assert stopsignals.take() == 1 and stopsignals.take() == 0
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
