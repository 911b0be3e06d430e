"""The barrier across processes: a ``supervise`` and a ``drain`` serve one database together.

Handlers record when they ran (``time.time()``) and which serving process ran them; from those
intervals: no sequential job overlapped any other job, jobs never ran ahead of a sequential job
enqueued before them, parallel jobs did overlap (so the check can fail), and both processes
served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .helpers import wait_until
from .serving import FIXTURE, Serving, open_db, start, wait_state

pytestmark = pytest.mark.timeout(120)

BATCHES = 3
PARALLEL_PER_BATCH = 10  # more than one process's pool takes at once: both must serve


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["start"] < b["end"] and b["start"] < a["end"])


def test_supervise_and_drain_share_the_barrier(
    tmp_path: Path, queue_path: str, servers: list[Serving]
) -> None:
    q = open_db(queue_path)
    log = tmp_path / "intervals.log"
    options = ["--workers", "2", "--import", FIXTURE]
    sup = start(servers, tmp_path, queue_path, "supervise", *options, name="supervise")

    # A sequential gate holds everything back until the drain serves too.
    release = tmp_path / "release"
    started = tmp_path / "gate.started"
    gate = q.enqueue(
        "gate",
        {"log": str(log), "name": "gate", "release": str(release), "started": str(started)},
    )
    wait_until(started.exists, 20.0, what="the gate to start")
    jobs: list[dict[str, Any]] = []
    for batch in range(BATCHES):
        for i in range(PARALLEL_PER_BATCH):
            name = f"p{batch}.{i}"
            payload = {"log": str(log), "name": name, "seconds": 0.3}
            jobs.append({"job_type": "record", "payload": payload, "parallel": True})
        payload = {"log": str(log), "name": f"s{batch}", "seconds": 0.2}
        jobs.append({"job_type": "record", "payload": payload, "parallel": False})
    ids = q.enqueue_many(jobs)
    drain = start(servers, tmp_path, queue_path, "drain", *options, "--json", name="drain")
    # The drain counts jobs held back by the barrier as eligible: it waits, it does not exit.
    assert drain.proc.poll() is None
    release.touch()

    try:
        code = drain.wait(40.0)
    except AssertionError:
        states = [(j.id, j.state, j.owner) for j in q.list_jobs(limit=100)]
        raise AssertionError(
            f"{drain.log()}\n--- supervise:\n{sup.log()}\n{states}\n{q.list_processes()}"
        ) from None
    assert code == 0, drain.log()
    summary = json.loads(drain.stdout())
    assert set(summary) == {"succeeded", "failed", "dead", "seconds"}
    assert summary["failed"] == 0 and summary["dead"] == 0
    for job_id in [gate, *ids]:
        wait_state(q, job_id, "succeeded", timeout=30.0)
    assert sup.proc.poll() is None  # the supervisor serves on after the drain left

    records = {r["name"]: r for r in map(json.loads, log.read_text().splitlines())}
    order = ["gate"] + [j["payload"]["name"] for j in jobs]
    assert sorted(records) == sorted(order)
    assert summary["succeeded"] == sum(1 for r in records.values() if r["by"] == drain.pid)
    assert {r["by"] for r in records.values()} == {sup.pid, drain.pid}, "both processes serve"

    for index, name in enumerate(order):
        if not name.startswith(("s", "gate")):
            continue
        seq = records[name]
        for other_index, other_name in enumerate(order):
            if other_name == name:
                continue
            other = records[other_name]
            assert not _overlap(seq, other), (name, seq, other_name, other)
            if other_index < index:
                assert other["end"] <= seq["start"], (other_name, "ran after", name)
            else:
                assert other["start"] >= seq["end"], (other_name, "ran before", name)
    parallel = [records[n] for n in order if n.startswith("p")]
    assert any(_overlap(a, b) for i, a in enumerate(parallel) for b in parallel[i + 1 :])
    cross = [
        (a, b)
        for a in parallel
        for b in parallel
        if a["by"] == sup.pid and b["by"] == drain.pid and _overlap(a, b)
    ]
    assert cross, "parallel jobs of the two processes ran side by side"
    q.close()
