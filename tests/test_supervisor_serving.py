"""A supervisor at work: every start method, status while it serves, and the wake-up path.

Under fork, forkserver and spawn, Python handlers from an ``--import`` module and replay jobs
run, a crash is recorded, and a SIGKILLed supervisor takes every process of its pool along.
``status`` reports a serving process from its heartbeat, and stops reporting it when it is
gone. An idle supervisor starts a newly enqueued job at once: the enqueuer pokes it.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import graphiti_mpq

from .helpers import wait_until
from .serving import (
    FIXTURE,
    Serving,
    open_db,
    read_pids,
    replay_program,
    serving_env,
    start,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_start_method_runs_handlers_and_dies_with_its_supervisor(
    tmp_path: Path, queue_path: str, servers: list[Serving], method: str
) -> None:
    q = open_db(queue_path)
    pidfile = tmp_path / "hang.pid"
    python = q.enqueue("noop", {"value": method}, parallel=True)
    replay = q.enqueue("ok", {"command": "ok"}, parallel=True)
    crash = q.enqueue("sigkill", {}, parallel=True, max_retries=0)
    sup = start(
        servers,
        tmp_path,
        queue_path,
        "supervise",
        "--workers",
        "2",
        "--start-method",
        method,
        "--import",
        FIXTURE,
        "--program",
        replay_program(tmp_path),
    )
    assert sup.events("supervisor_started")[0]["start_method"] == method
    wait_state(q, python, "succeeded")
    assert q.get_job(python).result == method
    wait_state(q, replay, "succeeded")
    (attempt,) = q.get_attempts(replay)
    assert attempt.output_tail is not None and attempt.output_tail.startswith(f"ok {replay} 1")
    wait_state(q, crash, "dead")
    assert [a.signal for a in q.get_attempts(crash)] == ["SIGKILL"]

    hang = q.enqueue("hang", {"pidfile": str(pidfile)}, parallel=True)
    (child,) = read_pids(pidfile)
    tree = sup.descendants()
    assert child in tree
    sup.signal(signal.SIGKILL)
    sup.wait()
    wait_gone(tree, what=f"the {method} pool of a SIGKILLed supervisor")
    assert q.get_job(hang).state == "running"  # until a serving process recovers it
    q.close()


def _status(queue_path: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "graphiti_mpq", "status", "--json"],
        env=serving_env(queue_path),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_status_reports_serving_processes_while_they_live(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    assert _status(queue_path)["worker_running"] is False
    sup = start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    job = q.enqueue("noop", {})
    wait_state(q, job, "succeeded")

    def counted() -> dict[str, Any] | None:
        st = graphiti_mpq.get_status()
        entries = st["supervisors"]
        return st if entries and entries[0]["jobs_done"] == 1 else None

    wait_until(counted, 20.0, 0.05, "jobs_done to count the job")
    st = _status(queue_path)  # the CLI prints the same dict
    assert st["worker_running"] is True
    (entry,) = st["supervisors"]
    assert entry["pid"] == sup.pid
    assert entry["host"] == socket.gethostname()
    assert entry["kind"] == "supervise"
    assert entry["alive"] is True
    assert entry["started_at"] and entry["last_heartbeat"]

    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    st = graphiti_mpq.get_status()
    assert st["worker_running"] is False and st["supervisors"] == []

    # A SIGKILLed supervisor cannot say goodbye: its dead pid gives it away.
    killed = start(servers, tmp_path, queue_path, "supervise", "--workers", "1")
    assert graphiti_mpq.get_status()["worker_running"] is True
    killed.signal(signal.SIGKILL)
    killed.wait()
    st = graphiti_mpq.get_status()
    assert st["worker_running"] is False
    assert all(not s["alive"] for s in st["supervisors"])
    q.close()


def test_an_idle_supervisor_wakes_up_for_a_new_job(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    latencies = []
    for i in range(7):
        enqueued = time.time()
        job = q.enqueue("noop", {"value": i}, parallel=True)
        wait_state(q, job, "succeeded")
        started = q.get_job(job).started_at
        assert started is not None
        latencies.append(started - enqueued)
    # Not a benchmark: the poke works (the fallback poll alone would take up to 2 s).
    assert max(latencies) < 2.0, latencies
    assert statistics.median(latencies) < 0.5, latencies
    q.close()


def test_a_busy_database_pauses_the_supervisor_without_losing_outcomes(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    log = tmp_path / "sleep.log"
    job = q.enqueue("sleep", {"log": str(log), "seconds": 0.3})
    env = serving_env(queue_path, GRAPHITI_QUEUE_BUSY_TIMEOUT="0.1")
    sup = start(
        servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE, env=env
    )
    wait_until(log.exists, 20.0, what="the job to start")
    # Hold the write lock while the job ends: recording its outcome must wait, not fail.
    blocker = sqlite3.connect(queue_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        sup.wait_event("database_busy")
        assert q.get_job(job).state == "running"
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    wait_state(q, job, "succeeded")
    later = q.enqueue("noop", {})
    wait_state(q, later, "succeeded")
    assert sup.proc.poll() is None, sup.log()
    q.close()
