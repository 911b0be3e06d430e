"""Several real processes claim from one queue at once, on each backend (SQLite, PostgreSQL).

Four worker processes run ``get_batch`` / ``ack`` in a loop until nothing is pending. Each
records what it claimed; the test then checks that every job was claimed exactly once, none was
left behind, and the barrier held: from the recorded attempt times, no sequential job overlapped
another job, and no job ever ran ahead of a sequential job enqueued before it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq.storage import open_queue

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
WORKERS = 4
PARALLEL_JOBS = 400
SEQUENTIAL_JOBS = 24

WORKER = """
    import json, os, random, sys, time
    from graphiti_mpq.storage import open_queue

    path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    q = open_queue(path, busy_timeout=30.0)
    q.get_batch(0)  # register before the start, so every worker starts claiming at once
    print("ready", flush=True)
    sys.stdin.readline()  # the go signal
    batches, idle = [], 0
    while True:
        jobs = q.get_batch(rng.randint(1, 8))
        if jobs:
            batches.append([j.id for j in jobs])
            rng.shuffle(jobs)
            for job in jobs:  # ack right after the claim
                q.ack(job, {"by": os.getpid()})
            # a moment between claims, as a worker has: SQLite's busy handler is not fair
            # (a waiter sleeps up to 100 ms), so a worker that never lets go of the lock
            # could starve the others and leave nothing concurrent to test
            time.sleep(0.001)
            continue
        if q.get_pending_count() == 0:
            break
        idle += 1
        time.sleep(0.001)  # others hold the barrier; poll again
    q.close()
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "batches": batches, "idle": idle}, f)
"""


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:  # only on failure are any still running
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_concurrent_claims_take_every_job_exactly_once_and_honour_the_barrier(
    store_location: str, tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    rng = random.Random(1234)
    kinds = [True] * PARALLEL_JOBS + [False] * SEQUENTIAL_JOBS
    rng.shuffle(kinds)
    kinds[0] = False  # a sequential job at the head, and two in a row somewhere
    kinds[200] = kinds[201] = False
    queue = open_queue(store_location)
    try:
        ids = queue.enqueue_many(
            [{"job_type": "t", "payload": {"i": i}, "parallel": p} for i, p in enumerate(kinds)]
        )
    finally:
        queue.close()
    parallel_of = dict(zip(ids, kinds, strict=True))

    reports = _run_workers(store_location, tmp_path, workers)

    # every job claimed exactly once, by the worker whose ack stored its result
    claimed_by: dict[str, int] = {}
    for report in reports:
        for job_id in (j for batch in report["batches"] for j in batch):
            assert job_id not in claimed_by, f"{job_id} claimed twice"
            claimed_by[job_id] = report["pid"]
    assert set(claimed_by) == set(ids)
    assert sum(1 for r in reports if r["batches"]) >= 2, "the workers did not run concurrently"

    queue = open_queue(store_location)
    try:
        stats = queue.get_stats()
        assert (stats.succeeded, stats.pending, stats.running, stats.dead_letter) == (
            len(ids),
            0,
            0,
            0,
        )
        jobs = {job_id: queue.get_job(job_id) for job_id in ids}
        attempts = {job_id: queue.get_attempts(job_id) for job_id in ids}
    finally:
        queue.close()
    spans: dict[str, tuple[float, float]] = {}
    for job_id, history in attempts.items():
        assert jobs[job_id].result == {"by": claimed_by[job_id]}
        assert [(a.attempt, a.outcome) for a in history] == [(1, "succeeded")], job_id
        started, finished = history[0].started_at, history[0].finished_at
        assert started is not None and finished is not None and started <= finished
        spans[job_id] = (started, finished)

    # batches: one sequential job alone, or parallel jobs in enqueue order
    seq_of = {job_id: job.seq for job_id, job in jobs.items()}
    for batch in (b for report in reports for b in report["batches"]):
        assert len(batch) == 1 or all(parallel_of[j] for j in batch), batch
        assert [seq_of[j] for j in batch] == sorted(seq_of[j] for j in batch)

    order = sorted(ids, key=seq_of.__getitem__)
    _check_barrier(order, parallel_of, spans)
    concurrency = _max_concurrency([spans[j] for j in ids if parallel_of[j]])
    assert concurrency >= 2, "parallel jobs never ran side by side"


def _run_workers(
    location: str, tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> list[dict[str, Any]]:
    """Start the workers, let them all go at once, and return their reports."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    outs = [tmp_path / f"worker-{n}.json" for n in range(WORKERS)]
    for n, out in enumerate(outs):
        workers.append(
            subprocess.Popen(
                [sys.executable, str(script), location, str(out), str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    for proc in workers:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in workers:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in workers:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    return [json.loads(out.read_text()) for out in outs]


def _check_barrier(
    order: list[str], parallel_of: dict[str, bool], spans: dict[str, tuple[float, float]]
) -> None:
    """From recorded attempt times: a sequential job overlapped no other job, everything
    enqueued before it had finished when it started, and nothing enqueued after it started
    before it finished (no claim skipped it)."""
    for position, seq_id in enumerate(order):
        if parallel_of[seq_id]:
            continue
        s_start, s_end = spans[seq_id]
        for other in order:
            o_start, o_end = spans[other]
            assert other == seq_id or o_end <= s_start or o_start >= s_end, (
                f"sequential job {seq_id} [{s_start}, {s_end}] overlapped {other} "
                f"[{o_start}, {o_end}]"
            )
        for before in order[:position]:
            assert spans[before][1] <= s_start, (seq_id, before)
        for after in order[position + 1 :]:
            assert spans[after][0] >= s_end, (seq_id, after)


def _max_concurrency(spans: list[tuple[float, float]]) -> int:
    events: list[tuple[float, int]] = []
    for start, end in spans:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best
