"""Every statement the SQLite store runs reads ``jobs`` through an index, whatever the state.

A partial index is used only by a query whose conditions match its own (``jobs_claim_order``
holds pending jobs, ``jobs_owned`` claimed and running ones, ``jobs_finished`` finished ones),
and only when the state is written out, not bound as a parameter: a query that misses would
scan every job, unnoticed on a small test queue and seconds long on a million jobs. So the
statements of a whole workload are captured as they run, and each one's plan is checked.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from graphiti_mpq import JobQueue
from graphiti_mpq.models import AttemptResult, Outcome

#: Plans that do visit the table in order, and stop early: newest jobs first, with a LIMIT.
_ALLOWED_SCANS = ("SELECT * FROM jobs ORDER BY seq DESC LIMIT",)


def _workload(q: JobQueue, owner: int) -> None:
    """Every read and write path of the store, with jobs in every state."""
    for i in range(6):
        q.enqueue("t", {"i": i}, parallel=True, max_retries=0)
    q.enqueue("seq", {}, parallel=False)
    q.enqueue("later", {}, parallel=True, delay=3600)
    running = q.claim(owner, 3, 60.0)
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
    q.retry_dead()
    q.purge(older_than=time.time() + 10)
    q.purge_dead()


class _Recording:
    """The store's own connection, noting each statement's text as the store wrote it (with
    its ``?``: SQLite plans before it sees the values, which a trace callback shows filled in).
    """

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


def _reads_every_job(detail: str) -> bool:
    """A plan step on ``jobs`` (aliased ``j`` in one query) that uses no index at all."""
    words = detail.split()
    return (
        words[:1] in (["SCAN"], ["SEARCH"])
        and words[1:2] in (["jobs"], ["j"])
        and (" USING " not in detail)
    )


def test_no_statement_scans_the_jobs_table(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    q = JobQueue(path).open()
    owner = q.register_process("test", "host", 60.0)
    statements: list[str] = []
    real = q.connection()
    q._conn = _Recording(real, statements)  # type: ignore[assignment]
    try:
        _workload(q, owner)
    finally:
        q._conn = real
        q.close()
    reads = [
        s for s in set(statements) if " jobs" in s and s.startswith(("SELECT", "UPDATE", "DELETE"))
    ]
    assert len(reads) > 20, statements
    conn = sqlite3.connect(path)
    scans = []
    for statement in sorted(reads):
        plan = conn.execute(f"EXPLAIN QUERY PLAN {statement}", (None,) * statement.count("?"))
        details = [row[3] for row in plan]
        if any(_reads_every_job(d) for d in details):
            if not statement.startswith(_ALLOWED_SCANS):
                scans.append((statement, details))
    conn.close()
    assert scans == []
