"""The PostgreSQL job store: one queue served by supervisors on many hosts.

``PostgresQueue`` has the methods and the semantics of the SQLite ``JobQueue``; a shared test
suite runs against both. What differs is how they are made safe across hosts:

- Claims run in one transaction that first takes a transaction-scoped advisory lock of the
  queue (``pg_advisory_xact_lock``), then picks rows with ``SELECT ... FOR UPDATE SKIP
  LOCKED``. The lock serialises claimers, so the barrier rule (a sequential job is claimed only
  when no job is owned; nothing is claimed while a sequential job is owned) is decided on a
  consistent view; without it two claimers could each see "nothing owned" and one take a
  sequential job while the other takes parallel ones. A claim holds the lock for a few
  milliseconds; every other write (finish, heartbeat, enqueue, recovery) only locks its rows.
- Crash recovery is by lease: a job whose lease passed is taken back by any serving process.
  A dead pid is proof only on the host (host id) that recorded it.
- Enqueues NOTIFY the queue's channel in their transaction (delivered at commit); serving
  processes LISTEN on a connection of their own (``wake_listener``).
- The barrier (``barrier()``) is a session-level advisory lock on a connection of its own.

A serving process holds at most three connections: this store's, the barrier's and the
listener's. Timestamps are epoch seconds (double precision) as on SQLite, read from this
host's clock corrected by its offset to the server's clock when that exceeds a second, so
leases compare correctly across hosts whose clocks disagree.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidJobError, UnknownJobError, WrongStateError
from ..models import (
    CLAIMED,
    Attempt,
    AttemptResult,
    DeadLetterJob,
    Outcome,
    QueuedJob,
    QueueStats,
    SupervisorInfo,
)
from ..retry import retry_delay
from . import insert
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
from .pg_conn import (
    FOLD_COUNTS_AFTER,
    channel_name,
    connect,
    drop,
    fold_counts,
    is_connection_error,
    lock_key,
    migrate,
    namespace_oid,
    need_psycopg,
    parse_location,
    translate,
)

if TYPE_CHECKING:
    import psycopg

    from .pg_conn import PgTarget
    from .pg_wait import PgBarrier, PgWakeListener

    Conn = psycopg.Connection[dict[str, Any]]

T = TypeVar("T")

_OWNED = "('claimed', 'running')"
_LIVE = "('pending', 'claimed', 'running')"
_FINAL = "('succeeded', 'dead', 'cancelled')"
_TAIL = 4000
_CLAIM_LOCK = 1
_BARRIER_LOCK = 2
_COUNTS_LOCK = 3
_CLOCK_SLACK = 1.0  # clock offsets below this are noise (and same-host clocks agree exactly)

_INSERT = (
    "INSERT INTO jobs (id, job_type, payload, parallel, priority, state, attempts, max_retries,"
    " timeout, dedupe_key, run_at, created_at, round)"
    " VALUES (%s, %s, %s, %s, %s, 'pending', 0, %s, %s, %s, %s, %s, 0)"
)
_INSERT_DEDUPED = (
    _INSERT + f" ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN {_LIVE}"
    " DO NOTHING RETURNING id"
)
_RELEASE = "owner = NULL, lease_until = NULL, worker_pid = NULL, worker_start = NULL"


def _text(value: str | None) -> str | None:
    """PostgreSQL text holds no NUL and no lone surrogates: keep the rest of an error tail."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


class PostgresQueue(ConsumerApi):
    """A queue in one schema of a PostgreSQL database.

    The connection is opened lazily, again after a fork (a child never uses its parent's
    session), and again after it was lost: an operation whose connection died is done again on
    a fresh one, after checking the database when the loss came during its COMMIT (see
    ``_run``), so a cut connection (a server restart, ``pg_terminate_backend``) costs a
    reconnection, not an error.
    """

    backend = "postgres"

    def __init__(
        self,
        location: str,
        capacity: int = 100,
        *,
        max_retries: int = 3,
        backoff_base: float = 10.0,
        busy_timeout: float = 5.0,
        schema: str | None = None,
    ) -> None:
        need_psycopg()
        self.location = location
        self.target: PgTarget = parse_location(location, schema)
        self.schema = self.target.schema
        #: the location with any password masked, for messages and logs
        self.display_location = self.target.display
        self.capacity = capacity
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.busy_timeout = busy_timeout
        self._conn: Conn | None = None
        self._pid = -1
        self._lock = threading.RLock()
        self._api_owner: int | None = None
        self._inherited: list[Conn] = []
        self._oid: int | None = None
        self._offset = 0.0

    # -- connection and transactions -------------------------------------------------------

    def _connection(self) -> Conn:
        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            return self._conn
        if self._pid == os.getpid():
            drop(self._conn)  # a broken one: release what is left of it
        elif self._conn is not None:
            # Forked: the session is the parent's. Never close it here (that would end it for
            # the parent too); keep the object so it is not collected with a warning either.
            self._inherited.append(self._conn)
        self._conn = None
        conn: Conn = connect(self.target, "store", dict_rows=True, lock_timeout=self.busy_timeout)
        try:
            migrate(conn, self.target)
            self._oid = namespace_oid(conn, self.target)
            self._offset = self._clock_offset(conn)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    @staticmethod
    def _clock_offset(conn: Conn) -> float:
        before = time.time()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS now").fetchone()
        after = time.time()
        offset = float(row["now"]) - (before + after) / 2 if row else 0.0
        return offset if abs(offset) >= _CLOCK_SLACK else 0.0

    def _now(self) -> float:
        return time.time() + self._offset

    def open(self) -> PostgresQueue:
        """Connect (and migrate) now, so errors surface at once."""
        with self._lock:
            self._run(lambda conn: None, transaction=False)
        return self

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                drop(self._conn)
            elif self._conn is not None:
                self._inherited.append(self._conn)  # the parent's session: leave it open
            self._conn = None

    def _run(
        self,
        work: Callable[[Conn], T],
        *,
        transaction: bool = True,
        committed: Callable[[Conn, T], bool] | None = None,
    ) -> T:
        """Run ``work`` in one transaction (or in autocommit), translating driver errors.

        When the connection dies the work is done again on a new connection: before COMMIT
        was sent nothing was left behind. When it dies during COMMIT the outcome is unknown:
        ``committed(conn, result)`` looks at the database to tell (the result computed before
        the COMMIT is returned if it did commit); without it the work must be idempotent.
        """
        import psycopg

        with self._lock:
            for attempt in (1, 2, 3):
                conn = self._connect_translated()
                committing = False
                try:
                    if not transaction:
                        return work(conn)
                    conn.execute("BEGIN")
                    result = work(conn)
                    committing = True
                    conn.execute("COMMIT")
                    return result
                except psycopg.Error as exc:
                    self._rollback(conn)
                    if attempt == 3 or not is_connection_error(exc):
                        raise translate(exc, self.target) from exc
                    self._conn = None
                    drop(conn)
                    if committing and committed is not None:
                        check = self._connect_translated()
                        try:
                            if committed(check, result):
                                return result
                        except psycopg.Error as again:
                            raise translate(again, self.target) from again
                except BaseException:
                    self._rollback(conn)
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect_translated(self) -> Conn:
        import psycopg

        try:
            return self._connection()
        except psycopg.Error as exc:
            raise translate(exc, self.target) from exc

    @staticmethod
    def _rollback(conn: Conn) -> None:
        from psycopg import pq

        if conn.closed or conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            return
        try:
            conn.execute("ROLLBACK")
        except Exception:
            pass

    def _keys(self) -> int:
        if self._oid is None:
            self._run(lambda conn: None, transaction=False)
        assert self._oid is not None
        return self._oid

    def _notify(self, conn: Conn) -> None:
        """Wake the listening serving processes when this transaction commits."""
        conn.execute("SELECT pg_notify(%s, '')", (channel_name(self._keys()),))

    # -- what a serving process needs beside the store --------------------------------------

    def barrier(self) -> PgBarrier:
        """The barrier of this queue across hosts: an advisory lock on its own connection."""
        from .pg_wait import PgBarrier

        return PgBarrier(self.target, lock_key(self._keys(), _BARRIER_LOCK))

    def wake_listener(self) -> PgWakeListener:
        """LISTEN for this queue's enqueues on a connection of its own."""
        from .pg_wait import PgWakeListener

        return PgWakeListener(self.target, channel_name(self._keys()))

    def start_marks_dir(self, owner: int) -> str | None:
        """None: recovery may run on another host, which could not read them (``startlog``)."""
        return None

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(
        self, job_type: str, payload: dict[str, Any], parallel: bool = False, **options: Any
    ) -> str:
        """Record one job durably and return its id (an existing live duplicate's id)."""
        self._keys()  # connected: the clock offset is known
        row = insert.prepare_row(job_type, payload, parallel, now=self._now(), **options)
        _refuse_nul(row)
        return self._run(lambda conn: self._insert(conn, [row]), committed=_inserted)[0]

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Record many jobs in one transaction: all or nothing."""
        rows = insert.prepare_many(jobs)
        if not rows:
            return []
        self._keys()  # connected: the clock offset is known
        if self._offset:
            rows = [(*r[:8], r[8] + self._offset, r[9] + self._offset) for r in rows]
        for index, row in enumerate(rows):
            _refuse_nul(row, f"jobs[{index}].")
        return self._run(lambda conn: self._insert(conn, rows), committed=_inserted)

    def ingest_spool(self) -> int:
        """A PostgreSQL enqueue never waits on a queue-wide write lock, so it never spools."""
        return 0

    def _insert(self, conn: Conn, rows: list[tuple[Any, ...]]) -> list[str]:
        params = [(*r[:3], bool(r[3]), *r[4:]) for r in rows]
        ids: list[str] = []
        with conn.cursor() as cur:
            if not any(p[7] is not None for p in params):
                cur.executemany(_INSERT, params)
                ids = [p[0] for p in params]
            else:
                ids = [self._insert_deduped(conn, p) for p in params]
        self._notify(conn)
        return ids

    @staticmethod
    def _insert_deduped(conn: Conn, params: tuple[Any, ...]) -> str:
        if params[7] is None:
            conn.execute(_INSERT, params)
            return str(params[0])
        for _ in range(5):
            # ON CONFLICT waits for a concurrent enqueue of the same key, then skips the row;
            # the live job may have finished in between, so look again.
            if conn.execute(_INSERT_DEDUPED, params).fetchone() is not None:
                return str(params[0])
            found = conn.execute(
                f"SELECT id FROM jobs WHERE dedupe_key = %s AND state IN {_LIVE}", (params[7],)
            ).fetchone()
            if found is not None:
                return str(found["id"])
        raise WrongStateError(f"dedupe key {params[7]!r} keeps changing hands; try again")

    # -- serving processes -----------------------------------------------------------------

    def register_process(self, kind: str, host: str, lease: float) -> int:
        from ..procinfo import process_start_time

        pid = os.getpid()

        def work(conn: Conn) -> int:
            now = self._now()
            conn.execute(
                "DELETE FROM processes WHERE stopped_at IS NOT NULL AND stopped_at < %s",
                (now - 86400,),
            )
            row = conn.execute(
                "INSERT INTO processes (host, pid, pid_start, kind, lease, started_at,"
                " last_heartbeat, jobs_done) VALUES (%s, %s, %s, %s, %s, %s, %s, 0) RETURNING id",
                (_text(host), pid, process_start_time(pid), kind, lease, now, now),
            ).fetchone()
            assert row is not None
            return int(row["id"])

        return self._run(work, committed=_process_exists)

    def heartbeat(self, owner: int, lease: float) -> None:
        """Say this process is alive and renew the leases of its jobs."""

        def work(conn: Conn) -> None:
            now = self._now()
            conn.execute(
                "UPDATE processes SET last_heartbeat = %s, lease = %s WHERE id = %s",
                (now, lease, owner),
            )
            conn.execute(
                f"UPDATE jobs SET lease_until = %s WHERE owner = %s AND state IN {_OWNED}",
                (now + lease, owner),
            )
            # Serving processes keep the count deltas few (see pg_conn.fold_counts).
            row = conn.execute("SELECT count(*) AS n FROM job_counts").fetchone()
            if row is not None and row["n"] > FOLD_COUNTS_AFTER:
                fold_counts(conn, counts_key)

        counts_key = lock_key(self._keys(), _COUNTS_LOCK)
        self._run(work)

    def unregister_process(self, owner: int) -> None:
        self._run(
            lambda conn: conn.execute(
                "UPDATE processes SET stopped_at = %s WHERE id = %s", (self._now(), owner)
            )
        )

    def list_processes(self, host: str | None = None) -> list[SupervisorInfo]:
        """Processes serving the queue now (not stopped), with whether each is alive.

        A heartbeat younger than the lease says alive; on this host the pid must live too.
        """
        host = host or socket.gethostname()
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT * FROM processes WHERE stopped_at IS NULL ORDER BY id"
            ).fetchall(),
            transaction=False,
        )
        now = self._now()
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
        claim_key = lock_key(self._keys(), _CLAIM_LOCK)

        def work(conn: Conn) -> list[QueuedJob]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (claim_key,))
            owned = conn.execute(
                "SELECT count(*) AS n, coalesce(bool_and(parallel), true) AS all_parallel"
                f" FROM jobs WHERE state IN {_OWNED}"
            ).fetchone()
            assert owned is not None
            if not owned["all_parallel"]:
                return []  # a sequential job is claimed or running
            # Read the clock after that statement's snapshot: started_at must not predate the
            # commit (an ack, say) that let this claim happen.
            now = self._now()
            head = conn.execute(
                "SELECT seq, parallel, job_type FROM jobs WHERE state = 'pending' AND run_at <= %s"
                " ORDER BY priority DESC, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, max_items),
            ).fetchall()
            if not head:
                return []
            if not head[0]["parallel"]:
                if owned["n"]:
                    return []
                return self._mark(conn, [head[0]["seq"]], owner, lease, now, running=False)
            run = parallel_run([(r["seq"], r["parallel"], r["job_type"]) for r in head])
            chosen = [seq for seq, _, _ in run[: taken(take, [t for _, _, t in run])]]
            return self._mark(conn, chosen, owner, lease, now, running=start)

        return self._run(work, committed=_marked)

    def start_claimed(self, owner: int, jobs: list[QueuedJob], lease: float) -> list[QueuedJob]:
        """The barrier let these claimed jobs start: mark them running, open their attempts."""
        if not jobs:
            return []

        def work(conn: Conn) -> list[QueuedJob]:
            return self._mark(
                conn,
                [job.seq for job in jobs],
                owner,
                lease,
                self._now(),
                running=True,
                only_claimed_by=owner,
            )

        return self._run(work, committed=_marked)

    def _mark(
        self,
        conn: Conn,
        seqs: list[int],
        owner: int,
        lease: float,
        now: float,
        *,
        running: bool,
        only_claimed_by: int | None = None,
    ) -> list[QueuedJob]:
        if not seqs:
            return []
        if running:
            where = "seq = ANY(%s)"
            params: list[Any] = [owner, now + lease, now, seqs]
            if only_claimed_by is not None:
                where += " AND state = 'claimed' AND owner = %s"
                params.append(only_claimed_by)
            rows = conn.execute(
                "WITH started AS (UPDATE jobs SET state = 'running', owner = %s,"
                " lease_until = %s, started_at = %s, finished_at = NULL,"
                " attempts = attempts + 1, worker_pid = NULL, pgid = NULL"
                f" WHERE {where} RETURNING *),"
                " opened AS (INSERT INTO attempts (job_id, round, attempt, started_at, owner)"
                " SELECT id, round, attempts, started_at, owner FROM started)"
                " SELECT * FROM started",
                params,
            ).fetchall()
        else:
            rows = conn.execute(
                "UPDATE jobs SET state = 'claimed', owner = %s, lease_until = %s"
                " WHERE seq = ANY(%s) RETURNING *",
                (owner, now + lease, seqs),
            ).fetchall()
        rows.sort(key=lambda row: (-row["priority"], row["seq"]))
        return [QueuedJob.from_row(row) for row in rows]

    def record_processes(self, items: list[tuple[QueuedJob, int, int | None]]) -> None:
        """Remember which process (and process group) runs each attempt, for crash recovery."""
        from ..procinfo import process_start_time

        rows = [(pid, process_start_time(pid), pgid, job.id) for job, pid, pgid in items]
        if not rows:
            return

        def work(conn: Conn) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE jobs SET worker_pid = %s, worker_start = %s,"
                    " pgid = COALESCE(%s, pgid) WHERE id = %s AND state = 'running'",
                    rows,
                )

        self._run(work)

    def release_claimed(self, owner: int, jobs: list[QueuedJob]) -> None:
        """Give back claimed jobs that never started (a stop while waiting for the barrier)."""
        if not jobs:
            return

        def work(conn: Conn) -> None:
            conn.execute(
                "UPDATE jobs SET state = 'pending', owner = NULL, lease_until = NULL"
                " WHERE id = ANY(%s) AND owner = %s AND state = 'claimed'",
                ([job.id for job in jobs], owner),
            )
            self._notify(conn)

        self._run(work)

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
        default_retries = (
            0 if force_dead else (self.max_retries if max_retries is None else max_retries)
        )
        base = self.backoff_base if backoff_base is None else backoff_base

        def work(conn: Conn) -> list[Finished]:
            current = {
                row["id"]: row
                for row in conn.execute(
                    "SELECT id, attempts, round, max_retries, state, owner, parallel FROM jobs"
                    " WHERE id = ANY(%s) ORDER BY seq FOR UPDATE",
                    ([job.id for job, _ in items],),
                ).fetchall()
            }
            done: list[Finished] = []
            unblocks = False
            for job, result in items:
                row = current.pop(job.id, None)
                if row is None or row["state"] != "running":
                    continue
                if owner is not None and row["owner"] != owner:
                    continue
                job_retries = 0 if force_dead else row["max_retries"]
                done.append(
                    self._apply(
                        conn,
                        job,
                        row["attempts"],
                        row["round"],
                        job_retries,
                        result,
                        default_retries,
                        base,
                    )
                )
                unblocks = unblocks or not row["parallel"] or done[-1].disposition == "handed_back"
            counted = sum(1 for f in done if f.disposition != "handed_back")
            if owner is not None and counted:
                conn.execute(
                    "UPDATE processes SET jobs_done = jobs_done + %s WHERE id = %s",
                    (counted, owner),
                )
            if unblocks:
                self._notify(conn)  # the barrier is free, or a job is pending again
            return done

        def recorded(conn: Conn, done: list[Finished]) -> bool:
            # Recorded jobs left 'running' (or this owner); unrecorded ones are still there.
            if not done:
                return True
            row = conn.execute(
                "SELECT state, owner FROM jobs WHERE id = %s", (done[0].job.id,)
            ).fetchone()
            return row is None or row["state"] != "running" or row["owner"] != done[0].job.owner

        return self._run(work, committed=recorded)

    def _apply(
        self,
        conn: Conn,
        job: QueuedJob,
        attempt: int,
        round_: int,
        job_retries: int | None,
        result: AttemptResult,
        default_retries: int,
        base: float,
    ) -> Finished:
        now = result.finished_at + self._offset if result.finished_at else self._now()
        tail = result.output_tail[-_TAIL:] if result.output_tail else None
        conn.execute(
            "UPDATE attempts SET finished_at = %s, outcome = %s, exit_code = %s, signal = %s,"
            " error = %s, output_tail = %s WHERE id = (SELECT max(id) FROM attempts"
            " WHERE job_id = %s AND round = %s AND attempt = %s)",
            (
                now,
                result.outcome.value,
                result.exit_code,
                result.signal,
                _text(result.error),
                _text(tail),
                job.id,
                round_,
                attempt,
            ),
        )
        if result.outcome is Outcome.SUCCEEDED:
            value = json.dumps(result.result) if result.result is not None else None
            conn.execute(
                f"UPDATE jobs SET state = 'succeeded', finished_at = %s, result = %s, {_RELEASE}"
                " WHERE id = %s",
                (now, value, job.id),
            )
            return Finished(job, result.outcome, "succeeded")
        if result.outcome is Outcome.HANDED_BACK:
            conn.execute(
                "UPDATE jobs SET state = 'pending', attempts = attempts - 1, started_at = NULL,"
                f" {_RELEASE} WHERE id = %s",
                (job.id,),
            )
            return Finished(job, result.outcome, "handed_back")
        error = _text(result.error) or result.outcome.value
        limit = default_retries if job_retries is None else job_retries
        delay = retry_delay(attempt, limit, base)
        if delay is not None:
            conn.execute(
                f"UPDATE jobs SET state = 'pending', run_at = %s, last_error = %s, {_RELEASE}"
                " WHERE id = %s",
                (now + delay, error, job.id),
            )
            return Finished(job, result.outcome, "retry", delay=delay, error=error)
        errors = [
            r["error"] or r["outcome"]
            for r in conn.execute(
                "SELECT error, outcome FROM attempts WHERE job_id = %s AND round = %s"
                " AND outcome NOT IN ('succeeded', 'handed_back') ORDER BY id",
                (job.id, round_),
            ).fetchall()
        ]
        conn.execute(
            f"UPDATE jobs SET state = 'dead', finished_at = %s, last_error = %s, {_RELEASE}"
            " WHERE id = %s",
            (now, error, job.id),
        )
        conn.execute(
            "INSERT INTO dead_letter (job_id, failed_at, errors) VALUES (%s, %s, %s)"
            " ON CONFLICT (job_id) DO UPDATE SET failed_at = EXCLUDED.failed_at,"
            " errors = EXCLUDED.errors",
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
        """Take back jobs whose lease expired, or whose owner is provably dead on this host.

        Across hosts only the lease counts (a pid means nothing elsewhere); on the same host
        id a dead owner pid is proof at once. ``kill`` is called first for each (with the job
        row and the owner's host/pid) so no code of the interrupted attempt runs beside its
        next one; the interrupted attempt counts as ``lost``.

        A first read without locks finds the candidates, so the usual case (nothing to
        recover) locks no row of a live owner.
        """
        default_retries = self.max_retries if max_retries is None else max_retries
        base = self.backoff_base if backoff_base is None else backoff_base
        select = (
            "SELECT j.*, p.host AS owner_host, p.pid AS owner_pid,"
            " p.pid_start AS owner_pid_start FROM jobs j"
            f" LEFT JOIN processes p ON p.id = j.owner WHERE j.state IN {_OWNED}"
        )
        candidates = self._run(lambda conn: conn.execute(select).fetchall(), transaction=False)
        now = self._now()
        if not any(self._verdict(row, host, now, exclude_owner) for row in candidates):
            return []

        def work(conn: Conn) -> list[Recovered]:
            now = self._now()
            rows = conn.execute(
                select + " AND j.seq = ANY(%s) ORDER BY j.seq FOR UPDATE OF j SKIP LOCKED",
                ([row["seq"] for row in candidates],),
            ).fetchall()
            recovered: list[Recovered] = []
            dead_owners: set[int] = set()
            for row in rows:
                verdict = self._verdict(row, host, now, exclude_owner)
                if verdict is None:
                    continue  # renewed or finished meanwhile
                if verdict == "died" and row["owner"] is not None:
                    dead_owners.add(row["owner"])
                kill(row)
                recovered.append(self._take_back(conn, row, verdict, default_retries, base))
            if dead_owners:
                conn.execute(
                    "UPDATE processes SET stopped_at = %s WHERE id = ANY(%s)"
                    " AND stopped_at IS NULL",
                    (now, list(dead_owners)),
                )
            if recovered:
                self._notify(conn)
            return recovered

        return self._run(work)

    @staticmethod
    def _verdict(
        row: dict[str, Any], host: str, now: float, exclude_owner: int | None
    ) -> str | None:
        """Why the job must be taken back ("died", "expired", "orphan"), or None."""
        from ..procinfo import is_alive

        if exclude_owner is not None and row["owner"] == exclude_owner:
            return None
        if row["owner_pid"] is None:
            return "orphan"
        if row["owner_host"] == host and not is_alive(row["owner_pid"], row["owner_pid_start"]):
            return "died"
        if row["lease_until"] is None or row["lease_until"] < now:
            return "expired"
        return None

    def _take_back(
        self, conn: Conn, row: dict[str, Any], verdict: str, default_retries: int, base: float
    ) -> Recovered:
        job = QueuedJob.from_row(row)
        if row["state"] == CLAIMED:
            conn.execute(
                "UPDATE jobs SET state = 'pending', owner = NULL, lease_until = NULL"
                " WHERE seq = %s",
                (row["seq"],),
            )
            return Recovered(job, False, None)
        why = "its process died" if verdict == "died" else "its lease expired"
        result = AttemptResult(
            Outcome.LOST,
            error=f"lost: {why} (owner pid {row['owner_pid']} on {row['owner_host']})",
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
        return Recovered(job, True, finished)

    # -- reads -----------------------------------------------------------------------------

    def _select(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """One SELECT in autocommit (a single statement sees one snapshot anyway)."""
        return self._run(lambda conn: conn.execute(sql, params).fetchall(), transaction=False)

    def get_job(self, job_id: str) -> QueuedJob:
        rows = self._select("SELECT * FROM jobs WHERE id = %s", (job_id,))
        if not rows:
            raise UnknownJobError(job_id)
        return QueuedJob.from_row(rows[0])

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[QueuedJob]:
        """Jobs newest first; ``pending`` includes claimed ones."""
        if state is None:
            rows = self._select("SELECT * FROM jobs ORDER BY seq DESC LIMIT %s", (limit,))
        else:
            states = ["pending", CLAIMED] if state == "pending" else [state]
            rows = self._select(
                "SELECT * FROM jobs WHERE state = ANY(%s) ORDER BY seq DESC LIMIT %s",
                (states, limit),
            )
        return [QueuedJob.from_row(row) for row in rows]

    def get_attempts(self, job_id: str) -> list[Attempt]:
        rows = self._select(
            "SELECT attempt, started_at, finished_at, outcome, exit_code, signal, error,"
            " output_tail FROM attempts WHERE job_id = %s ORDER BY id",
            (job_id,),
        )
        return [Attempt(**row) for row in rows]

    def get_stats(self) -> QueueStats:
        # Counts from the deltas the triggers keep (schema v2); the oldest pending job from
        # the (state, seq) index. One snapshot: the statement's.
        rows = self._select(
            "SELECT c.key, c.n, c.deltas, h.oldest FROM (SELECT min(created_at) AS oldest FROM"
            " ((SELECT created_at FROM jobs WHERE state = 'pending' ORDER BY seq LIMIT 1)"
            f" UNION ALL (SELECT created_at FROM jobs WHERE state = '{CLAIMED}'"
            " ORDER BY seq LIMIT 1)) AS heads) AS h LEFT JOIN (SELECT key, sum(n) AS n,"
            " count(*) AS deltas FROM job_counts GROUP BY key) AS c ON true"
        )
        counts = {row["key"]: int(row["n"]) for row in rows if row["key"] is not None}
        oldest = rows[0]["oldest"] if rows else None
        if sum(int(row["deltas"] or 0) for row in rows) > FOLD_COUNTS_AFTER:
            self._fold_counts()

        def n(state: str) -> int:
            return counts.get(state, 0)

        return QueueStats(
            pending=n("pending") + n(CLAIMED),
            retrying=n("retrying"),
            running=n("running"),
            succeeded=n("succeeded"),
            cancelled=n("cancelled"),
            dead_letter=n("dead"),
            oldest_pending_at=None if oldest is None else float(oldest),
        )

    def _fold_counts(self) -> None:
        key = lock_key(self._keys(), _COUNTS_LOCK)
        self._run(lambda conn: fold_counts(conn, key))

    def get_pending_count(self) -> int:
        rows = self._select(
            f"SELECT coalesce(sum(n), 0) AS n FROM job_counts WHERE key IN ('pending', '{CLAIMED}')"
        )
        return int(rows[0]["n"])

    def count_eligible(self, include_owned: bool = False) -> int:
        """Pending jobs due now (and, if asked, claimed/running ones)."""
        owned = f" OR state IN {_OWNED}" if include_owned else ""
        rows = self._select(
            f"SELECT count(*) AS n FROM jobs WHERE (state = 'pending' AND run_at <= %s){owned}",
            (self._now(),),
        )
        return int(rows[0]["n"])

    def next_run_at(self, retries_only: bool = False) -> float | None:
        """When the earliest pending job (or retry) falls due; None when there is none."""
        where = "state = 'pending'" + (" AND attempts > 0" if retries_only else "")
        rows = self._select(f"SELECT min(run_at) AS due FROM jobs WHERE {where}")
        due = rows[0]["due"]
        return None if due is None else float(due) - self._offset

    def get_dead_letter_jobs(self, limit: int | None = None) -> list[DeadLetterJob]:
        rows = self._select(
            "SELECT j.*, d.failed_at AS dl_failed_at, d.errors AS dl_errors FROM dead_letter d"
            " JOIN jobs j ON j.id = d.job_id ORDER BY d.failed_at DESC LIMIT %s",
            (limit,),
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
        now = self._now()
        if job.run_at > now:
            return Waiting("retry" if job.attempts > 0 else "delay", job.run_at, 0)
        before = (
            "state = 'pending' AND run_at <= %(now)s AND (priority > %(priority)s"
            " OR (priority = %(priority)s AND seq < %(seq)s))"
        )
        rows = self._select(
            f"SELECT (SELECT count(*) FROM jobs WHERE {before}) AS ahead,"
            f" EXISTS (SELECT 1 FROM jobs WHERE {before} AND NOT parallel) AS seq_ahead,"
            f" (SELECT count(*) FROM jobs WHERE state IN {_OWNED}) AS owned,"
            f" (SELECT coalesce(bool_and(parallel), true) FROM jobs WHERE state IN {_OWNED})"
            " AS owned_parallel",
            {"now": now, "priority": job.priority, "seq": job.seq},
        )
        row = rows[0]
        blocked = row["seq_ahead"] or not row["owned_parallel"]
        if blocked or (not job.parallel and row["owned"] > 0):
            return Waiting("barrier", None, int(row["ahead"]))
        return Waiting("queue", None, int(row["ahead"]))

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, job_id: str) -> QueuedJob:
        def work(conn: Conn) -> None:
            row = conn.execute(
                "SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            if row["state"] != "pending":
                shown = "pending (starting)" if row["state"] == CLAIMED else row["state"]
                raise WrongStateError(
                    f"job {job_id} is {shown}; only a pending job can be cancelled"
                )
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s WHERE id = %s",
                (self._now(), job_id),
            )

        def cancelled(conn: Conn, result: None) -> bool:
            row = conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
            return row is not None and row["state"] == "cancelled"

        self._run(work, committed=cancelled)
        return self.get_job(job_id)

    def retry_dead(self, job_ids: Iterable[str] | None = None) -> list[str]:
        """Put dead jobs back as pending with 0 attempts (all of them when ``job_ids`` is None)."""
        import psycopg.errors as pe

        wanted = None if job_ids is None else list(dict.fromkeys(job_ids))

        def work(conn: Conn) -> list[str]:
            if wanted is None:
                ids = [
                    r["id"]
                    for r in conn.execute(
                        "SELECT id FROM jobs WHERE state = 'dead' ORDER BY seq FOR UPDATE"
                    ).fetchall()
                ]
            else:
                ids = wanted
                states = {
                    r["id"]: r["state"]
                    for r in conn.execute(
                        "SELECT id, state FROM jobs WHERE id = ANY(%s) FOR UPDATE", (ids,)
                    ).fetchall()
                }
                for job_id in ids:
                    if job_id not in states:
                        raise UnknownJobError(job_id)
                    if states[job_id] != "dead":
                        raise WrongStateError(f"job {job_id} is {states[job_id]}, not dead")
            if not ids:
                return []
            try:
                conn.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, round = round + 1,"
                    " run_at = %s, started_at = NULL, finished_at = NULL WHERE id = ANY(%s)",
                    (self._now(), ids),
                )
            except pe.UniqueViolation as exc:
                raise WrongStateError(
                    "a retried job has the dedupe key of a live job; cancel that one first"
                ) from exc
            conn.execute("DELETE FROM dead_letter WHERE job_id = ANY(%s)", (ids,))
            self._notify(conn)
            return ids

        def retried(conn: Conn, ids: list[str]) -> bool:
            if not ids:
                return True
            row = conn.execute("SELECT state FROM jobs WHERE id = %s", (ids[0],)).fetchone()
            return row is not None and row["state"] != "dead"

        return self._run(work, committed=retried)

    def purge_dead(self) -> int:
        return self._purge("state = 'dead'", ())

    def purge(self, older_than: float) -> int:
        """Delete finished (succeeded, dead, cancelled) jobs that finished before now - age."""
        cutoff = self._now() - older_than
        return self._purge(f"state IN {_FINAL} AND finished_at < %s", (cutoff,))

    def _purge(self, where: str, params: tuple[Any, ...]) -> int:
        def gone(conn: Conn, deleted: int) -> bool:
            return (
                conn.execute(f"SELECT 1 FROM jobs WHERE {where} LIMIT 1", params).fetchone() is None
            )

        return self._run(lambda conn: self._delete_where(conn, where, params), committed=gone)

    @staticmethod
    def _delete_where(conn: Conn, where: str, params: tuple[Any, ...]) -> int:
        conn.execute(
            f"DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE {where})", params
        )
        conn.execute(
            f"DELETE FROM dead_letter WHERE job_id IN (SELECT id FROM jobs WHERE {where})", params
        )
        return int(conn.execute(f"DELETE FROM jobs WHERE {where}", params).rowcount)


def _inserted(conn: Conn, ids: list[str]) -> bool:
    """Did the enqueue commit? Its ids were made here, so look for them."""
    row = conn.execute("SELECT count(*) AS n FROM jobs WHERE id = ANY(%s)", (ids,)).fetchone()
    return row is not None and row["n"] > 0


def _process_exists(conn: Conn, owner: int) -> bool:
    return conn.execute("SELECT 1 FROM processes WHERE id = %s", (owner,)).fetchone() is not None


def _marked(conn: Conn, jobs: list[QueuedJob]) -> bool:
    """Did the claim (or start) commit? Only it can have put these pending (or claimed)
    rows in the state it returned under this owner."""
    if not jobs:
        return True
    row = conn.execute(
        f"SELECT state, owner FROM jobs WHERE seq = %s AND state IN {_OWNED}", (jobs[0].seq,)
    ).fetchone()
    return row is not None and row["owner"] == jobs[0].owner and row["state"] == jobs[0].state


def _refuse_nul(row: tuple[Any, ...], prefix: str = "") -> None:
    """PostgreSQL text cannot hold NUL: refuse it at enqueue, naming the field."""
    for index, field in ((1, "job_type"), (7, "dedupe_key")):
        if isinstance(row[index], str) and "\x00" in row[index]:
            raise InvalidJobError(f"{prefix}{field}", "must not contain NUL characters")
