"""The SQLite job store: every read and write of a queue database goes through ``JobQueue``.

Each state change is one transaction; claims and every read-then-write take the write lock up
front (``BEGIN IMMEDIATE``), so two processes never claim the same job and a claim never sees
a half-made decision. The retry policy and the barrier rule are applied here, inside those
transactions; everything about processes, pools and file locks lives elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .. import startlog, wakeup
from ..errors import UnknownJobError, WrongStateError
from ..models import (
    CLAIMED,
    JOB_COLUMNS,
    Attempt,
    AttemptResult,
    DeadLetterJob,
    Outcome,
    QueuedJob,
    QueueStats,
    SupervisorInfo,
)
from ..retry import retry_delay
from . import insert, spool
from .base import (
    ConsumerApi,
    Finished,
    Recovered,
    Take,
    Waiting,
    parallel_run,
    supervisor_info,
    taken,
)
from .sqlite_conn import connect, translated

if TYPE_CHECKING:
    from ..barrier import Barrier
    from ..wakeup import WakeListener

_OWNED = "('claimed', 'running')"
_FINAL = "('succeeded', 'dead', 'cancelled')"
_TAIL = 4000
# A claim returns these (a QueuedJob's columns, then the round), read by position.
_CLAIMED_COLUMNS = ", ".join((*JOB_COLUMNS, "round"))
_ID, _ATTEMPTS, _PRIORITY, _SEQ = (
    JOB_COLUMNS.index(c) for c in ("id", "attempts", "priority", "seq")
)
_ROUND = len(JOB_COLUMNS)
# "IN (?, ?, ...)" with one mark per item makes a new statement text for every batch size, and
# each is compiled and kept in the connection's statement cache (up to 128 of them, some tens of
# KB each: megabytes over a day of varying batches). One JSON array parameter keeps one.
_LISTED = "(SELECT value FROM json_each(?))"


def _contract_order(row: tuple[Any, ...]) -> tuple[int, int]:
    return -row[_PRIORITY], row[_SEQ]


__all__ = ["Finished", "JobQueue", "Recovered", "Waiting"]


class JobQueue(ConsumerApi):
    """A queue in one SQLite file.

    The connection is opened lazily and again after a fork, so a ``JobQueue`` made before a
    pool starts is never shared with its children.
    """

    backend = "sqlite"

    def __init__(
        self,
        location: str,
        capacity: int = 100,
        *,
        max_retries: int = 3,
        backoff_base: float = 10.0,
        busy_timeout: float = 5.0,
        synchronous: str | None = None,
    ) -> None:
        self.location = location
        self.capacity = capacity
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous or os.environ.get("GRAPHITI_QUEUE_SYNCHRONOUS", "normal")
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._enqueue_conn: sqlite3.Connection | None = None
        self._enqueue_wait = -1.0
        self._lock = threading.RLock()
        self._api_owner: int | None = None
        #: next_run_at's answers (for all jobs, for retries), with the version of the database
        #: they were read at (see next_run_at).
        self._next_run: dict[bool, tuple[tuple[int, int], float | None]] = {}

    @property
    def display_location(self) -> str:
        """The location for messages and logs (the same as ``location`` for a file)."""
        return self.location

    # -- connection and transactions -------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._enqueue_conn = None  # a parent's connection: never used in this process
            self._next_run.clear()  # versions of another connection
            self._conn = connect(self.location, self.busy_timeout, self.synchronous)
            self._pid = os.getpid()
        return self._conn

    def open(self) -> JobQueue:
        """Open (and migrate) now, so errors surface at once."""
        with self._lock:
            self.connection()
        return self

    def _connection_for_enqueue(self, wait: float) -> sqlite3.Connection:
        """A second connection whose busy timeout stays at the enqueue wait, so that one
        enqueue is BEGIN, INSERT, COMMIT with no busy-timeout pragma before and after."""
        conn = self._enqueue_conn
        if conn is None or self._pid != os.getpid():
            self.connection()  # (after a fork: forgets the parent's connections)
            conn = self._enqueue_conn = connect(self.location, wait, self.synchronous)
        elif wait != self._enqueue_wait:
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
        self._enqueue_wait = wait
        return conn

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for conn in (self._conn, self._enqueue_conn):
                    if conn is not None:
                        conn.close()
            self._conn = self._enqueue_conn = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, translated(self.location):
            conn = self.connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def locked_connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, for a caller's own autocommit statements (errors translated)."""
        with self._lock, translated(self.location):
            yield self.connection()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        with self._lock, translated(self.location):
            conn = self.connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _rows(
        self, conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()
    ) -> list[dict[str, Any]]:
        cursor = conn.execute(sql, tuple(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- what a serving process needs beside the store --------------------------------------

    def barrier(self) -> Barrier:
        """The cross-process barrier of this queue (a file lock beside the database)."""
        from ..barrier import Barrier

        return Barrier(self.location)

    def wake_listener(self) -> WakeListener:
        """Where enqueues poke an idle serving process (a FIFO beside the database)."""
        return wakeup.WakeListener(self.location)

    def start_marks_dir(self, owner: int) -> str | None:
        """Beside the database: recovery of a dead owner reads them (``startlog``)."""
        return startlog.owner_dir(self.location, owner)

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(
        self, job_type: str, payload: dict[str, Any], parallel: bool = False, **options: Any
    ) -> str:
        """Record one job durably and return its id (an existing live duplicate's id).

        If the write lock is not free within the enqueue wait (50 ms), the job goes to the
        spool instead (see ``spool``): an enqueue from a hook never fails on a busy database.
        """
        from ..quick import enqueue_wait

        row = insert.prepare_row(job_type, payload, parallel, **options)
        wait = enqueue_wait()
        with self._lock, translated(self.location):
            conn = self._connection_for_enqueue(wait)
            ids = insert.insert_or_spool(conn, self.location, [row], wait, None)
        wakeup.poke(self.location)
        return ids[0]

    def ingest_spool(self) -> int:
        """Move jobs spooled while the database was busy into it (best effort, no wait)."""
        if not spool.pending_files(self.location):
            return 0
        with self._lock, translated(self.location):
            conn = self.connection()
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return 0  # still busy: the next reader or serving process takes them
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            try:
                added = spool.ingest(conn, self.location)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            spool.remove_ingested(conn, self.location)
        return added

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Record many jobs in one transaction: all or nothing."""
        rows = insert.prepare_many(jobs)
        if not rows:
            return []
        with self._write() as conn:
            ids = insert.insert_rows(conn, rows)
        wakeup.poke(self.location)
        return ids

    # -- serving processes -----------------------------------------------------------------

    def register_process(self, kind: str, host: str, lease: float) -> int:
        from ..procinfo import process_start_time

        now = time.time()
        pid = os.getpid()
        with self._write() as conn:
            conn.execute(
                "DELETE FROM processes WHERE stopped_at IS NOT NULL AND stopped_at < ?",
                (now - 86400,),
            )
            cursor = conn.execute(
                "INSERT INTO processes (host, pid, pid_start, kind, lease, started_at,"
                " last_heartbeat, jobs_done) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (host, pid, process_start_time(pid), kind, lease, now, now),
            )
            owner = cursor.lastrowid
        assert owner is not None
        return owner

    def heartbeat(self, owner: int, lease: float) -> None:
        """Say this process is alive and renew the leases of its jobs."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "UPDATE processes SET last_heartbeat = ?, lease = ? WHERE id = ?",
                (now, lease, owner),
            )
            conn.execute(
                f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND state IN {_OWNED}",
                (now + lease, owner),
            )

    def unregister_process(self, owner: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE processes SET stopped_at = ? WHERE id = ?", (time.time(), owner))

    def list_processes(self, host: str | None = None) -> list[SupervisorInfo]:
        """Processes serving the queue now (not stopped), with whether each is alive."""
        host = host or socket.gethostname()
        now = time.time()
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM processes WHERE stopped_at IS NULL ORDER BY id")
        return [supervisor_info(row, host, now) for row in rows]

    # -- claiming --------------------------------------------------------------------------

    def claim(
        self,
        owner: int,
        max_items: int,
        lease: float,
        *,
        start: bool = True,
        take: Take | None = None,
    ) -> list[QueuedJob]:
        """Claim the next eligible jobs in contract order, honouring the barrier.

        Returns one sequential job (state ``claimed``: the caller takes the barrier, then calls
        ``start_claimed``), or up to ``max_items`` consecutive parallel jobs (``running`` when
        ``start``, else ``claimed``); ``take``, given their job types, may take fewer (at least
        one). A sequential job is claimed only when no job of the queue is claimed or running;
        nothing is claimed while a sequential job is.
        """
        if max_items < 1:
            return []
        with self._write() as conn:
            # Read the clock once the write lock is held: started_at must not predate the
            # commit (an ack, say) that let this claim happen.
            now = time.time()
            # INDEXED BY: left to itself the planner searches jobs_state_seq and sorts every
            # pending row; the partial index yields contract order and stops at the LIMIT.
            head = conn.execute(
                "SELECT seq, parallel, job_type FROM jobs INDEXED BY jobs_claim_order"
                " WHERE state = 'pending' AND run_at <= ? ORDER BY priority DESC, seq LIMIT ?",
                (now, max_items),
            ).fetchall()
            if not head:
                return []
            if conn.execute(
                f"SELECT 1 FROM jobs WHERE state IN {_OWNED} AND parallel = 0 LIMIT 1"
            ).fetchone():
                return []
            if not head[0][1]:
                if conn.execute(f"SELECT 1 FROM jobs WHERE state IN {_OWNED} LIMIT 1").fetchone():
                    return []
                return self._mark(conn, [head[0][0]], owner, lease, now, running=False)
            run = parallel_run(head)
            chosen = [seq for seq, _, _ in run[: taken(take, [t for _, _, t in run])]]
            return self._mark(conn, chosen, owner, lease, now, running=start)

    def start_claimed(self, owner: int, jobs: list[QueuedJob], lease: float) -> list[QueuedJob]:
        """The barrier let these claimed jobs start: mark them running, open their attempts."""
        with self._write() as conn:
            now = time.time()
            seqs = [
                seq
                for (seq,) in conn.execute(
                    "SELECT seq FROM jobs WHERE state = 'claimed' AND owner = ?"
                    f" AND seq IN {_LISTED}",
                    (owner, json.dumps([job.seq for job in jobs])),
                ).fetchall()
            ]
            return self._mark(conn, seqs, owner, lease, now, running=True)

    def _mark(
        self,
        conn: sqlite3.Connection,
        seqs: list[int],
        owner: int,
        lease: float,
        now: float,
        *,
        running: bool,
    ) -> list[QueuedJob]:
        if not seqs:
            return []
        listed = json.dumps(seqs)
        if running:
            sql = (
                "UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, started_at = ?,"
                " finished_at = NULL, attempts = attempts + 1, worker_pid = NULL, pgid = NULL"
                f" WHERE seq IN {_LISTED} RETURNING {_CLAIMED_COLUMNS}"
            )
            params: tuple[Any, ...] = (owner, now + lease, now, listed)
        else:
            sql = (
                "UPDATE jobs SET state = 'claimed', owner = ?, lease_until = ?"
                f" WHERE seq IN {_LISTED} RETURNING {_CLAIMED_COLUMNS}"
            )
            params = (owner, now + lease, listed)
        rows = conn.execute(sql, params).fetchall()
        rows.sort(key=_contract_order)
        if running:
            conn.executemany(
                "INSERT INTO attempts (job_id, round, attempt, started_at, owner)"
                " VALUES (?, ?, ?, ?, ?)",
                [(row[_ID], row[_ROUND], row[_ATTEMPTS], now, owner) for row in rows],
            )
        return [QueuedJob.from_values(row) for row in rows]

    def record_processes(self, items: list[tuple[QueuedJob, int, int | None]]) -> None:
        """Remember which process (and process group) runs each attempt, for crash recovery."""
        from ..procinfo import process_start_time

        rows = [(pid, process_start_time(pid), pgid, job.id) for job, pid, pgid in items]
        if not rows:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE jobs SET worker_pid = ?, worker_start = ?, pgid = COALESCE(?, pgid)"
                " WHERE id = ? AND state = 'running'",
                rows,
            )

    def release_claimed(self, owner: int, jobs: list[QueuedJob]) -> None:
        """Give back claimed jobs that never started (a stop while waiting for the barrier)."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE jobs SET state = 'pending', owner = NULL, lease_until = NULL"
                " WHERE id = ? AND owner = ? AND state = 'claimed'",
                [(job.id, owner) for job in jobs],
            )

    # -- outcomes --------------------------------------------------------------------------

    def finish(
        self,
        results: Iterable[tuple[QueuedJob, AttemptResult]],
        *,
        max_retries: int | None = None,
        backoff_base: float | None = None,
        owner: int | None = None,
        force_dead: bool = False,
    ) -> list[Finished]:
        """Record the outcomes of running attempts in one transaction.

        Success ends the job; a failure schedules the retry (``run_at`` = now + backoff) or
        moves the job to the dead-letter table; a hand-back returns it without using an
        attempt. A job no longer running (recovered by another process) is left alone.
        """
        items = list(results)
        if not items:
            return []
        default_retries = self.max_retries if max_retries is None else max_retries
        base = self.backoff_base if backoff_base is None else backoff_base
        if force_dead:
            default_retries = 0
        done: list[Finished] = []
        with self._write() as conn:
            rows = self._attempt_rows(conn, [job for job, _ in items])
            succeeded: list[tuple[QueuedJob, tuple[Any, ...], AttemptResult]] = []
            for job, result in items:
                row = rows.get(job.id)
                if row is None or row[3] != "running" or (owner is not None and row[4] != owner):
                    continue
                if result.outcome is Outcome.SUCCEEDED:
                    succeeded.append((job, row, result))
                    continue
                job_retries = 0 if force_dead else row[2]
                done.append(
                    self._apply(
                        conn, job, row[0], row[1], job_retries, result, default_retries, base
                    )
                )
            done.extend(self._succeed_many(conn, succeeded))
            if owner is not None:
                counted = sum(1 for f in done if f.disposition != "handed_back")
                if counted:
                    conn.execute(
                        "UPDATE processes SET jobs_done = jobs_done + ? WHERE id = ?",
                        (counted, owner),
                    )
        return done

    @staticmethod
    def _attempt_rows(
        conn: sqlite3.Connection, jobs: list[QueuedJob]
    ) -> dict[str, tuple[Any, ...]]:
        """id -> (attempts, round, max_retries, state, owner, seq), one query for many jobs.

        Looked up by ``seq`` (the table's own key: no walk of the id index), checked against
        the id; a job whose ``seq`` is unknown or stale is looked up by id.
        """
        select = "SELECT id, attempts, round, max_retries, state, owner, seq FROM jobs WHERE"
        listed = json.dumps([job.seq for job in jobs])
        rows = {row[0]: row[1:] for row in conn.execute(f"{select} seq IN {_LISTED}", (listed,))}
        missing = [job.id for job in jobs if job.id not in rows]
        if missing:
            found = conn.execute(f"{select} id IN {_LISTED}", (json.dumps(missing),))
            rows.update((row[0], row[1:]) for row in found)
        return rows

    @staticmethod
    def _succeed_many(
        conn: sqlite3.Connection, items: list[tuple[QueuedJob, tuple[Any, ...], AttemptResult]]
    ) -> list[Finished]:
        """Successes (the bulk of a busy queue) recorded with two statements for all of them."""
        if not items:
            return []
        now = time.time()
        conn.executemany(
            "UPDATE attempts SET finished_at = ?, outcome = 'succeeded', exit_code = ?,"
            " signal = NULL, error = NULL, output_tail = ? WHERE id = (SELECT max(id)"
            " FROM attempts WHERE job_id = ? AND round = ? AND attempt = ?)",
            [
                (
                    result.finished_at or now,
                    result.exit_code,
                    result.output_tail[-_TAIL:] if result.output_tail else None,
                    job.id,
                    row[1],
                    row[0],
                )
                for job, row, result in items
            ],
        )
        conn.executemany(
            "UPDATE jobs SET state = 'succeeded', finished_at = ?, result = ?, owner = NULL,"
            " lease_until = NULL, worker_pid = NULL, worker_start = NULL WHERE seq = ?",
            [
                (
                    result.finished_at or now,
                    json.dumps(result.result) if result.result is not None else None,
                    row[5],
                )
                for _, row, result in items
            ],
        )
        return [Finished(job, Outcome.SUCCEEDED, "succeeded") for job, _, _ in items]

    def _apply(
        self,
        conn: sqlite3.Connection,
        job: QueuedJob,
        attempt: int,
        round_: int,
        job_retries: int | None,
        result: AttemptResult,
        default_retries: int,
        base: float,
    ) -> Finished:
        """Record a failed or handed-back attempt (successes: ``_succeed_many``)."""
        now = result.finished_at or time.time()
        tail = result.output_tail[-_TAIL:] if result.output_tail else None
        conn.execute(
            "UPDATE attempts SET finished_at = ?, outcome = ?, exit_code = ?, signal = ?,"
            " error = ?, output_tail = ? WHERE id = (SELECT max(id) FROM attempts"
            " WHERE job_id = ? AND round = ? AND attempt = ?)",
            (
                now,
                result.outcome.value,
                result.exit_code,
                result.signal,
                result.error,
                tail,
                job.id,
                round_,
                attempt,
            ),
        )
        release = "owner = NULL, lease_until = NULL, worker_pid = NULL, worker_start = NULL"
        if result.outcome is Outcome.HANDED_BACK:
            conn.execute(
                f"UPDATE jobs SET state = 'pending', attempts = attempts - 1, started_at = NULL,"
                f" {release} WHERE id = ?",
                (job.id,),
            )
            return Finished(job, result.outcome, "handed_back")
        error = result.error or result.outcome.value
        limit = default_retries if job_retries is None else job_retries
        delay = retry_delay(attempt, limit, base)
        if delay is not None:
            conn.execute(
                f"UPDATE jobs SET state = 'pending', run_at = ?, last_error = ?, {release}"
                " WHERE id = ?",
                (now + delay, error, job.id),
            )
            return Finished(job, result.outcome, "retry", delay=delay, error=error)
        errors = [
            e or o
            for e, o in conn.execute(
                "SELECT error, outcome FROM attempts WHERE job_id = ? AND round = ?"
                " AND outcome NOT IN ('succeeded', 'handed_back') ORDER BY id",
                (job.id, round_),
            ).fetchall()
        ]
        conn.execute(
            f"UPDATE jobs SET state = 'dead', finished_at = ?, last_error = ?, {release}"
            " WHERE id = ?",
            (now, error, job.id),
        )
        conn.execute(
            "INSERT OR REPLACE INTO dead_letter (job_id, failed_at, errors) VALUES (?, ?, ?)",
            (job.id, now, json.dumps(errors)),
        )
        return Finished(job, result.outcome, "dead", error=error)

    # -- crash recovery --------------------------------------------------------------------

    def recover(
        self,
        host: str,
        *,
        kill: Callable[[dict[str, Any]], None],
        exclude_owner: int | None = None,
        max_retries: int | None = None,
        backoff_base: float | None = None,
    ) -> list[Recovered]:
        """Take back jobs whose owner is provably dead on this host, or whose lease expired.

        ``kill`` is called first for each (with the job row and the owner's host/pid) so no
        code of the interrupted attempt runs beside its next one; the interrupted attempt
        counts as ``lost``.
        """
        from ..procinfo import is_alive

        now = time.time()
        default_retries = self.max_retries if max_retries is None else max_retries
        base = self.backoff_base if backoff_base is None else backoff_base
        recovered: list[Recovered] = []
        with self._write() as conn:
            rows = self._rows(
                conn,
                "SELECT j.*, p.host AS owner_host, p.pid AS owner_pid,"
                " p.pid_start AS owner_pid_start FROM jobs j"
                f" LEFT JOIN processes p ON p.id = j.owner WHERE j.state IN {_OWNED}",
            )
            dead_owners: set[int] = set()
            marks: dict[int, set[tuple[str, int]] | None] = {}
            for row in rows:
                if exclude_owner is not None and row["owner"] == exclude_owner:
                    continue
                local_dead = row["owner_host"] == host and not is_alive(
                    row["owner_pid"], row["owner_pid_start"]
                )
                expired = row["lease_until"] is None or row["lease_until"] < now
                if row["owner_pid"] is not None and not (local_dead or expired):
                    continue
                if local_dead and row["owner"] is not None:
                    dead_owners.add(row["owner"])
                kill(row)
                job = QueuedJob.from_row(row)
                if row["state"] == CLAIMED:
                    conn.execute(
                        "UPDATE jobs SET state = 'pending', owner = NULL, lease_until = NULL"
                        " WHERE seq = ?",
                        (row["seq"],),
                    )
                    recovered.append(Recovered(job, False, None))
                    continue
                why = "its process died" if local_dead else "its lease expired"
                result = AttemptResult(
                    Outcome.LOST, error=f"lost: {why} (owner pid {row['owner_pid']})"
                )
                if local_dead and row["owner"] is not None:
                    owner = row["owner"]
                    if owner not in marks:
                        marks[owner] = startlog.started(startlog.owner_dir(self.location, owner))
                    started = marks[owner]
                    if started is not None and (row["id"], row["attempts"]) not in started:
                        # Claimed in a chunk no child had reached: it never ran, so no attempt.
                        result = AttemptResult(
                            Outcome.HANDED_BACK, error=f"not started: {why} before it began"
                        )
                finished = self._apply(
                    conn,
                    job,
                    row["attempts"],
                    row["round"],
                    row["max_retries"],
                    result,
                    default_retries,
                    base,
                )
                recovered.append(Recovered(job, True, finished))
            if dead_owners:
                conn.executemany(
                    "UPDATE processes SET stopped_at = ? WHERE id = ? AND stopped_at IS NULL",
                    [(now, owner) for owner in dead_owners],
                )
        for owner in dead_owners:  # (after the commit: a rollback would need them again)
            startlog.remove_owner(startlog.owner_dir(self.location, owner))
        return recovered

    # -- reads -----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> QueuedJob:
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise UnknownJobError(job_id)
        return QueuedJob.from_row(rows[0])

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[QueuedJob]:
        """Jobs newest first; ``pending`` includes claimed ones."""
        with self._read() as conn:
            if state is None:
                rows = self._rows(conn, "SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                states = ("pending", CLAIMED) if state == "pending" else (state,)
                rows = self._rows(
                    conn,
                    f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))})"
                    " ORDER BY seq DESC LIMIT ?",
                    (*states, limit),
                )
        return [QueuedJob.from_row(row) for row in rows]

    def get_attempts(self, job_id: str) -> list[Attempt]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT attempt, started_at, finished_at, outcome, exit_code, signal, error,"
                " output_tail FROM attempts WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        return [Attempt(*row) for row in rows]

    def get_stats(self) -> QueueStats:
        with self._read() as conn:
            # Kept exact by triggers (schema v2): a few rows, however many jobs there are.
            counts = dict(conn.execute("SELECT key, n FROM job_counts").fetchall())
            oldest = [
                conn.execute(
                    "SELECT created_at FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (state,)
                ).fetchone()
                for state in ("pending", CLAIMED)
            ]
        ages = [row[0] for row in oldest if row is not None]
        return QueueStats(
            pending=counts.get("pending", 0) + counts.get(CLAIMED, 0),
            retrying=counts.get("retrying", 0),
            running=counts.get("running", 0),
            succeeded=counts.get("succeeded", 0),
            cancelled=counts.get("cancelled", 0),
            dead_letter=counts.get("dead", 0),
            oldest_pending_at=min(ages) if ages else None,
        )

    def get_pending_count(self) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    "SELECT coalesce(sum(n), 0) FROM job_counts WHERE key IN ('pending', 'claimed')"
                ).fetchone()[0]
            )

    def count_eligible(self, include_owned: bool = False) -> int:
        """Pending jobs due now (and, if asked, claimed/running ones)."""
        now = time.time()
        with self._read() as conn:
            due = conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'pending' AND run_at <= ?", (now,)
            ).fetchone()[0]
            if include_owned:
                due += conn.execute(
                    f"SELECT count(*) FROM jobs WHERE state IN {_OWNED}"
                ).fetchone()[0]
        return int(due)

    def next_run_at(self, retries_only: bool = False) -> float | None:
        """When the earliest pending job (or retry) falls due; None when there is none.

        Reading it visits every pending job (no index orders them by ``run_at``), and an idle
        serving process asks before each wait, up to ten times a second while due jobs are
        held back by another process's barrier: with a million jobs queued, a core. So the
        answer is kept until the database changes: ``PRAGMA data_version`` moves with other
        connections' commits, ``total_changes`` with this one's.
        """
        where = "state = 'pending'" + (" AND attempts > 0" if retries_only else "")
        with self._read() as conn:
            version = (conn.total_changes, conn.execute("PRAGMA data_version").fetchone()[0])
            cached = self._next_run.get(retries_only)
            if cached is not None and cached[0] == version:
                return cached[1]
            row = conn.execute(f"SELECT min(run_at) FROM jobs WHERE {where}").fetchone()
        due = None if row is None or row[0] is None else float(row[0])
        self._next_run[retries_only] = (version, due)
        return due

    def get_dead_letter_jobs(self, limit: int | None = None) -> list[DeadLetterJob]:
        with self._read() as conn:
            rows = self._rows(
                conn,
                "SELECT j.*, d.failed_at AS dl_failed_at, d.errors AS dl_errors FROM dead_letter d"
                " JOIN jobs j ON j.id = d.job_id ORDER BY d.failed_at DESC"
                + (" LIMIT ?" if limit is not None else ""),
                (limit,) if limit is not None else (),
            )
        return [
            DeadLetterJob(
                QueuedJob.from_row(row), row["dl_failed_at"], json.loads(row["dl_errors"])
            )
            for row in rows
        ]

    def waiting_for(self, job: QueuedJob) -> Waiting | None:
        """Why a pending job has not started yet; None when it is not pending."""
        if job.public_state != "pending":
            return None
        if job.state == CLAIMED:
            return Waiting("barrier", None, 0)
        now = time.time()
        if job.run_at > now:
            return Waiting("retry" if job.attempts > 0 else "delay", job.run_at, 0)
        with self._read() as conn:
            before = (
                "state = 'pending' AND run_at <= ? AND (priority > ? OR (priority = ? AND seq < ?))"
            )
            params = (now, job.priority, job.priority, job.seq)
            ahead = conn.execute(f"SELECT count(*) FROM jobs WHERE {before}", params).fetchone()[0]
            seq_ahead = conn.execute(
                f"SELECT 1 FROM jobs WHERE {before} AND parallel = 0 LIMIT 1", params
            ).fetchone()
            owned = conn.execute(
                f"SELECT count(*), min(parallel) FROM jobs WHERE state IN {_OWNED}"
            ).fetchone()
        blocked_by_running_seq = owned[0] > 0 and owned[1] == 0
        if seq_ahead or blocked_by_running_seq or (not job.parallel and owned[0] > 0):
            return Waiting("barrier", None, int(ahead))
        return Waiting("queue", None, int(ahead))

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, job_id: str) -> QueuedJob:
        with self._write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            if row[0] != "pending":
                shown = "pending (starting)" if row[0] == CLAIMED else row[0]
                raise WrongStateError(
                    f"job {job_id} is {shown}; only a pending job can be cancelled"
                )
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?",
                (time.time(), job_id),
            )
        return self.get_job(job_id)

    def retry_dead(self, job_ids: Iterable[str] | None = None) -> list[str]:
        """Put dead jobs back as pending with 0 attempts (all of them when ``job_ids`` is None)."""
        now = time.time()
        with self._write() as conn:
            if job_ids is None:
                ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'dead'")]
            else:
                ids = list(dict.fromkeys(job_ids))
                for job_id in ids:
                    row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    if row is None:
                        raise UnknownJobError(job_id)
                    if row[0] != "dead":
                        raise WrongStateError(f"job {job_id} is {row[0]}, not dead")
            try:
                conn.executemany(
                    "UPDATE jobs SET state = 'pending', attempts = 0, round = round + 1,"
                    " run_at = ?, started_at = NULL, finished_at = NULL WHERE id = ?",
                    [(now, job_id) for job_id in ids],
                )
            except sqlite3.IntegrityError as exc:
                raise WrongStateError(
                    "a retried job has the dedupe key of a live job; cancel that one first"
                ) from exc
            conn.executemany("DELETE FROM dead_letter WHERE job_id = ?", [(i,) for i in ids])
        if ids:
            wakeup.poke(self.location)
        return ids

    def purge_dead(self) -> int:
        with self._write() as conn:
            return self._delete_where(conn, "state = 'dead'", ())

    def purge(self, older_than: float) -> int:
        """Delete finished (succeeded, dead, cancelled) jobs that finished before now - age."""
        cutoff = time.time() - older_than
        with self._write() as conn:
            # INDEXED BY: left to itself the planner walks every finished job in jobs_state_seq;
            # jobs_finished reads only those that finished before the cutoff.
            return self._delete_where(
                conn,
                f"state IN {_FINAL} AND finished_at < ?",
                (cutoff,),
                jobs="jobs INDEXED BY jobs_finished",
            )

    def _delete_where(
        self,
        conn: sqlite3.Connection,
        where: str,
        params: tuple[Any, ...],
        jobs: str = "jobs",
    ) -> int:
        conn.execute(
            f"DELETE FROM attempts WHERE job_id IN (SELECT id FROM {jobs} WHERE {where})", params
        )
        conn.execute(
            f"DELETE FROM dead_letter WHERE job_id IN (SELECT id FROM {jobs} WHERE {where})",
            params,
        )
        return int(conn.execute(f"DELETE FROM {jobs} WHERE {where}", params).rowcount)
