"""``graphiti_mpq drain``: work what is eligible now, then exit with a summary.

Exit 0 when every attempt of the run succeeded (with ``--wait-retries``: when no job ended
dead), else 1; ``--json`` prints ``{succeeded, failed, dead, seconds}``. Beside a running
supervisor it does not wait for the jobs that process runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .serving import (
    FIXTURE,
    Serving,
    attempts_of,
    open_db,
    replay_program,
    start,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


def _drain(
    servers: list[Serving], tmp_path: Path, queue_path: str, *args: str
) -> tuple[int, dict[str, Any], Serving]:
    options = ["--workers", "2", "--import", FIXTURE, "--backoff-base", "0.1"]
    options += ["--program", replay_program(tmp_path)]
    drain = start(servers, tmp_path, queue_path, "drain", *options, *args, ready=False)
    code = drain.wait(60.0)
    out = drain.stdout()
    summary = json.loads(out) if "--json" in args else {"text": out}
    return code, summary, drain


def test_drain_exits_0_when_everything_succeeded(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    ids = [q.enqueue("noop", {"value": i}, parallel=True) for i in range(3)]
    ids.append(q.enqueue("ok", {"command": "ok"}))
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--json")
    assert code == 0, drain.log()
    assert set(summary) == {"succeeded", "failed", "dead", "seconds"}
    assert (summary["succeeded"], summary["failed"], summary["dead"]) == (4, 0, 0)
    assert isinstance(summary["seconds"], float | int) and summary["seconds"] >= 0
    for job_id in ids:
        assert q.get_job(job_id).state == "succeeded"
    assert not q.list_processes()  # it unregistered
    q.close()


def test_outcomes_too_large_for_shared_memory_arrive_whole(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """A chunk reports outcomes through a 64 KiB slot; a larger one is sent apart, intact."""
    q = open_db(queue_path)
    sizes = [10, 70_000, 20, 150_000, 30]
    ids = q.enqueue_many(
        [{"job_type": "big", "payload": {"size": n}, "parallel": True} for n in sizes]
    )
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--json")
    assert code == 0, drain.log()
    assert summary["succeeded"] == len(sizes)
    for job_id, size in zip(ids, sizes, strict=True):
        job = q.get_job(job_id)
        assert job.state == "succeeded" and job.result == "x" * size
        assert attempts_of(q, job_id) == [(1, "succeeded")]
    q.close()


def test_drain_of_an_empty_queue_and_its_one_line_summary(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    code, summary, drain = _drain(servers, tmp_path, queue_path)
    assert code == 0, drain.log()
    lines = summary["text"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("drained: 0 succeeded, 0 failed"), lines


def test_drain_exits_1_with_a_failure_and_leaves_the_retry_scheduled(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    ok = q.enqueue("noop", {}, parallel=True)
    bad = q.enqueue("fail", {}, parallel=True, max_retries=3)
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--json")
    assert code == 1, drain.log()
    assert (summary["succeeded"], summary["failed"], summary["dead"]) == (1, 1, 0)
    assert q.get_job(ok).state == "succeeded"
    job = q.get_job(bad)
    assert job.state == "pending" and job.attempts == 1  # a retry it did not wait for
    q.close()


def test_wait_retries_waits_out_retries(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    record = tmp_path / "attempts"
    flaky = q.enqueue("flaky", {"command": "attempt", "args": [str(record), "2"]})
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--wait-retries", "--json")
    # A failed attempt, but no job ended dead: success with --wait-retries.
    assert code == 0, drain.log()
    assert (summary["succeeded"], summary["failed"], summary["dead"]) == (1, 1, 0)
    assert attempts_of(q, flaky) == [(1, "failed"), (2, "succeeded")]

    bad = q.enqueue("fail", {}, max_retries=2)
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--wait-retries", "--json")
    assert code == 1, drain.log()
    assert (summary["succeeded"], summary["failed"], summary["dead"]) == (0, 3, 1)
    assert q.get_job(bad).state == "dead"
    q.close()


def test_drain_beside_a_supervisor_does_not_wait_for_its_jobs(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    pidfile = tmp_path / "hang.pid"
    marker = tmp_path / "hang.marker"
    busy = q.enqueue(
        "hang", {"pidfile": str(pidfile), "marker": str(marker)}, parallel=True, timeout=60
    )
    start(servers, tmp_path, queue_path, "supervise", "--workers", "2", "--import", FIXTURE)
    wait_state(q, busy, "running")
    waiting = q.enqueue("noop", {"value": "mine"}, parallel=True)
    code, summary, drain = _drain(servers, tmp_path, queue_path, "--json")
    assert code == 0, drain.log()
    # The supervisor may take the new job first; either way the drain did not wait for the
    # job the supervisor runs.
    assert summary["failed"] == 0 and summary["succeeded"] in (0, 1)
    assert q.get_job(busy).state == "running"
    wait_state(q, waiting, "succeeded")
    q.close()


def test_every_replayed_command_is_logged_with_its_exit(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    """Short commands end before the loop looks at their child: the process group travels
    with each outcome, so every replay still gets its ``command_replayed`` line."""
    q = open_db(queue_path)
    ok = [q.enqueue("ok", {"command": "ok"}, parallel=True) for _ in range(40)]
    failing = q.enqueue("exits4", {"command": "fail"}, parallel=True, max_retries=0)
    code, _, drain = _drain(servers, tmp_path, queue_path)
    assert code == 1, drain.log()
    events = [json.loads(line) for line in drain.log_path.read_text().splitlines()]
    replayed = {e["job_id"]: e for e in events if e.get("event") == "command_replayed"}
    assert set(replayed) == {*ok, failing}
    assert {replayed[job_id]["exit_code"] for job_id in ok} == {0}
    assert replayed[failing]["exit_code"] == 4
    q.close()
