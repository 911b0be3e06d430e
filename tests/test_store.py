"""The job store's behaviour, on both backends: one suite, run on SQLite and on PostgreSQL.

Every test gets a fresh queue of the backend under test (``store_location``: a file in
tmp_path, or a fresh schema of the PostgreSQL test server). No mocks: crash recovery uses real
child processes. Where a test needs an old timestamp it edits the row with SQL (``raw_sql``),
the way time passing would have left it. What only one backend has (files, WAL, advisory
locks, LISTEN/NOTIFY) is tested in test_storage.py and test_postgres.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from graphiti_mpq import status
from graphiti_mpq.errors import InvalidJobError, UnknownJobError, WrongStateError
from graphiti_mpq.models import AttemptResult, Outcome, QueuedJob
from graphiti_mpq.storage import open_queue
from graphiti_mpq.storage.base import QueueStore

from .backends import count, raw_sql
from .helpers import run_child, wait_until

pytestmark = pytest.mark.timeout(60)

HOST = socket.gethostname()
BASE = 0.1  # the backoff base the tests run with


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def make_queue(store_location: str) -> Iterator[Callable[..., QueueStore]]:
    """Opened queues on the test's queue (each its own connection); all closed at the end."""
    opened: list[QueueStore] = []

    def make(**options: Any) -> QueueStore:
        options.setdefault("backoff_base", BASE)
        q = open_queue(store_location, **options)
        opened.append(q)
        return q

    yield make
    for q in opened:
        q.close()


@pytest.fixture
def q(make_queue: Callable[..., QueueStore]) -> QueueStore:
    return make_queue()


# A process that registers as a serving process, claims, and exits without reporting.
CLAIM_AND_DIE = """
    import json, sys
    from graphiti_mpq.storage import open_queue
    location, host, start = sys.argv[1], sys.argv[2], sys.argv[3] == "start"
    q = open_queue(location)
    owner = q.register_process("supervise", host, 60.0)
    jobs = q.claim(owner, 10, 60.0, start=start)
    if start and jobs and jobs[0].state == "claimed":  # a sequential job: take the barrier
        jobs = q.start_claimed(owner, jobs, 60.0)
    print(json.dumps({"owner": owner, "ids": [j.id for j in jobs]}))
    q.close()
"""


def claim_in_dead_child(location: str, host: str = HOST, start: bool = True) -> dict[str, Any]:
    out = run_child(CLAIM_AND_DIE, location, host, "start" if start else "claim")
    return dict(json.loads(out))


def ids(jobs: list[QueuedJob]) -> list[str]:
    return [j.id for j in jobs]


def _ok() -> AttemptResult:
    return AttemptResult(Outcome.SUCCEEDED)


# -- enqueue and reading back --------------------------------------------------------------


def test_enqueue_get_job_round_trip(q: QueueStore) -> None:
    payload = {"command": ["memory", "add"], "args": ["é", "-x"], "kwargs": {"tag": ["a", "b"]}}
    before = time.time()
    job_id = q.enqueue(
        "memory add",
        payload,
        True,
        priority=3,
        delay=60,
        max_retries=1,
        timeout=2.5,
        dedupe_key="k1",
    )
    job = q.get_job(job_id)
    assert job.id == job_id
    assert (job.job_type, job.payload, job.parallel, job.priority) == (
        "memory add",
        payload,
        True,
        3,
    )
    assert (job.state, job.public_state, job.attempts) == ("pending", "pending", 0)
    assert (job.max_retries, job.timeout, job.dedupe_key) == (1, 2.5, "k1")
    assert before <= job.created_at <= time.time()
    assert job.run_at == pytest.approx(job.created_at + 60)
    assert job.started_at is None and job.finished_at is None and job.last_error is None
    assert job.result is None
    # the JSON shape of the contract
    shown = job.to_json()
    assert shown["state"] == "pending" and shown["run_at"].endswith("+00:00")
    # defaults
    plain = q.get_job(q.enqueue("t", {}))
    assert (plain.parallel, plain.priority, plain.max_retries, plain.timeout) == (
        False,
        0,
        None,
        None,
    )
    assert plain.run_at == plain.created_at
    assert len({job_id, plain.id}) == 2


def test_get_job_unknown_id(q: QueueStore) -> None:
    with pytest.raises(UnknownJobError) as info:
        q.get_job("nope")
    assert "nope" in str(info.value)


def test_enqueue_is_durable_across_connections(make_queue: Callable[..., QueueStore]) -> None:
    a = make_queue()
    job_id = a.enqueue("t", {"x": 1})
    a.close()
    b = make_queue()
    assert b.get_job(job_id).payload == {"x": 1}


# -- order and claiming --------------------------------------------------------------------


def test_claim_order_is_priority_then_enqueue_order(q: QueueStore) -> None:
    spec = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 10), ("g", 0)]
    by_name = {name: q.enqueue(name, {}, True, priority=p) for name, p in spec}
    order = []
    while batch := q.get_batch(1):
        assert len(batch) == 1
        order.append(batch[0].job_type)
        q.ack(batch[0])
    assert order == ["f", "b", "d", "a", "c", "g", "e"]
    assert q.get_stats().succeeded == len(by_name)


def test_a_claimed_job_carries_every_field_as_stored(q: QueueStore) -> None:
    """The claim builds its jobs from the columns it returns, by position: a column out of
    place would hand handlers the wrong payload or the loop the wrong limits."""
    options = {"priority": 3, "max_retries": 7, "timeout": 12.5, "dedupe_key": "k-1"}
    parallel = q.enqueue("par", {"n": [1, "two"]}, True, **options)
    sequential = q.enqueue("seq", {"s": True}, False, priority=1)
    (claimed,) = q.get_batch(5)
    assert claimed.id == parallel and claimed.state == "running" and claimed.attempts == 1
    assert claimed == q.get_job(parallel)  # every field, read back the other way
    assert (claimed.payload, claimed.priority, claimed.max_retries, claimed.timeout) == (
        {"n": [1, "two"]}, 3, 7, 12.5,
    )  # fmt: skip
    assert claimed.dedupe_key == "k-1" and claimed.seq < q.get_job(sequential).seq
    q.ack(claimed)
    (alone,) = q.get_batch(5)
    assert alone.id == sequential and not alone.parallel
    assert alone == q.get_job(sequential)


def test_a_large_batch_is_claimed_and_recorded_whole(q: QueueStore) -> None:
    """Claims and outcomes name their jobs in one statement whatever the batch size."""
    ids = q.enqueue_many([{"job_type": "bulk", "payload": {"i": i}, "parallel": True}
                          for i in range(1500)])  # fmt: skip
    jobs = q.get_batch(2000)
    assert [job.id for job in jobs] == ids and {job.state for job in jobs} == {"running"}
    finished = q.finish([(job, AttemptResult(Outcome.SUCCEEDED, result=job.payload["i"]))
                         for job in jobs])  # fmt: skip
    assert len(finished) == 1500
    assert q.get_stats().succeeded == 1500
    last = q.get_job(ids[-1])
    assert last.result == 1499 and q.get_attempts(last.id)[-1].outcome == "succeeded"


def test_delayed_job_is_skipped_until_due(q: QueueStore) -> None:
    late = q.get_job(q.enqueue("late", {}, True, delay=0.3))
    later = q.enqueue("later", {}, True, delay=3600)
    now = q.enqueue("now", {}, True)
    first = q.get_batch(5)
    assert ids(first) == [now]  # the earlier-enqueued delayed ones are skipped
    q.ack(first[0])
    got = wait_until(lambda: q.get_batch(5), timeout=10, what="the delayed job to fall due")
    assert ids(got) == [late.id]
    assert got[0].started_at is not None and got[0].started_at >= late.run_at
    q.ack(got[0])
    assert q.get_batch(5) == []
    assert q.get_job(later).state == "pending"


def test_get_batch_takes_the_leading_run_of_parallel_jobs(q: QueueStore) -> None:
    p1, p2, p3 = (q.enqueue(f"p{i}", {}, True) for i in (1, 2, 3))
    s4 = q.enqueue("s4", {}, False)
    p5 = q.enqueue("p5", {}, True)

    batch = q.get_batch(10)
    assert ids(batch) == [p1, p2, p3]
    assert all(j.state == "running" and j.attempts == 1 for j in batch)
    # s4 is next: it waits for the running jobs, and p5 does not jump over it
    assert q.get_batch(10) == []
    q.ack(batch[0])
    q.ack(batch[1])
    assert q.get_batch(10) == []
    assert q.get_job(p5).state == "pending"
    q.ack(batch[2])

    seq = q.get_batch(10)
    assert ids(seq) == [s4]
    assert seq[0].state == "running"
    # nothing starts while the sequential job runs
    assert q.get_batch(10) == []
    q.ack(seq[0])
    last = q.get_batch(10)
    assert ids(last) == [p5]
    q.ack(last[0])


def test_get_batch_respects_max_items(q: QueueStore) -> None:
    jobs = [q.enqueue(f"p{i}", {}, True) for i in range(5)]
    assert q.get_batch(0) == []
    assert ids(q.get_batch(2)) == jobs[0:2]
    assert ids(q.get_batch(2)) == jobs[2:4]
    assert ids(q.get_batch(2)) == jobs[4:5]
    assert q.get_batch(2) == []
    assert q.get_stats().running == 5


def test_a_sequential_job_at_the_head_is_claimed_alone(q: QueueStore) -> None:
    s1 = q.enqueue("s1", {})
    p2 = q.enqueue("p2", {}, True)
    s3 = q.enqueue("s3", {})
    batch = q.get_batch(10)
    assert ids(batch) == [s1]
    q.ack(batch[0])
    batch = q.get_batch(10)
    assert ids(batch) == [p2]  # stops before s3
    q.ack(batch[0])
    assert ids(q.get_batch(10)) == [s3]


def test_priority_decides_what_is_ahead_of_a_sequential_job(q: QueueStore) -> None:
    s_low = q.enqueue("s", {}, False, priority=0)
    p_high = q.enqueue("p-high", {}, True, priority=5)
    p_low = q.enqueue("p-low", {}, True, priority=0)
    batch = q.get_batch(10)
    assert ids(batch) == [p_high]  # p_low is behind s_low
    q.ack(batch[0])
    assert ids(q.get_batch(10)) == [s_low]
    assert q.get_job(p_low).state == "pending"


def test_delayed_jobs_do_not_block_the_run(q: QueueStore) -> None:
    q.enqueue("s-delayed", {}, False, delay=3600)
    p1 = q.enqueue("p1", {}, True, delay=3600)
    p2 = q.enqueue("p2", {}, True)
    s3 = q.enqueue("s3", {}, False)
    p4 = q.enqueue("p4", {}, True)
    batch = q.get_batch(10)
    assert ids(batch) == [p2]  # not p1 (not due), not p4 (behind s3)
    q.ack(batch[0])
    assert ids(q.get_batch(10)) == [s3]
    assert q.get_job(p1).state == q.get_job(p4).state == "pending"


def test_nothing_is_claimed_while_a_sequential_job_runs(
    make_queue: Callable[..., QueueStore],
) -> None:
    a, b = make_queue(), make_queue()  # two owners on one database
    s = a.enqueue("s", {})
    running = a.get_batch(1)
    assert ids(running) == [s]
    b.enqueue("p", {}, True, priority=100)
    b.enqueue("s2", {}, False)
    assert b.get_batch(10) == []
    assert a.get_batch(10) == []
    a.ack(running[0])
    assert len(b.get_batch(10)) == 1


def test_nothing_is_claimed_while_a_sequential_job_waits_for_the_barrier(
    make_queue: Callable[..., QueueStore],
) -> None:
    a, b = make_queue(), make_queue()
    s = a.enqueue("s", {})
    p = a.enqueue("p", {}, True)
    owner = a.register_process("supervise", HOST, 60.0)
    claimed = a.claim(owner, 5, 60.0, start=False)
    assert ids(claimed) == [s]
    assert a.get_job(s).state == "claimed"
    assert a.get_job(s).public_state == "pending"
    assert a.get_attempts(s) == []  # no attempt until it starts
    assert b.get_batch(5) == []
    started = a.start_claimed(owner, claimed, 60.0)
    assert ids(started) == [s] and started[0].state == "running"
    assert len(a.get_attempts(s)) == 1
    assert b.get_batch(5) == []
    a.finish([(started[0], _ok())], owner=owner)
    assert ids(b.get_batch(5)) == [p]


def test_a_sequential_job_is_not_claimed_while_any_job_runs(
    make_queue: Callable[..., QueueStore],
) -> None:
    a, b = make_queue(), make_queue()
    p = a.enqueue("p", {}, True)
    running = a.get_batch(1)
    assert ids(running) == [p]
    s = b.enqueue("s", {})
    assert b.get_batch(5) == []
    assert a.get_batch(5) == []
    assert b.get_job(s).state == "pending"
    a.ack(running[0])
    assert ids(b.get_batch(5)) == [s]


# -- outcomes ------------------------------------------------------------------------------


@pytest.mark.parametrize("result", [{"a": [1, "é"]}, [1, 2], "text", 0, False, None])
def test_ack_stores_the_result(q: QueueStore, result: Any) -> None:
    q.enqueue("t", {})
    job = q.get_batch(1)[0]
    q.ack(job, result)
    done = q.get_job(job.id)
    assert done.state == "succeeded"
    assert done.result == result
    assert done.finished_at is not None and done.started_at is not None
    assert done.started_at <= done.finished_at
    attempts = q.get_attempts(job.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "succeeded")]
    assert attempts[0].started_at == done.started_at
    assert attempts[0].finished_at == done.finished_at


def test_ack_of_a_job_that_is_not_running_is_refused(q: QueueStore) -> None:
    job_id = q.enqueue("t", {})
    with pytest.raises(WrongStateError):
        q.ack(q.get_job(job_id))  # never claimed
    job = q.get_batch(1)[0]
    q.ack(job, 1)
    with pytest.raises(WrongStateError):
        q.ack(job, 2)
    with pytest.raises(WrongStateError):
        q.nack(job, "late")
    assert q.get_job(job_id).result == 1
    assert len(q.get_attempts(job_id)) == 1


def test_nack_backs_off_exponentially_then_dead_letters(q: QueueStore) -> None:
    job_id = q.enqueue("flaky", {"n": 1})
    for k in (1, 2, 3):
        job = wait_until(lambda: q.get_batch(1), timeout=10, what=f"attempt {k}")[0]
        assert job.id == job_id and job.attempts == k
        q.nack(job, f"boom {k}")
        row = q.get_job(job_id)
        attempt = q.get_attempts(job_id)[-1]
        assert (attempt.attempt, attempt.outcome, attempt.error) == (k, "failed", f"boom {k}")
        assert attempt.finished_at is not None
        assert row.state == "pending"
        assert row.attempts == k
        assert row.last_error == f"boom {k}"
        assert row.run_at == pytest.approx(attempt.finished_at + BASE * 2 ** (k - 1), abs=1e-6)
        assert q.get_stats().retrying == 1
    job = wait_until(lambda: q.get_batch(1), timeout=10, what="the last attempt")[0]
    assert job.attempts == 4
    q.nack(job, "boom 4")

    dead = q.get_job(job_id)
    assert dead.state == "dead"
    assert dead.last_error == "boom 4"
    attempts = q.get_attempts(job_id)
    assert [a.attempt for a in attempts] == [1, 2, 3, 4]
    # each retry started no earlier than its run_at
    for prev, nxt, k in zip(attempts, attempts[1:], (1, 2, 3), strict=False):
        assert nxt.started_at is not None and prev.finished_at is not None
        assert nxt.started_at >= prev.finished_at + BASE * 2 ** (k - 1) - 1e-6
    letters = q.get_dead_letter_jobs()
    assert [d.id for d in letters] == [job_id]
    assert letters[0].errors == ["boom 1", "boom 2", "boom 3", "boom 4"]
    assert letters[0].failed_at == dead.finished_at
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.dead_letter) == (0, 0, 1)
    assert q.get_batch(1) == []


def test_a_retry_is_not_claimed_before_its_time(make_queue: Callable[..., QueueStore]) -> None:
    q = make_queue(backoff_base=3600.0)
    job_id = q.enqueue("t", {}, True)
    q.nack(q.get_batch(1)[0], "e")
    job = q.get_job(job_id)
    assert job.run_at > time.time() + 3000
    assert q.get_batch(5) == []
    waiting = q.waiting_for(job)
    assert waiting is not None and waiting.reason == "retry"


@pytest.mark.parametrize(("max_retries", "runs"), [(0, 1), (1, 2), (2, 3)])
def test_a_jobs_own_max_retries_wins(
    make_queue: Callable[..., QueueStore], max_retries: int, runs: int
) -> None:
    q = make_queue(max_retries=5, backoff_base=0.0)
    job_id = q.enqueue("t", {}, max_retries=max_retries)
    for k in range(1, runs + 1):
        job = q.get_batch(1)
        assert ids(job) == [job_id], f"run {k}"
        q.nack(job[0], f"e{k}")
    assert q.get_job(job_id).state == "dead"
    assert len(q.get_dead_letter_jobs()[0].errors) == runs


def test_move_to_dead_letter_skips_the_remaining_retries(q: QueueStore) -> None:
    job_id = q.enqueue("t", {}, max_retries=5)
    job = q.get_batch(1)[0]
    q.move_to_dead_letter(job, "fatal: bad input")
    dead = q.get_job(job_id)
    assert (dead.state, dead.attempts, dead.last_error) == ("dead", 1, "fatal: bad input")
    letters = q.get_dead_letter_jobs()
    assert [(d.id, d.errors) for d in letters] == [(job_id, ["fatal: bad input"])]
    assert [(a.attempt, a.outcome) for a in q.get_attempts(job_id)] == [(1, "failed")]
    with pytest.raises(WrongStateError):
        q.move_to_dead_letter(job, "again")


def test_dead_letter_retry_keeps_the_id_and_restarts_attempts(q: QueueStore) -> None:
    job_id = q.enqueue("t", {"p": 1}, max_retries=1)
    for k in (1, 2):
        job = wait_until(lambda: q.get_batch(1), timeout=10, what=f"attempt {k}")[0]
        q.nack(job, f"e{k}")
    assert q.get_job(job_id).state == "dead"

    assert q.retry_dead([job_id]) == [job_id]
    again = q.get_job(job_id)
    assert (again.id, again.state, again.attempts) == (job_id, "pending", 0)
    assert again.run_at <= time.time()
    assert q.get_dead_letter_jobs() == []
    assert q.get_stats().dead_letter == 0

    job = q.get_batch(1)[0]
    assert job.id == job_id and job.attempts == 1
    q.nack(job, "e3")
    job = wait_until(lambda: q.get_batch(1), timeout=10, what="the retried job's retry")[0]
    q.nack(job, "e4")
    history = q.get_attempts(job_id)
    assert [(a.attempt, a.error) for a in history] == [(1, "e1"), (2, "e2"), (1, "e3"), (2, "e4")]
    # the new dead letter holds the errors of the new round only
    assert q.get_dead_letter_jobs()[0].errors == ["e3", "e4"]


def test_dead_letter_retry_of_unknown_or_live_jobs(q: QueueStore) -> None:
    live = q.enqueue("t", {})
    with pytest.raises(UnknownJobError):
        q.retry_dead(["missing"])
    with pytest.raises(WrongStateError):
        q.retry_dead([live])
    assert q.retry_dead(None) == []
    assert q.get_job(live).state == "pending"


def test_dead_letter_retry_all(q: QueueStore) -> None:
    dead = []
    for i in range(3):
        job_id = q.enqueue("t", {"i": i}, True, max_retries=0)
        dead.append(job_id)
    for job in q.get_batch(3):
        q.nack(job, "x")
    keep = q.enqueue("t", {})
    assert sorted(q.retry_dead()) == sorted(dead)
    assert all(q.get_job(i).state == "pending" for i in dead)
    assert q.get_job(keep).state == "pending"


# -- cancel --------------------------------------------------------------------------------


def test_cancel_only_a_pending_job(q: QueueStore) -> None:
    pending = q.enqueue("t", {}, True)
    cancelled = q.cancel(pending)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(WrongStateError):
        q.cancel(pending)
    with pytest.raises(UnknownJobError):
        q.cancel("no-such-job")

    running = q.enqueue("t", {}, True)
    job = q.get_batch(5)
    assert ids(job) == [running]  # the cancelled job was not claimed
    with pytest.raises(WrongStateError) as info:
        q.cancel(running)
    assert "running" in str(info.value)
    q.ack(job[0])
    with pytest.raises(WrongStateError):
        q.cancel(running)
    assert q.get_job(running).state == "succeeded"
    assert q.get_stats().cancelled == 1


# -- dedupe --------------------------------------------------------------------------------


def test_dedupe_while_pending_or_running_then_a_new_job(q: QueueStore) -> None:
    first = q.enqueue("t", {"v": 1}, dedupe_key="k")
    assert q.enqueue("t", {"v": 2}, dedupe_key="k") == first
    other = q.enqueue("t", {}, dedupe_key="other")
    assert other != first
    assert count(q) == 2
    job = q.get_batch(1)[0]
    assert job.id == first
    assert q.enqueue("t", {"v": 3}, dedupe_key="k") == first  # running
    q.ack(job)
    second = q.enqueue("t", {"v": 4}, dedupe_key="k")  # the first one finished
    assert second not in (first, other)
    assert q.get_job(second).payload == {"v": 4}
    q.cancel(second)
    third = q.enqueue("t", {"v": 5}, dedupe_key="k")
    assert third not in (first, second)
    assert count(q) == 4


def test_dedupe_after_dead_and_a_conflicting_dead_letter_retry(q: QueueStore) -> None:
    first = q.enqueue("t", {}, dedupe_key="k", max_retries=0)
    q.nack(q.get_batch(1)[0], "x")
    second = q.enqueue("t", {}, dedupe_key="k")
    assert second != first
    with pytest.raises(WrongStateError):
        q.retry_dead([first])
    # refused as a whole: the dead job is still dead, with its dead-letter entry
    assert q.get_job(first).state == "dead"
    assert [d.id for d in q.get_dead_letter_jobs()] == [first]


# -- enqueue_many --------------------------------------------------------------------------


def test_enqueue_many_in_order_with_dedupe_inside_the_batch(q: QueueStore) -> None:
    got = q.enqueue_many(
        [
            {"job_type": "a", "payload": {"i": 0}},
            {"job_type": "b", "payload": {"i": 1}, "parallel": True, "priority": 2},
            {"job_type": "c", "payload": {"i": 2}, "dedupe_key": "k"},
            {"job_type": "d", "payload": {"i": 3}, "dedupe_key": "k"},
            {"job_type": "e", "payload": {"i": 4}, "delay": 60},
        ]
    )
    assert len(got) == 5 and got[3] == got[2] and len(set(got)) == 4
    jobs = [q.get_job(i) for i in got]
    assert [j.job_type for j in jobs] == ["a", "b", "c", "c", "e"]
    assert jobs[1].parallel and jobs[1].priority == 2
    assert jobs[4].run_at == pytest.approx(jobs[4].created_at + 60)
    assert q.enqueue_many([]) == []
    assert count(q) == 4


def test_enqueue_many_is_all_or_nothing(q: QueueStore) -> None:
    q.enqueue("before", {})
    items = [{"job_type": "ok", "payload": {"i": i}} for i in range(5)]
    items.insert(3, {"job_type": "bad", "payload": {"command": "add", "args": "x"}})
    with pytest.raises(InvalidJobError) as info:
        q.enqueue_many(items)
    assert info.value.field == "jobs[3].payload.args"
    assert "jobs[3].payload.args" in str(info.value)
    assert count(q) == 1


# -- purge ---------------------------------------------------------------------------------


def _finished_jobs(q: QueueStore) -> dict[str, str]:
    """One job in every state; returns {state: id}."""
    made = {
        "succeeded": q.enqueue("ok", {}, True),
        "dead": q.enqueue("bad", {}, True, max_retries=0),
        "cancelled": q.enqueue("gone", {}, True),
    }
    q.cancel(made["cancelled"])
    for job in q.get_batch(5):
        if job.id == made["succeeded"]:
            q.ack(job)
        else:
            q.nack(job, "x")
    made["running"] = q.enqueue("busy", {}, True)
    assert ids(q.get_batch(5)) == [made["running"]]
    made["pending"] = q.enqueue("wait", {}, True, delay=3600)
    return made


def test_purge_deletes_finished_jobs_older_than_the_cutoff(q: QueueStore) -> None:
    made = _finished_jobs(q)
    assert q.purge(3600) == 0
    # age two of them by two hours
    for state in ("succeeded", "dead"):
        raw_sql(
            q,
            "UPDATE jobs SET finished_at = finished_at - 7200 WHERE id = ?",
            (made[state],),
        )
    assert q.purge(3600) == 2
    left = {state for state, job_id in made.items() if _exists(q, job_id)}
    assert left == {"cancelled", "running", "pending"}
    assert count(q, "dead_letter") == 0
    assert (
        raw_sql(
            q,
            "SELECT count(*) FROM attempts WHERE job_id IN (?, ?)",
            (made["succeeded"], made["dead"]),
        )[0][0]
        == 0
    )
    assert q.purge(0) == 1  # the cancelled one; live jobs are never purged
    assert {s for s, i in made.items() if _exists(q, i)} == {"running", "pending"}


def _exists(q: QueueStore, job_id: str) -> bool:
    try:
        q.get_job(job_id)
    except UnknownJobError:
        return False
    return True


def test_purge_dead(q: QueueStore) -> None:
    made = _finished_jobs(q)
    assert q.purge_dead() == 1
    assert not _exists(q, made["dead"])
    assert all(_exists(q, made[s]) for s in ("succeeded", "cancelled", "running", "pending"))
    assert q.get_dead_letter_jobs() == []
    assert count(q, "dead_letter") == 0
    assert q.purge_dead() == 0


# -- counts and status ---------------------------------------------------------------------


def test_get_stats_counts_every_state(make_queue: Callable[..., QueueStore]) -> None:
    q = make_queue(backoff_base=3600.0)
    _finished_jobs(q)  # succeeded, dead, cancelled, running, pending (delayed)
    q.enqueue("due", {}, True)
    retry = q.enqueue("retry", {}, True, priority=9)
    job = q.get_batch(1)[0]
    assert job.id == retry
    q.nack(job, "later")
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.running) == (3, 1, 1)
    assert (stats.succeeded, stats.cancelled, stats.dead_letter) == (1, 1, 1)
    assert q.get_pending_count() == 3
    assert q.count_eligible() == 1  # the delayed job and the retry are not due
    assert q.count_eligible(include_owned=True) == 2


@pytest.mark.parametrize(
    ("capacity", "pending", "health"),
    [
        (5, 0, "ok"),
        (5, 3, "ok"),  # 60 %
        (5, 4, "warning"),  # 80 %
        (5, 5, "error"),  # 100 %
        (5, 6, "error"),
        (100, 79, "ok"),
        (100, 80, "warning"),
        (100, 99, "warning"),
        (100, 100, "error"),
    ],
)
def test_status_health_levels(
    make_queue: Callable[..., QueueStore], capacity: int, pending: int, health: str
) -> None:
    q = make_queue(capacity=capacity)
    # running and finished jobs do not count toward capacity
    q.enqueue("done", {}, True)
    q.ack(q.get_batch(1)[0])
    q.enqueue("run", {}, True)
    q.get_batch(1)
    q.enqueue_many([{"job_type": "t", "payload": {}, "delay": 60} for _ in range(pending)])
    report = status.build_status(q)
    assert report["pending"] == pending
    assert report["capacity"] == capacity
    assert report["health"] == health
    assert status.build_status(q, capacity=10_000)["health"] == "ok"


def test_status_has_every_key(q: QueueStore) -> None:
    q.enqueue("t", {}, max_retries=0)
    q.nack(q.get_batch(1)[0], "x")
    report = status.build_status(q)
    assert set(report) >= {
        "pending",
        "retrying",
        "running",
        "succeeded",
        "cancelled",
        "dead_letter",
        "capacity",
        "health",
        "worker_running",
        "supervisors",
        "dead_letter_jobs",
        "oldest_pending_age",
    }
    assert report["worker_running"] is False  # the API consumer is not a worker
    assert report["supervisors"] == []
    assert [d["errors"] for d in report["dead_letter_jobs"]] == [["x"]]
    json.dumps(report)


def test_oldest_pending_age(q: QueueStore) -> None:
    assert status.build_status(q)["oldest_pending_age"] is None
    old = q.enqueue("old", {})
    young = q.enqueue("young", {}, True)
    raw_sql(q, "UPDATE jobs SET created_at = created_at - 100 WHERE id = ?", (old,))
    age = status.build_status(q)["oldest_pending_age"]
    assert 100 <= age < 110
    # a sequential job claimed but waiting for the barrier is still pending
    owner = q.register_process("supervise", HOST, 60.0)
    claimed = q.claim(owner, 1, 60.0, start=False)
    assert ids(claimed) == [old]
    assert 100 <= status.build_status(q)["oldest_pending_age"] < 110
    started = q.start_claimed(owner, claimed, 60.0)
    q.finish([(started[0], _ok())], owner=owner)
    age = status.build_status(q)["oldest_pending_age"]
    assert 0 <= age < time.time() - q.get_job(young).created_at + 1
    assert age < 50
    q.cancel(young)
    assert status.build_status(q)["oldest_pending_age"] is None


class _Sql:
    """Raw SQL on one connection of its own to the queue's database (autocommit), for a test
    that reads behind the store's back hundreds of times."""

    def __init__(self, q: QueueStore) -> None:
        self.backend = q.backend
        if q.backend == "sqlite":
            self.conn: Any = sqlite3.connect(q.location, isolation_level=None)
        else:
            from graphiti_mpq.storage.pg_conn import connect, parse_location

            self.conn = connect(parse_location(q.location), "test")

    def __call__(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.backend != "sqlite":
            statement = statement.replace("?", "%s")
        cursor = self.conn.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []

    def close(self) -> None:
        self.conn.close()


def _scanned_stats(sql: _Sql) -> dict[str, int]:
    """The counts of get_stats, by a full scan of the jobs table."""
    rows = sql("SELECT state, attempts > 0, count(*) FROM jobs GROUP BY state, attempts > 0")
    by_state: dict[str, int] = {}
    for state, _, n in rows:
        by_state[state] = by_state.get(state, 0) + n
    return {
        "pending": by_state.get("pending", 0) + by_state.get("claimed", 0),
        "retrying": sum(n for state, tried, n in rows if state == "pending" and tried),
        "running": by_state.get("running", 0),
        "succeeded": by_state.get("succeeded", 0),
        "cancelled": by_state.get("cancelled", 0),
        "dead_letter": by_state.get("dead", 0),
    }


def _kept_stats(q: QueueStore) -> dict[str, int]:
    stats = q.get_stats()
    return {
        key: getattr(stats, key)
        for key in ("pending", "retrying", "running", "succeeded", "cancelled", "dead_letter")
    }


def _op_enqueue(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    q.enqueue("t", {}, rng.random() < 0.7, priority=rng.randint(0, 2))


def _op_enqueue_many(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    count = rng.randint(0, 5)
    q.enqueue_many([{"job_type": "t", "payload": {}, "parallel": True} for _ in range(count)])


def _op_enqueue_dedupe(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    q.enqueue("t", {}, True, dedupe_key=f"k{rng.randint(0, 3)}")


def _op_claim_and_finish(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    for job in q.get_batch(rng.randint(1, 3)):
        how = rng.choice([q.ack, q.nack, q.move_to_dead_letter])
        if how == q.ack:
            q.ack(job)
        else:
            how(job, "failed")


def _op_hand_back(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    jobs = q.claim(owner, 2, 60.0)
    if jobs and jobs[0].state == "claimed":
        jobs = q.start_claimed(owner, jobs, 60.0)
    q.finish([(job, AttemptResult(Outcome.HANDED_BACK)) for job in jobs], owner=owner)


def _op_claim_release(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    q.release_claimed(owner, q.claim(owner, 2, 60.0, start=False))


def _op_lease_lost(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    for job in q.claim(owner, 2, 60.0, start=rng.random() < 0.5):
        sql("UPDATE jobs SET lease_until = 0 WHERE id = ?", (job.id,))
    q.recover("another-host", kill=lambda row: None, max_retries=1, backoff_base=0.0)


def _op_cancel(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    pending = q.list_jobs("pending", limit=5)
    if pending:
        with contextlib.suppress(WrongStateError):  # claimed (starting): not cancellable
            q.cancel(rng.choice(pending).id)


def _op_retry_dead(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    dead = q.list_jobs("dead", limit=3)
    with contextlib.suppress(WrongStateError):  # its dedupe key belongs to a live job now
        if rng.random() < 0.3:
            q.retry_dead()
        elif dead:
            q.retry_dead([dead[0].id])


def _op_purge(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    if rng.random() < 0.5:
        q.purge(0.0)
    else:
        q.purge_dead()


def _op_spool(q: QueueStore, sql: _Sql, rng: Any, owner: int) -> None:
    if q.backend == "sqlite":  # PostgreSQL has no spool
        from graphiti_mpq.storage import insert, spool

        spool.write(q.location, [insert.prepare_row("t", {}, True) for _ in range(2)])
        q.ingest_spool()


#: The store's whole write surface, as random operations for the counts test.
_OPERATIONS = [
    _op_enqueue,
    _op_enqueue_many,
    _op_enqueue_dedupe,
    _op_claim_and_finish,
    _op_claim_and_finish,
    _op_hand_back,
    _op_claim_release,
    _op_lease_lost,
    _op_cancel,
    _op_retry_dead,
    _op_purge,
    _op_spool,
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kept_counts_match_a_full_scan_after_random_operations(
    make_queue: Callable[..., QueueStore], seed: int
) -> None:
    import random

    rng = random.Random(seed)
    q = make_queue(max_retries=1)
    owner = q.register_process("supervise", HOST, 60.0)
    sql = _Sql(q)
    done = set()
    try:
        for _ in range(150):
            operation = rng.choice(_OPERATIONS)
            operation(q, sql, rng, owner)
            done.add(operation.__name__)
            sql("UPDATE jobs SET run_at = run_at - 1 WHERE state = 'pending'")  # retries fall due
            scanned = _scanned_stats(sql)
            assert _kept_stats(q) == scanned, sorted(done)
            assert q.get_pending_count() == scanned["pending"]
    finally:
        sql.close()
    assert len(done) == len(set(_OPERATIONS))


def test_counts_stay_few_rows_however_many_writes(q: QueueStore) -> None:
    for _ in range(100):
        q.enqueue("t", {}, True)
    q.ack(q.get_batch(1)[0])
    stats = q.get_stats()
    assert (stats.pending, stats.succeeded) == (99, 1)
    q.get_stats()  # PostgreSQL folds the deltas the triggers appended
    assert count(q, "job_counts") <= 8


# -- crash recovery ------------------------------------------------------------------------


class KillRecorder:
    """The ``kill`` callback: records each row and what the database said at that moment."""

    def __init__(self, queue: QueueStore) -> None:
        self.queue = queue
        self.rows: list[dict[str, Any]] = []
        self.state_seen: list[str] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self.state_seen.append(
            raw_sql(self.queue, "SELECT state FROM jobs WHERE id = ?", (row["id"],))[0][0]
        )


def test_a_job_of_a_dead_local_owner_is_recovered_at_once(q: QueueStore) -> None:
    job_id = q.enqueue("t", {}, True, max_retries=2)
    child = claim_in_dead_child(q.location)
    assert child["ids"] == [job_id]
    running = q.get_job(job_id)
    assert running.state == "running" and running.owner == child["owner"]
    assert running.attempts == 1

    kill = KillRecorder(q)
    recovered = q.recover(HOST, kill=kill)  # long before its 60 s lease ends
    assert [r.job.id for r in recovered] == [job_id]
    assert recovered[0].was_running
    assert recovered[0].finished is not None and recovered[0].finished.disposition == "retry"
    # kill() saw the row before the job was touched
    assert [r["id"] for r in kill.rows] == [job_id]
    assert kill.state_seen == ["running"]
    assert kill.rows[0]["owner"] == child["owner"] and kill.rows[0]["owner_host"] == HOST

    job = q.get_job(job_id)
    assert (job.state, job.attempts, job.owner) == ("pending", 1, None)
    assert job.last_error is not None and "lost" in job.last_error
    attempts = q.get_attempts(job_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "lost")]
    assert "died" in (attempts[0].error or "")
    # the dead owner no longer counts as serving the queue
    assert all(p.id != child["owner"] for p in q.list_processes())
    assert q.recover(HOST, kill=kill) == []


def test_a_job_that_kills_its_worker_every_time_ends_dead(q: QueueStore) -> None:
    job_id = q.enqueue("t", {}, max_retries=2)
    for k in (1, 2, 3):
        child = claim_in_dead_child(q.location)
        assert child["ids"] == [job_id], f"run {k}"
        recovered = q.recover(HOST, kill=lambda row: None, backoff_base=0.0)
        assert [r.job.id for r in recovered] == [job_id]
    job = q.get_job(job_id)
    assert (job.state, job.attempts) == ("dead", 3)
    assert [a.outcome for a in q.get_attempts(job_id)] == ["lost"] * 3
    errors = q.get_dead_letter_jobs()[0].errors
    assert len(errors) == 3 and all(e.startswith("lost") for e in errors)


def test_a_claimed_job_that_never_started_goes_back_without_an_attempt(q: QueueStore) -> None:
    job_id = q.enqueue("t", {}, False)
    child = claim_in_dead_child(q.location, start=False)
    assert child["ids"] == [job_id]
    assert q.get_job(job_id).state == "claimed"
    assert q.get_batch(1) == []  # it holds the barrier
    kill = KillRecorder(q)
    recovered = q.recover(HOST, kill=kill)
    assert [(r.job.id, r.was_running, r.finished) for r in recovered] == [(job_id, False, None)]
    assert kill.state_seen == ["claimed"]
    job = q.get_job(job_id)
    assert (job.state, job.attempts, job.owner) == ("pending", 0, None)
    assert q.get_attempts(job_id) == []
    again = q.get_batch(1)
    assert ids(again) == [job_id] and again[0].attempts == 1


def test_a_job_of_another_host_is_recovered_only_when_its_lease_passes(
    make_queue: Callable[..., QueueStore],
) -> None:
    q = make_queue()
    job_id = q.enqueue("t", {}, True)
    # the owner runs elsewhere: its pid means nothing here, only the lease counts
    owner = q.register_process("supervise", "other-host", 1.0)
    claimed = q.claim(owner, 1, 1.0)
    assert ids(claimed) == [job_id]
    lease_until = raw_sql(q, "SELECT lease_until FROM jobs WHERE id = ?", (job_id,))[0][0]
    kill = KillRecorder(q)
    assert time.time() < lease_until
    assert q.recover(HOST, kill=kill) == []
    assert kill.rows == []
    recovered = wait_until(lambda: q.recover(HOST, kill=kill), timeout=10, what="lease expiry")
    assert time.time() >= lease_until
    assert [r.job.id for r in recovered] == [job_id]
    assert kill.state_seen == ["running"] and kill.rows[0]["owner_host"] == "other-host"
    attempt = q.get_attempts(job_id)[-1]
    assert attempt.outcome == "lost" and "lease" in (attempt.error or "")
    assert q.get_job(job_id).state == "pending"


def test_a_dead_pid_on_another_host_is_not_proof_of_death(q: QueueStore) -> None:
    job_id = q.enqueue("t", {}, True)
    child = claim_in_dead_child(q.location, host="other-host")
    assert child["ids"] == [job_id]
    assert q.recover(HOST, kill=lambda row: pytest.fail("must not kill")) == []
    assert q.get_job(job_id).state == "running"


def test_a_live_local_owner_keeps_its_jobs(make_queue: Callable[..., QueueStore]) -> None:
    a, b = make_queue(), make_queue()
    job_id = a.enqueue("t", {}, True)
    owner = a.register_process("supervise", HOST, 60.0)  # this very process: alive
    assert ids(a.claim(owner, 1, 60.0)) == [job_id]
    assert b.recover(HOST, kill=lambda row: pytest.fail("must not kill")) == []
    assert a.get_job(job_id).state == "running"


def test_a_late_ack_does_not_finish_the_next_owners_attempt(
    make_queue: Callable[..., QueueStore],
) -> None:
    slow, other = make_queue(), make_queue()
    job_id = slow.enqueue("t", {}, True)
    owner = slow.register_process("api", "other-host", 0.5)
    stale = slow.claim(owner, 1, 0.5)
    assert ids(stale) == [job_id]
    wait_until(lambda: other.recover(HOST, kill=lambda row: None), timeout=10, what="lease expiry")
    rerun = wait_until(lambda: other.get_batch(1), timeout=10, what="the retry")
    assert ids(rerun) == [job_id] and rerun[0].attempts == 2
    with pytest.raises(WrongStateError):
        slow.ack(stale[0], "late")
    assert other.get_job(job_id).state == "running"
    other.ack(rerun[0], "fresh")
    done = other.get_job(job_id)
    assert (done.state, done.result) == ("succeeded", "fresh")
    assert [a.outcome for a in other.get_attempts(job_id)] == ["lost", "succeeded"]
