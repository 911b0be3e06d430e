"""The in-process worker of the Python API: ``process_queue``, ``start_worker``/``stop_worker``
and ``BackgroundWorker``.

The loop runs on a thread of this (test) process with its own pool of child processes, which
import the handler modules named by ``GRAPHITI_QUEUE_IMPORTS``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import graphiti_mpq
from graphiti_mpq import api
from graphiti_mpq.worker import BackgroundWorker

from .helpers import wait_until
from .serving import (
    FIXTURE,
    attempts_of,
    open_db,
    read_pids,
    serving_env,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def worker_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GRAPHITI_QUEUE_IMPORTS", FIXTURE)
    monkeypatch.setenv("GRAPHITI_QUEUE_WORKERS", "2")
    monkeypatch.setenv("GRAPHITI_QUEUE_BACKOFF_BASE", "0.1")
    yield
    api.reset()


def test_process_queue_works_what_is_eligible_and_counts_attempts() -> None:
    ok = [graphiti_mpq.enqueue("noop", {"value": i}, parallel=True, silent=True) for i in range(3)]
    bad = graphiti_mpq.enqueue("fail", {}, silent=True, max_retries=0)
    retry = graphiti_mpq.enqueue("fail", {}, silent=True, max_retries=2)
    later = graphiti_mpq.enqueue("noop", {}, silent=True, delay=3600)
    assert graphiti_mpq.process_queue() == (3, 2)
    q = api.get_queue()
    assert [q.get_job(i).state for i in ok] == ["succeeded"] * 3
    assert q.get_job(bad).state == "dead"
    # It does not wait for scheduled retries, nor for delayed jobs.
    assert q.get_job(retry).state == "pending" and q.get_job(retry).attempts == 1
    assert q.get_job(later).state == "pending"
    assert graphiti_mpq.get_status()["worker_running"] is False


def test_start_worker_serves_until_stop_worker() -> None:
    assert graphiti_mpq.start_worker() is False  # nothing pending: no worker
    assert not graphiti_mpq.get_worker().is_running()
    first = graphiti_mpq.enqueue("noop", {"value": 1}, silent=True)
    assert graphiti_mpq.start_worker() is True
    worker = graphiti_mpq.get_worker()
    assert worker.wait_ready(30.0)
    q = api.get_queue()
    wait_state(q, first, "succeeded")
    status = graphiti_mpq.get_status()
    assert status["worker_running"] is True
    assert [s["kind"] for s in status["supervisors"]] == ["worker"]
    # Once started it serves on: a job enqueued later runs too.
    second = graphiti_mpq.enqueue("noop", {"value": 2}, parallel=True, silent=True)
    wait_state(q, second, "succeeded")
    assert q.get_job(second).result == 2
    graphiti_mpq.stop_worker()
    assert not worker.is_running()
    assert graphiti_mpq.get_status()["worker_running"] is False


def test_start_worker_force_starts_on_an_empty_queue() -> None:
    assert graphiti_mpq.start_worker(force=True) is True
    worker = graphiti_mpq.get_worker()
    assert worker.wait_ready(30.0)
    job = graphiti_mpq.enqueue("noop", {"value": "forced"}, silent=True)
    wait_state(api.get_queue(), job, "succeeded")
    graphiti_mpq.stop_worker()
    assert not worker.is_running()


def test_stop_hands_a_running_job_back_after_the_timeout(tmp_path: Path, queue_path: str) -> None:
    q = open_db(queue_path)
    pidfile = tmp_path / "hang.pid"
    marker = tmp_path / "hang.marker"
    job = q.enqueue("hang", {"pidfile": str(pidfile), "marker": str(marker)})
    worker = BackgroundWorker(api.get_queue())
    worker.start()
    assert worker.wait_ready(30.0)
    (child,) = read_pids(pidfile)
    began = time.monotonic()
    worker.stop(timeout=0.5)
    took = time.monotonic() - began
    assert not worker.is_running()
    assert 0.5 <= took < 15.0, took
    wait_gone([child], what="the worker's child")
    stored = q.get_job(job)
    assert stored.state == "pending" and stored.attempts == 0
    assert attempts_of(q, job) == [(1, "handed_back")]
    # The next run takes it again, with the same attempt number (the marker lets it succeed).
    assert graphiti_mpq.process_queue() == (1, 0)
    assert attempts_of(q, job) == [(1, "handed_back"), (1, "succeeded")]
    q.close()


def test_stop_lets_a_short_job_finish_within_the_timeout(tmp_path: Path) -> None:
    log = tmp_path / "sleep.log"
    worker = BackgroundWorker(api.get_queue())
    worker.start()
    assert worker.wait_ready(30.0)
    job = graphiti_mpq.enqueue("sleep", {"log": str(log), "seconds": 0.5}, silent=True)
    wait_until(log.exists, 20.0, what="the job to start")
    worker.stop(timeout=30.0)
    assert api.get_queue().get_job(job).state == "succeeded"


HOST = """
import sys
import graphiti_mpq
from tests.helpers import wait_until
from pathlib import Path

graphiti_mpq.enqueue("hang", {"pidfile": sys.argv[1]}, silent=True)
assert graphiti_mpq.start_worker()
wait_until(Path(sys.argv[1]).exists, 30.0)
print("serving", flush=True)
# The host ends without stop_worker(): the worker must not keep it alive.
"""


def test_a_host_that_exits_without_stop_worker_is_not_kept_alive(
    tmp_path: Path, queue_path: str
) -> None:
    pidfile = tmp_path / "hang.pid"
    env = serving_env(
        queue_path,
        GRAPHITI_QUEUE_IMPORTS=FIXTURE,
        GRAPHITI_QUEUE_GRACE="0.5",
        GRAPHITI_QUEUE_WORKERS="2",
    )
    done = subprocess.run(
        [sys.executable, "-c", HOST, str(pidfile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "serving\n"
    (child,) = read_pids(pidfile)
    wait_gone([child], what="the worker's child")
    q = open_db(queue_path)
    (job,) = q.list_jobs()
    assert job.state == "pending" and job.attempts == 0
    assert attempts_of(q, job.id) == [(1, "handed_back")]
    q.close()
