"""Several supervisors with distinct host identities serving one PostgreSQL queue.

The "hosts" are three ``graphiti_mpq supervise --host-id hN`` processes on this machine: they
share nothing but the database, and since their host ids differ none may use a pid check on
another's jobs, exactly as on separate machines. The barrier is checked from the times the
jobs themselves recorded, and from the attempt times in the database.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq import status
from graphiti_mpq.storage import open_queue
from graphiti_mpq.storage.base import QueueStore

from .backends import PgSchemas, raw_sql
from .helpers import wait_until
from .serving import Serving, serving_env, start

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

JOBS = "tests.multihost_jobs"
HOSTS = ("h1", "h2", "h3")


@pytest.fixture
def queue(pg_location: str) -> Iterator[QueueStore]:
    q = open_queue(pg_location)
    yield q
    q.close()


def start_hosts(
    servers: list[Serving], tmp_path: Path, location: str, *options: str
) -> dict[str, Serving]:
    hosts = {}
    for host in HOSTS:
        hosts[host] = start(
            servers,
            tmp_path,
            location,
            "supervise",
            "--host-id",
            host,
            "--import",
            JOBS,
            *options,
            env=serving_env(location),
            ready=False,
            name=host,
        )
    for serving in hosts.values():
        serving.wait_ready()
    return hosts


def owners_by_host(queue: QueueStore) -> dict[int, str]:
    return {int(row[0]): str(row[1]) for row in raw_sql(queue, "SELECT id, host FROM processes")}


def attempts_of(queue: QueueStore) -> dict[str, list[tuple[Any, ...]]]:
    """job id -> its attempts (attempt, outcome, started_at, finished_at, owner, error)."""
    rows = raw_sql(
        queue,
        "SELECT job_id, attempt, outcome, started_at, finished_at, owner, error FROM attempts"
        " ORDER BY id",
    )
    out: dict[str, list[tuple[Any, ...]]] = {}
    for job_id, *rest in rows:
        out.setdefault(job_id, []).append(tuple(rest))
    return out


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def connections_of(queue: QueueStore, pid: int) -> list[str]:
    rows = raw_sql(
        queue,
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE ?",
        (f"graphiti_mpq % pid={pid}",),
    )
    return sorted(str(row[0]) for row in rows)


def check_barrier(
    order: list[str], parallel: dict[str, bool], spans: dict[str, tuple[float, float]]
) -> None:
    """A sequential job overlapped no other job; everything enqueued before it had finished
    when it started, and nothing enqueued after it started before it finished."""
    for position, seq_id in enumerate(order):
        if parallel[seq_id]:
            continue
        s_start, s_end = spans[seq_id]
        for other in order[:position]:
            assert spans[other][1] <= s_start, f"{other} still ran when {seq_id} started"
        for other in order[position + 1 :]:
            assert spans[other][0] >= s_end, f"{other} started before {seq_id} ended"


def test_three_hosts_work_2000_jobs_once_each_and_the_barrier_holds(
    tmp_path: Path, pg_location: str, queue: QueueStore, servers: list[Serving]
) -> None:
    hosts = start_hosts(servers, tmp_path, pg_location, "--workers", "3", "--lease", "10")
    for serving in hosts.values():  # store, barrier, listener: at most three each
        assert len(connections_of(queue, serving.pid)) <= 3, connections_of(queue, serving.pid)
    log = tmp_path / "spans.jsonl"
    total, every = 2000, 100  # a sequential job every 100 (20 of them), two in a row once
    sequential = {n for n in range(total) if n % every == 50} | {1001}
    began = time.monotonic()
    ids = queue.enqueue_many(
        [
            {
                "job_type": "span",
                "payload": {"name": n, "log": str(log)},
                "parallel": n not in sequential,
            }
            for n in range(total)
        ]
    )
    report = wait_until(
        lambda: (r := status.build_status(queue))["succeeded"] == total and r,
        timeout=240,
        interval=0.2,
        what=f"{total} jobs to succeed",
    )
    elapsed = time.monotonic() - began
    print(f"\n{total} jobs on 3 hosts in {elapsed:.1f}s ({total / elapsed:.0f} jobs/s)")
    assert (report["pending"], report["running"], report["dead_letter"]) == (0, 0, 0)
    assert sorted((s["host"], s["alive"]) for s in report["supervisors"]) == [
        (h, True) for h in HOSTS
    ]

    # each job ran exactly once (by its own record, and by the attempt history)
    spans = read_log(log)
    assert sorted(s["name"] for s in spans) == list(range(total))
    attempts = attempts_of(queue)
    assert {job_id: [a[:2] for a in attempts[job_id]] for job_id in ids} == {
        job_id: [(1, "succeeded")] for job_id in ids
    }
    # every host took part
    hosts_of = owners_by_host(queue)
    served = {hosts_of[attempts[job_id][0][4]] for job_id in ids}
    assert served == set(HOSTS)

    # the barrier held across hosts: from the jobs' own clocks, and from the database's
    name_of = dict(zip(ids, range(total), strict=True))
    parallel = {job_id: name_of[job_id] not in sequential for job_id in ids}
    ran = {s["name"]: (s["start"], s["end"]) for s in spans}
    check_barrier(ids, parallel, {job_id: ran[name_of[job_id]] for job_id in ids})
    check_barrier(ids, parallel, {job_id: attempts[job_id][0][2:4] for job_id in ids})
    # and parallel jobs did run side by side, on several hosts at once
    overlapping_hosts = set()
    by_start = sorted(ids, key=lambda j: attempts[j][0][2])
    for a, b in itertools.pairwise(by_start):
        if attempts[b][0][2] < attempts[a][0][3]:
            overlapping_hosts.add(frozenset({attempts[a][0][4], attempts[b][0][4]}))
    assert any(len(pair) == 2 for pair in overlapping_hosts)

    for serving in hosts.values():
        serving.signal(signal.SIGTERM)
    for serving in hosts.values():
        assert serving.wait() == 0, serving.log()
    assert [p for p in queue.list_processes() if p.kind == "supervise"] == []


def test_the_jobs_of_a_killed_host_are_recovered_by_the_others_after_its_lease(
    tmp_path: Path, pg_location: str, queue: QueueStore, servers: list[Serving]
) -> None:
    lease = 2.0
    hosts = start_hosts(servers, tmp_path, pg_location, "--workers", "2", "--lease", str(lease))
    log = tmp_path / "spans.jsonl"
    ids = queue.enqueue_many(
        [
            {"job_type": "span", "payload": {"name": n, "log": str(log), "seconds": 1.0},
             "parallel": True}
            for n in range(12)
        ]
    )  # fmt: skip
    owner_of = {host: owner for owner, host in owners_by_host(queue).items()}
    victim = hosts["h1"]

    def victims_jobs() -> list[str]:
        rows = raw_sql(
            queue, "SELECT id FROM jobs WHERE state = 'running' AND owner = ?", (owner_of["h1"],)
        )
        return [str(row[0]) for row in rows]

    taken = wait_until(victims_jobs, what="h1 to run jobs")
    victim.signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait()

    wait_until(
        lambda: queue.get_stats().succeeded == len(ids), timeout=60, what="every job to succeed"
    )
    attempts = attempts_of(queue)
    hosts_of = owners_by_host(queue)
    for job_id in taken:
        history = attempts[job_id]
        assert [a[1] for a in history] == ["lost", "succeeded"], history
        lost, rerun = history
        assert "lease expired" in lost[5] and "h1" in lost[5]
        # recovered only once the lease had passed: h1's pid means nothing to h2 and h3
        assert lost[3] - killed_at >= lease / 2, (lost[3] - killed_at, lease)
        assert hosts_of[rerun[4]] in ("h2", "h3")
    assert queue.get_stats().dead_letter == 0
    report = status.build_status(queue)
    alive = {s["host"]: s["alive"] for s in report["supervisors"]}
    assert alive == {"h1": False, "h2": True, "h3": True}


def test_a_host_whose_connections_are_cut_reconnects_and_loses_nothing(
    tmp_path: Path,
    pg_location: str,
    queue: QueueStore,
    servers: list[Serving],
    pg_schemas: PgSchemas,
) -> None:
    hosts = start_hosts(servers, tmp_path, pg_location, "--workers", "2", "--lease", "5")
    log = tmp_path / "spans.jsonl"
    total = 300
    ids = queue.enqueue_many(
        [
            {"job_type": "span", "payload": {"name": n, "log": str(log), "seconds": 0.02},
             "parallel": n % 50 != 25}
            for n in range(total)
        ]
    )  # fmt: skip
    wait_until(lambda: queue.get_stats().succeeded >= 60, what="the run to be under way")
    victim = hosts["h2"]
    cut = raw_sql(
        queue,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE ?",
        (f"graphiti_mpq % pid={victim.pid}",),
    )
    assert len(cut) == 3  # store, barrier and listener
    cut_at = time.time()
    wait_until(
        lambda: queue.get_stats().succeeded == total, timeout=120, what="every job to succeed"
    )
    assert victim.proc.poll() is None, victim.log()  # it survived
    attempts = attempts_of(queue)
    hosts_of = owners_by_host(queue)
    outcomes = {a[1] for job_id in ids for a in attempts[job_id]}
    assert outcomes <= {"succeeded", "handed_back"}  # nothing lost, nothing failed
    assert queue.get_stats().dead_letter == 0
    # and it went on serving after the cut, on new connections
    after = [
        a for job_id in ids for a in attempts[job_id] if a[2] > cut_at and hosts_of[a[4]] == "h2"
    ]
    assert after, "h2 served no job after its connections were cut"
    assert len(connections_of(queue, victim.pid)) <= 3
    for serving in hosts.values():
        serving.signal(signal.SIGTERM)
    for serving in hosts.values():
        assert serving.wait() == 0, serving.log()


def test_a_host_that_loses_its_barrier_connection_hands_its_jobs_back_first(
    tmp_path: Path, pg_location: str, queue: QueueStore, servers: list[Serving]
) -> None:
    serving = start(
        servers,
        tmp_path,
        pg_location,
        "supervise",
        "--host-id",
        "h1",
        "--import",
        JOBS,
        "--workers",
        "2",
        env=serving_env(pg_location),
    )
    marker = tmp_path / "first-attempt.pid"
    job_id = queue.enqueue("hang_once", {"marker": str(marker), "seconds": 60}, parallel=True)
    wait_until(marker.exists, what="the first attempt to start")
    first_child = int(wait_until(marker.read_text, what="its pid"))
    cut = raw_sql(
        queue,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
        (f"graphiti_mpq barrier pid={serving.pid}",),
    )
    assert cut == [(True,)]
    # the job running under the lost hold is stopped and handed back (it does not count),
    # then runs again once the barrier is held anew
    wait_until(lambda: queue.get_job(job_id).state == "succeeded", timeout=10, what="the rerun")
    history = [(a.attempt, a.outcome) for a in queue.get_attempts(job_id)]
    assert history == [(1, "handed_back"), (1, "succeeded")]
    assert queue.get_job(job_id).result == "again"
    from graphiti_mpq import procinfo

    assert not procinfo.is_alive(first_child)
    assert serving.events("barrier_lost")
    assert serving.proc.poll() is None
