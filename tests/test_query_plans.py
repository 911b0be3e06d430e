"""Every statement the SQLite store runs reads ``jobs`` through an index, whatever the state.

A partial index is used only by a query whose conditions match its own (``jobs_claim_order``
holds pending jobs, ``jobs_owned`` claimed and running ones, ``jobs_finished`` finished ones),
and only when the state is written out, not bound as a parameter: a query that misses would
read every job, unnoticed on a small test queue and seconds long on a million jobs. So the
statements of a whole workload are captured as the store writes them, on both of its
connections, and each one's plan is checked.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from graphiti_mpq import JobQueue
from graphiti_mpq.models import AttemptResult, Outcome
from graphiti_mpq.storage import insert, spool

#: Plans that do walk the whole table, and stop early: newest jobs first, with a LIMIT.
_ALLOWED_SCANS = ("SELECT * FROM jobs ORDER BY seq DESC LIMIT",)
#: Indexes that hold every job: walking one whole is as bad as a table scan.
_FULL_INDEXES = ("jobs_id", "jobs_state_seq")
_ALIAS = re.compile(r"\bjobs\s+(?:AS\s+)?(?!WHERE|ORDER|INDEXED|LEFT|JOIN|SET|LIMIT)(\w+)", re.I)


class _Recording:
    """One of the store's connections, noting each statement's text as the store wrote it
    (with its ``?``: SQLite plans before it sees the values, which a trace callback would show
    filled in)."""

    def __init__(self, conn: sqlite3.Connection, statements: list[str]) -> None:
        self._conn = conn
        self._statements = statements

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._statements.append(sql)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:
        self._statements.append(sql)
        return self._conn.executemany(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _workload(q: JobQueue, owner: int) -> None:
    """Every read and write path of the store, with jobs in every state."""
    for i in range(6):
        q.enqueue("t", {"i": i}, parallel=True, max_retries=0)
    q.enqueue("t", {}, parallel=True, dedupe_key="k")
    q.enqueue("t", {}, parallel=True, dedupe_key="k")  # a live duplicate: the existing id
    q.enqueue_many([{"job_type": "t", "payload": {}, "parallel": True, "dedupe_key": "k2"}] * 2)
    spool.write(q.location, [insert.prepare_row("t", {"spooled": True}, True)])
    q.ingest_spool()
    q.enqueue("seq", {}, parallel=False)
    q.enqueue("later", {}, parallel=True, delay=3600)
    running = q.claim(owner, 3, 60.0)
    q.record_processes([(running[2], 1, 1)])
    q.finish(
        [
            (running[0], AttemptResult(Outcome.SUCCEEDED)),
            (running[1], AttemptResult(Outcome.FAILED, error="boom")),
        ],
        owner=owner,
    )
    q.cancel(q.list_jobs("pending")[0].id)
    for state in (None, "pending", "running", "succeeded", "dead", "cancelled"):
        q.list_jobs(state)
    q.get_stats()
    q.get_pending_count()
    q.count_eligible(include_owned=True)
    q.next_run_at()
    q.next_run_at(retries_only=True)
    for job in q.list_jobs("pending"):
        q.waiting_for(job)
    q.get_dead_letter_jobs()
    q.recover("host", kill=lambda row: None, exclude_owner=owner)
    q.finish([(running[2], AttemptResult(Outcome.SUCCEEDED))], owner=owner)
    while claimed := q.claim(owner, 50, 60.0):  # down to the sequential job, claimed alone
        if claimed[0].state == "claimed":
            break
        q.finish([(job, AttemptResult(Outcome.SUCCEEDED)) for job in claimed], owner=owner)
    assert [job.job_type for job in claimed] == ["seq"], claimed
    q.start_claimed(owner, claimed, 60.0)
    q.release_claimed(owner, claimed)
    q.retry_dead()
    q.purge(older_than=time.time() + 10)
    q.purge_dead()


def _reads_every_job(detail: str, names: set[str]) -> bool:
    """A plan step that walks the whole ``jobs`` table (under any of its names) or a whole
    index that holds every job."""
    words = detail.replace("SCAN TABLE ", "SCAN ").split()  # (the wording before 3.36)
    if words[:1] not in (["SCAN"], ["SEARCH"]) or words[1:2] not in [[n] for n in names]:
        return False
    if words[0] == "SEARCH":
        return " USING " not in detail
    return " USING " not in detail or any(f"INDEX {index}" in detail for index in _FULL_INDEXES)


def test_no_statement_reads_every_job(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    q = JobQueue(path).open()
    owner = q.register_process("test", "host", 60.0)
    q.enqueue(
        "warm-up", {}, parallel=True
    )  # opens the enqueue connection, so it can be recorded too
    statements: list[str] = []
    conns = q._conn, q._enqueue_conn
    q._conn = _Recording(conns[0], statements)  # type: ignore[arg-type,assignment]
    q._enqueue_conn = _Recording(conns[1], statements)  # type: ignore[arg-type,assignment]
    try:
        _workload(q, owner)
    finally:
        q._conn, q._enqueue_conn = conns
        q.close()
    reads = sorted(
        {s for s in statements if re.search(r"\bjobs\b", s) and not s.upper().startswith("PRAGMA")}
    )
    assert len(reads) > 25, statements
    conn = sqlite3.connect(path)
    scans = []
    by_age = []
    for statement in reads:
        names = {"jobs", *_ALIAS.findall(statement)}
        plan = conn.execute(f"EXPLAIN QUERY PLAN {statement}", (None,) * statement.count("?"))
        details = [row[3] for row in plan]
        if any(_reads_every_job(d, names) for d in details):
            if not statement.startswith(_ALLOWED_SCANS):
                scans.append((statement, details))
        if "finished_at < ?" in statement:
            by_age.append(any("INDEX jobs_finished (finished_at<?)" in d for d in details))
    conn.close()
    assert scans == []
    # A purge by age reads only what finished before the cutoff, not every finished job (a
    # search of jobs_state_seq by state, which the check above lets pass).
    assert by_age and all(by_age), by_age
