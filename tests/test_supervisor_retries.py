"""Retries are row updates: run_at = end of the failed attempt + base * 2**(k-1).

With a 0.1 s base: 0.1, 0.2, 0.4 s, then the dead-letter table with the error history. No
worker waits on a retry: with a single worker, a job enqueued later runs in between.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import wait_until
from .serving import (
    FIXTURE,
    Serving,
    open_db,
    replay_program,
    serving_env,
    start,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


def test_retries_back_off_then_dead_letter_without_blocking_a_worker(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    failing = q.enqueue("fail", {"message": "boom"}, parallel=True)
    sup = start(
        servers,
        tmp_path,
        queue_path,
        "supervise",
        "--workers",
        "1",
        "--import",
        FIXTURE,
        "--backoff-base",
        "0.1",
        "--max-retries",
        "3",
    )
    # The run_at of each retry, caught while the job waits for it.
    seen: dict[int, float] = {}

    def first_failure() -> bool:
        job = q.get_job(failing)
        if job.public_state == "pending" and job.attempts > 0:
            seen.setdefault(job.attempts, job.run_at)
        return job.attempts >= 1 and job.public_state != "running"

    wait_until(first_failure, 20.0, 0.005, "the first failure")
    later = q.enqueue("noop", {"value": "later"}, parallel=True)

    def dead() -> bool:
        job = q.get_job(failing)
        if job.public_state == "pending" and job.attempts > 0:
            seen.setdefault(job.attempts, job.run_at)
        return job.public_state == "dead"

    wait_until(dead, 30.0, 0.005, "the job to end dead")
    attempts = q.get_attempts(failing)
    assert [(a.attempt, a.outcome) for a in attempts] == [(k, "failed") for k in (1, 2, 3, 4)]
    assert all(a.error == "RuntimeError: boom" for a in attempts)
    delays = [0.1, 0.2, 0.4]
    for k, delay in enumerate(delays, start=1):
        ended, next_start = attempts[k - 1].finished_at, attempts[k].started_at
        assert ended is not None and next_start is not None
        # Started no sooner than the backoff, and not much later (a loaded machine is slow).
        assert delay - 0.001 <= next_start - ended < delay + 2.0, (k, next_start - ended)
        if k in seen:  # the run_at recorded for retry k, when the poll caught it
            assert seen[k] - ended == pytest.approx(delay, abs=1e-6), (k, seen)
    # The last retry's run_at stays on the row: end of attempt 3 + 0.4 s.
    job = q.get_job(failing)
    assert attempts[2].finished_at is not None
    assert job.run_at - attempts[2].finished_at == pytest.approx(0.4, abs=1e-6)
    assert job.last_error == "RuntimeError: boom"
    (entry,) = q.get_dead_letter_jobs()
    assert entry.id == failing and entry.errors == ["RuntimeError: boom"] * 4
    # The later job ran on the only worker while the failing one waited for its retries.
    done = q.get_job(later)
    assert done.state == "succeeded" and done.finished_at is not None
    assert attempts[3].started_at is not None and done.finished_at < attempts[3].started_at
    retries = sup.events("job_failed_retrying")
    assert [e["retry_in"] for e in retries if e["job_id"] == failing] == delays
    sup.wait_event("job_exhausted_dead_letter", job_id=failing)

    # The CLI shows the same history.
    shown = subprocess.run(
        [sys.executable, "-m", "graphiti_mpq", "show", failing, "--json"],
        env=serving_env(queue_path),
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(shown.stdout)
    assert data["state"] == "dead" and data["attempts"] == 4
    assert [a["outcome"] for a in data["attempt_history"]] == ["failed"] * 4
    q.close()


def test_a_replay_retry_gets_the_next_attempt_number(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    record = tmp_path / "attempts"
    job = q.enqueue("flaky", {"command": "attempt", "args": [str(record), "3"]})
    start(
        servers,
        tmp_path,
        queue_path,
        "supervise",
        "--workers",
        "2",
        "--program",
        replay_program(tmp_path),
        "--backoff-base",
        "0.1",
    )
    wait_state(q, job, "succeeded")
    assert record.read_text().split() == ["1", "2", "3"]
    outcomes = [(a.attempt, a.outcome, a.exit_code) for a in q.get_attempts(job)]
    assert outcomes == [(1, "failed", 1), (2, "failed", 1), (3, "succeeded", 0)]
    q.close()
