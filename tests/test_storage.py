"""What only the SQLite store (JobQueue) has: its files, WAL, schema versions, indexes, busy
database. Real database files and real processes, no mocks.

The store's behaviour (claims, the barrier rule, outcomes, retries, dedupe, recovery...) is
tested on both backends by test_store.py.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq.errors import (
    DatabaseBusyError,
    DatabaseError,
    SchemaTooNewError,
)
from graphiti_mpq.models import AttemptResult, Outcome, QueuedJob
from graphiti_mpq.storage import schema, sqlite_conn
from graphiti_mpq.storage.sqlite import JobQueue

from .helpers import child_env, schema_v2_queue, wait_until

pytestmark = pytest.mark.timeout(60)

HOST = socket.gethostname()
BASE = 0.1  # the backoff base the tests run with


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def make_queue(queue_path: str) -> Iterator[Callable[..., JobQueue]]:
    """Opened queues on ``queue_path`` (or another path); all closed at the end."""
    opened: list[JobQueue] = []

    def make(path: str | None = None, **options: Any) -> JobQueue:
        options.setdefault("backoff_base", BASE)
        q = JobQueue(path or queue_path, **options)
        opened.append(q)
        return q.open()

    yield make
    for q in opened:
        q.close()


@pytest.fixture
def q(make_queue: Callable[..., JobQueue]) -> JobQueue:
    return make_queue()


def sql(path: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a separate connection (committed at once)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


def count(path: str, table: str = "jobs") -> int:
    return int(sql(path, f"SELECT count(*) FROM {table}")[0][0])


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def ids(jobs: list[QueuedJob]) -> list[str]:
    return [j.id for j in jobs]


# -- files, modes, WAL ---------------------------------------------------------------------


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Permissions must not depend on a kind umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("no_umask")
def test_created_folders_are_0700_and_the_database_files_0600(
    tmp_path: Path, make_queue: Callable[..., JobQueue]
) -> None:
    path = tmp_path / "state" / "graphiti_mpq" / "queue.db"
    q = make_queue(str(path))
    q.enqueue("t", {})
    assert _mode(tmp_path / "state") == 0o700
    assert _mode(tmp_path / "state" / "graphiti_mpq") == 0o700
    assert _mode(path) == 0o600
    for suffix in ("-wal", "-shm"):  # present while the queue is open
        assert _mode(str(path) + suffix) == 0o600
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    make_queue(str(existing / "q.db"))
    assert _mode(existing) == 0o755
    assert _mode(existing / "q.db") == 0o600


def test_wal_mode_and_busy_timeout(make_queue: Callable[..., JobQueue], queue_path: str) -> None:
    q = make_queue(busy_timeout=1.5)
    assert sql(queue_path, "PRAGMA journal_mode")[0][0] == "wal"
    assert q.connection().execute("PRAGMA busy_timeout").fetchone()[0] == 1500


# -- schema versions and files that are not ours -------------------------------------------


def _make_db(path: str, *statements: str, wal: bool = False) -> bytes:
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    for statement in statements:
        conn.execute(statement)
    conn.close()
    return file_bytes(path)


def _siblings(path: str) -> list[str]:
    folder, name = os.path.split(path)
    return sorted(n for n in os.listdir(folder) if n.startswith(name) and n != name)


def test_schema_versions_agree() -> None:
    assert sqlite_conn.SCHEMA_VERSION == schema.SCHEMA_VERSION
    assert sorted(schema.MIGRATIONS) == list(range(1, schema.SCHEMA_VERSION + 1))


@pytest.mark.parametrize("wal", [False, True])
def test_a_newer_schema_is_refused_and_left_as_it_was(queue_path: str, wal: bool) -> None:
    newer = schema.SCHEMA_VERSION + 1
    before = _make_db(
        queue_path,
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT, future_column TEXT)",
        "INSERT INTO jobs (id, future_column) VALUES ('j1', 'x')",
        f"PRAGMA user_version = {newer}",
        wal=wal,
    )
    q = JobQueue(queue_path)
    with pytest.raises(SchemaTooNewError) as info:
        q.open()
    assert str(newer) in str(info.value) and queue_path in str(info.value)
    assert "upgrade" in str(info.value)
    with pytest.raises(SchemaTooNewError):
        q.enqueue("t", {})
    q.close()
    assert file_bytes(queue_path) == before
    assert _siblings(queue_path) == []


def test_an_empty_file_is_migrated(queue_path: str, make_queue: Callable[..., JobQueue]) -> None:
    Path(queue_path).touch()
    q = make_queue()
    assert sql(queue_path, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION
    tables = {r[0] for r in sql(queue_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables >= {"jobs", "attempts", "dead_letter", "processes"}
    assert q.get_job(q.enqueue("t", {})).state == "pending"


def test_a_version_0_database_is_upgraded_in_place(
    queue_path: str, make_queue: Callable[..., JobQueue]
) -> None:
    _make_db(queue_path, "CREATE TABLE scratch (x)", "DROP TABLE scratch")
    assert os.path.getsize(queue_path) > 0
    assert sql(queue_path, "PRAGMA user_version")[0][0] == 0
    q = make_queue()
    assert sql(queue_path, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION
    assert sql(queue_path, "PRAGMA journal_mode")[0][0] == "wal"
    job_id = q.enqueue("t", {})
    assert q.get_job(job_id).state == "pending"


def _make_v1_queue(path: str) -> None:
    """A queue database exactly as schema version 1 left it, with jobs in every state."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    schema.MIGRATIONS[1](conn)
    conn.execute("PRAGMA user_version = 1")
    now = time.time()
    jobs = [
        # (id, state, attempts, parallel)
        ("p1", "pending", 0, 1),
        ("p2", "pending", 0, 0),
        ("r1", "pending", 2, 1),  # a retry
        ("c1", "claimed", 0, 0),
        ("u1", "running", 1, 1),
        ("s1", "succeeded", 1, 1),
        ("s2", "succeeded", 3, 1),
        ("d1", "dead", 4, 1),
        ("x1", "cancelled", 0, 1),
    ]
    for offset, (job_id, state, attempts, parallel) in enumerate(jobs):
        conn.execute(
            "INSERT INTO jobs (id, job_type, payload, parallel, priority, state, attempts,"
            " run_at, created_at, round) VALUES (?, 't', '{}', ?, 0, ?, ?, ?, ?, 0)",
            (job_id, parallel, state, attempts, now, now - 100 + offset),
        )
        for attempt in range(1, attempts + 1):
            conn.execute(
                "INSERT INTO attempts (job_id, round, attempt, started_at, outcome)"
                " VALUES (?, 0, ?, ?, 'failed')",
                (job_id, attempt, now),
            )
    conn.execute(
        "INSERT INTO dead_letter (job_id, failed_at, errors) VALUES ('d1', ?, '[\"boom\"]')",
        (now,),
    )
    conn.execute("COMMIT")
    conn.close()


def test_a_version_1_database_is_upgraded_in_place(
    queue_path: str, make_queue: Callable[..., JobQueue]
) -> None:
    _make_v1_queue(queue_path)
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' AND name <> 'job_counts'"
    before = {
        table: sql(queue_path, f"SELECT * FROM {table} ORDER BY 1")
        for (table,) in sql(queue_path, tables)
    }
    assert sql(queue_path, "PRAGMA user_version")[0][0] == 1
    q = make_queue()
    assert sql(queue_path, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION == 3
    after = {
        table: sql(queue_path, f"SELECT * FROM {table} ORDER BY 1")
        for (table,) in sql(queue_path, tables)
    }
    assert after == before  # the data is intact
    listed = {state: [j.id for j in q.list_jobs(state)] for state in schema.COUNT_KEYS[:6]}
    assert listed == {
        "pending": ["c1", "r1", "p2", "p1"],  # newest first, the claimed one included
        "claimed": ["c1"],
        "running": ["u1"],
        "succeeded": ["s2", "s1"],
        "dead": ["d1"],
        "cancelled": ["x1"],
    }
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.running) == (4, 1, 1)
    assert (stats.succeeded, stats.cancelled, stats.dead_letter) == (2, 1, 1)
    assert stats.oldest_pending_at == pytest.approx(before["jobs"][0][12])  # p1.created_at
    assert [d.job.id for d in q.get_dead_letter_jobs()] == ["d1"]
    # and the kept counts follow what happens next
    q.cancel("p2")
    q.retry_dead(["d1"])
    q.enqueue("t", {})
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.cancelled, stats.dead_letter) == (5, 1, 2, 0)
    q.close()
    again = make_queue()  # already current: opened without migrating
    assert again.get_stats() == stats


def test_a_version_2_database_gets_the_cheaper_finished_index_and_purges_as_before(
    queue_path: str, make_queue: Callable[..., JobQueue]
) -> None:
    conn = schema_v2_queue(queue_path)
    now = time.time()
    for job_id, state, finished_at in [
        ("old_done", "succeeded", now - 1000),
        ("old_dead", "dead", now - 1000),
        ("old_cancelled", "cancelled", now - 1000),
        ("new_done", "succeeded", now),
        ("waiting", "pending", None),
    ]:
        conn.execute(
            "INSERT INTO jobs (id, job_type, payload, state, run_at, created_at, finished_at)"
            " VALUES (?, 't', '{}', ?, ?, ?, ?)",
            (job_id, state, now, now - 2000, finished_at),
        )
    conn.execute("COMMIT")
    conn.close()
    index_sql = "SELECT sql FROM sqlite_master WHERE name = 'jobs_finished'"
    assert "state IN" in sql(queue_path, index_sql)[0][0]

    q = make_queue()
    assert sql(queue_path, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION == 3
    assert "finished_at IS NOT NULL" in sql(queue_path, index_sql)[0][0]
    assert q.purge(older_than=500) == 3
    remaining = {r[0]: r[1] for r in sql(queue_path, "SELECT id, state FROM jobs")}
    assert remaining == {"new_done": "succeeded", "waiting": "pending"}
    assert q.get_stats().succeeded == 1


def test_migration_is_idempotent_across_opens(
    queue_path: str, make_queue: Callable[..., JobQueue]
) -> None:
    a = make_queue()
    job_id = a.enqueue("t", {})
    a.close()
    b = make_queue()
    assert b.get_job(job_id).state == "pending"
    assert sql(queue_path, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION


@pytest.mark.parametrize(
    "statements",
    [
        pytest.param(
            ("CREATE TABLE notes (body TEXT)", "INSERT INTO notes VALUES ('keep me')"),
            id="other-tables",
        ),
        pytest.param(
            ("CREATE TABLE jobs (name TEXT)", "INSERT INTO jobs VALUES ('keep me')"),
            id="its-own-jobs-table",
        ),
    ],
)
def test_a_database_of_another_app_is_refused_and_left_unchanged(
    queue_path: str, statements: tuple[str, ...]
) -> None:
    before = _make_db(queue_path, *statements)
    q = JobQueue(queue_path)
    with pytest.raises(DatabaseError) as info:
        q.open()
    q.close()
    assert "something else" in str(info.value) and queue_path in str(info.value)
    assert file_bytes(queue_path) == before
    assert _siblings(queue_path) == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a database\n" * 200, id="text"),
        pytest.param(bytes(range(256)) * 16, id="binary"),
        pytest.param(b"SQLite format 3\x00" + b"\x07" * 5000, id="corrupt-header"),
    ],
)
def test_a_garbage_file_is_refused_and_left_byte_identical(queue_path: str, content: bytes) -> None:
    Path(queue_path).write_bytes(content)
    q = JobQueue(queue_path)
    with pytest.raises(DatabaseError) as info:
        q.open()
    q.close()
    message = str(info.value)
    assert queue_path in message and "not a graphiti_mpq queue database" in message
    assert "\n" not in message
    assert not isinstance(info.value, DatabaseBusyError | SchemaTooNewError)
    assert file_bytes(queue_path) == content
    assert _siblings(queue_path) == []


def test_a_directory_path_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "adir"
    folder.mkdir()
    q = JobQueue(str(folder))
    with pytest.raises(DatabaseError) as info:
        q.enqueue("t", {})
    q.close()
    assert "is a directory" in str(info.value)
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_a_path_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    q = JobQueue(str(blocker / "queue.db"))
    with pytest.raises(DatabaseError) as info:
        q.open()
    q.close()
    assert "cannot create" in str(info.value)
    assert blocker.read_text() == "x"


# -- indexes -------------------------------------------------------------------------------


def test_indexes_exist_and_the_claim_query_uses_the_partial_index(q: JobQueue) -> None:
    names = {r[0] for r in sql(q.location, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert names >= {
        "jobs_id",
        "jobs_claim_order",
        "jobs_state_seq",
        "jobs_owned",
        "jobs_dedupe_live",
        "jobs_finished",
        "attempts_job",
    }
    # enough rows in several states for the planner to matter
    q.enqueue_many(
        [{"job_type": "t", "payload": {}, "parallel": True, "priority": i % 3} for i in range(500)]
    )
    for job in q.get_batch(200):
        q.ack(job)

    # capture the real claim statement the store runs, then ask SQLite how it runs it
    statements: list[str] = []
    conn = q.connection()
    conn.set_trace_callback(statements.append)
    try:
        assert len(q.get_batch(5)) == 5
    finally:
        conn.set_trace_callback(None)
    claim = [
        s
        for s in statements
        if s.lstrip().upper().startswith("SELECT") and "ORDER BY" in s.upper() and "pending" in s
    ]
    assert len(claim) == 1, statements
    plan = " | ".join(str(r[-1]) for r in sql(q.location, "EXPLAIN QUERY PLAN " + claim[0]))
    assert "jobs_claim_order" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort: the index gives the order


# -- a busy database -----------------------------------------------------------------------

HOLD_WRITE_LOCK = """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
    conn.execute("ROLLBACK")
    conn.close()
"""


def test_a_database_locked_by_another_process_raises_busy_quickly(
    make_queue: Callable[..., JobQueue],
) -> None:
    q = make_queue(busy_timeout=0.2)
    q.enqueue("t", {}, True)
    assert q.get_batch(0) == [] and q.get_batch(1)  # registers the API owner
    q.enqueue("t2", {}, True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_WRITE_LOCK), q.location],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        for what, action in [
            ("get_batch", lambda: q.get_batch(1)),
            ("cancel", lambda: q.cancel("anything")),
        ]:
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError) as info:
                action()
            elapsed = time.monotonic() - started
            assert 0.15 <= elapsed < 3.0, (what, elapsed)
            assert q.location in str(info.value), what
        # readers are not blocked by a writer (WAL)
        assert q.get_stats().pending == 1
        # enqueue does not fail: it spools within the enqueue wait (tests/test_spool.py)
        started = time.monotonic()
        spooled = q.enqueue("t3", {})
        assert time.monotonic() - started < 1.0
        assert len(spooled) == 28 and q.ingest_spool() == 0  # still locked
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert holder.returncode == 0
    # the queue is usable again and nothing half-done was left behind
    assert count(q.location) == 2
    q.enqueue("t3", {}, True)
    assert len(q.get_batch(5)) == 2


HOLD_THEN_STAMP = """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    released = time.time()  # read before the lock goes: every later holder is after it
    conn.execute("ROLLBACK")
    print(repr(released), flush=True)
    conn.close()
"""


def test_a_claim_that_waited_for_the_lock_is_stamped_after_it_got_it(
    make_queue: Callable[..., JobQueue],
) -> None:
    """started_at must not predate a commit (another process's ack, say) the claim waited for.

    Otherwise recorded attempt times show a job starting before the job it waited for ended.
    """
    q = make_queue(busy_timeout=20.0)
    job_id = q.enqueue("t", {}, True)
    assert q.get_batch(0) == []  # registers the API owner now, not under the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_THEN_STAMP), q.location],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    begun = threading.Event()

    def trace(statement: str) -> None:
        if statement.startswith("BEGIN IMMEDIATE"):
            begun.set()

    conn = q.connection()
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        conn.set_trace_callback(trace)
        with ThreadPoolExecutor(max_workers=1) as pool:
            claim = pool.submit(q.get_batch, 1)
            wait_until(begun.is_set, timeout=10, what="the claim to ask for the write lock")
            holder.stdin.write("release\n")
            holder.stdin.flush()
            released = float(holder.stdout.readline())
            jobs = claim.result(timeout=20)
    finally:
        conn.set_trace_callback(None)
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert ids(jobs) == [job_id]
    assert jobs[0].started_at is not None and jobs[0].started_at >= released
    assert q.get_attempts(job_id)[0].started_at == jobs[0].started_at


def test_job_ids_are_unique_and_ordered_by_when_they_were_made() -> None:
    """Time first, so that the id index grows at its end (see ``new_job_id``); random after,
    so that ids made in the same millisecond, by any process, still differ."""
    from graphiti_mpq.storage.insert import new_job_id

    many = [new_job_id() for _ in range(20_000)]
    assert len(set(many)) == len(many)
    assert all(len(job_id) == 28 and int(job_id, 16) >= 0 for job_id in many)
    ticks = []
    for _ in range(6):
        ticks.append(new_job_id())
        made = int(ticks[-1][:12], 16)
        wait_until(lambda m=made: time.time_ns() // 1_000_000 > m, 1.0, 0.0005, "the next ms")
    assert ticks == sorted(ticks)
    assert abs(int(ticks[0][:12], 16) / 1000 - time.time()) < 5


def test_when_the_next_job_is_due_is_read_again_only_after_a_change(queue_path: str) -> None:
    """``next_run_at`` visits every pending job; an idle serving process asks before each
    wait. Its answer is kept until a commit, from this connection, its enqueue connection or
    another process, may have changed it."""
    q = JobQueue(queue_path).open()
    other = JobQueue(queue_path).open()
    reads: list[str] = []

    def note(sql: str) -> None:
        if "min(run_at)" in sql:
            reads.append(sql)

    q.connection().set_trace_callback(note)
    try:
        assert q.next_run_at() is None
        assert q.next_run_at() is None
        assert len(reads) == 1  # nothing changed: not read again
        now = time.time()
        other.enqueue("t", {}, delay=100)  # another connection (another process alike)
        assert q.next_run_at() == pytest.approx(now + 100, abs=5)
        assert q.next_run_at(retries_only=True) is None
        q.enqueue("t", {}, delay=10)  # this queue's own enqueue connection
        assert q.next_run_at() == pytest.approx(now + 10, abs=5)
        owner = q.register_process("test", "host", 60.0)
        job = q.enqueue("t", {}, parallel=True)
        (claimed,) = q.claim(owner, 1, 60.0)
        assert claimed.id == job
        q.finish([(claimed, AttemptResult(Outcome.FAILED, error="boom"))], owner=owner)
        assert q.next_run_at(retries_only=True) is not None  # this connection's own write
        assert q.next_run_at() is not None
        calls = len(reads)
        q.next_run_at(retries_only=True)
        q.next_run_at()
        assert len(reads) == calls
    finally:
        q.close()
        other.close()
