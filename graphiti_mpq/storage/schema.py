"""The SQLite schema and its migrations.

The schema version lives in ``PRAGMA user_version`` so that opening a queue costs one pragma
read when it is current (the enqueue fast path relies on that). Migrations run in order inside
one ``BEGIN IMMEDIATE`` transaction; a database whose version is newer than ours is refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..errors import SchemaTooNewError

#: The version this code writes. Bump it and append a migration to change the schema.
SCHEMA_VERSION = 3

# Indexes are raw SQL: they are partial (WHERE ...), which sqlite-utils cannot express.
_V1_INDEXES = (
    # Claims: eligible jobs in contract order; run_at/parallel/attempts make the scan covering.
    "CREATE INDEX jobs_claim_order ON jobs(priority DESC, seq, run_at, parallel, attempts)"
    " WHERE state = 'pending'",
    # Counts by state, `jobs --state S` newest first, the oldest pending job.
    "CREATE INDEX jobs_state_seq ON jobs(state, seq)",
    # Recovery and the barrier check read only the owned jobs.
    "CREATE INDEX jobs_owned ON jobs(owner, state) WHERE state IN ('claimed', 'running')",
    # Dedupe: at most one live job per key, enforced by the database itself.
    "CREATE UNIQUE INDEX jobs_dedupe_live ON jobs(dedupe_key)"
    " WHERE dedupe_key IS NOT NULL AND state IN ('pending', 'claimed', 'running')",
    # Purge of finished jobs by age (schema v3 redefines it: _JOBS_FINISHED).
    "CREATE INDEX jobs_finished ON jobs(finished_at)"
    " WHERE state IN ('succeeded', 'dead', 'cancelled')",
    "CREATE INDEX attempts_job ON attempts(job_id, id)",
)

_JOBS_FINISHED = "CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL"


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Jobs, their attempt history, the dead-letter table and the serving processes."""
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.table("jobs").create(
        {
            "seq": int,  # enqueue order
            "id": str,
            "job_type": str,
            "payload": str,  # compact JSON
            "parallel": int,
            "priority": int,
            "state": str,
            "attempts": int,
            "max_retries": int,  # NULL: the serving process's setting
            "timeout": float,  # NULL: the serving process's setting
            "dedupe_key": str,
            "run_at": float,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "last_error": str,
            "result": str,  # JSON
            "owner": int,  # processes.id while claimed or running
            "lease_until": float,
            "worker_pid": int,
            "worker_start": int,
            "pgid": int,
            "duplicate_of": str,
            "round": int,  # bumped by a dead-letter retry; attempt numbers restart
        },
        pk="seq",
        not_null={
            "id",
            "job_type",
            "payload",
            "parallel",
            "priority",
            "state",
            "attempts",
            "round",
        },
        defaults={"parallel": 0, "priority": 0, "attempts": 0, "round": 0},
    )
    db.table("jobs").create_index(["id"], unique=True, index_name="jobs_id")
    db.table("attempts").create(
        {
            "id": int,
            "job_id": str,
            "round": int,
            "attempt": int,
            "started_at": float,
            "finished_at": float,
            "outcome": str,
            "exit_code": int,
            "signal": str,
            "error": str,
            "output_tail": str,
            "owner": int,
            "worker_pid": int,
            "pgid": int,
        },
        pk="id",
        not_null={"job_id", "attempt"},
    )
    db.table("dead_letter").create(
        {"job_id": str, "failed_at": float, "errors": str},
        pk="job_id",
        not_null={"failed_at", "errors"},
    )
    db.table("processes").create(
        {
            "id": int,
            "host": str,
            "pid": int,
            "pid_start": int,
            "kind": str,
            "lease": float,
            "started_at": float,
            "last_heartbeat": float,
            "jobs_done": int,
            "stopped_at": float,
        },
        pk="id",
        not_null={"host", "pid", "kind", "started_at", "last_heartbeat", "jobs_done"},
        defaults={"jobs_done": 0},
    )
    for statement in _V1_INDEXES:
        conn.execute(statement)


#: The keys of ``job_counts``: every job state, and ``retrying`` (pending with attempts > 0).
#: A migration that adds a state must seed its row: the triggers only update existing rows.
COUNT_KEYS = ("pending", "claimed", "running", "succeeded", "dead", "cancelled", "retrying")

#: Counts of jobs per key, kept exact by triggers so that ``get_stats`` reads a few rows
#: instead of counting a million. SQLite has one writer at a time, so the hot rows cost no
#: contention. Plain UPDATEs of seeded rows: a trigger runs for each row written, and an
#: upsert there costs a third more per row than an UPDATE.
_V2_COUNTS = (
    "CREATE TABLE job_counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
        UPDATE job_counts SET n = n + 1 WHERE key = NEW.state;
    END""",
    """CREATE TRIGGER jobs_count_insert_retrying AFTER INSERT ON jobs
    WHEN NEW.state = 'pending' AND NEW.attempts > 0 BEGIN
        UPDATE job_counts SET n = n + 1 WHERE key = 'retrying';
    END""",
    """CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE key = OLD.state;
    END""",
    """CREATE TRIGGER jobs_count_delete_retrying AFTER DELETE ON jobs
    WHEN OLD.state = 'pending' AND OLD.attempts > 0 BEGIN
        UPDATE job_counts SET n = n - 1 WHERE key = 'retrying';
    END""",
    """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state IS NOT NEW.state BEGIN
        UPDATE job_counts SET n = n - 1 WHERE key = OLD.state;
        UPDATE job_counts SET n = n + 1 WHERE key = NEW.state;
    END""",
    """CREATE TRIGGER jobs_count_update_retrying AFTER UPDATE OF state, attempts ON jobs
    WHEN (OLD.state = 'pending' AND OLD.attempts > 0)
        IS NOT (NEW.state = 'pending' AND NEW.attempts > 0) BEGIN
        UPDATE job_counts
            SET n = n + CASE WHEN NEW.state = 'pending' AND NEW.attempts > 0 THEN 1 ELSE -1 END
            WHERE key = 'retrying';
    END""",
)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """``job_counts`` and its triggers, backfilled from the rows already there; an index for
    the latest dead letters (``status``)."""
    for statement in _V2_COUNTS:
        conn.execute(statement)
    marks = ",".join("?" * len(COUNT_KEYS))
    conn.execute(
        f"INSERT INTO job_counts (key, n) VALUES {','.join('(?, 0)' for _ in COUNT_KEYS)}",
        COUNT_KEYS,
    )
    conn.execute(  # one index range count per state (jobs_state_seq)
        "UPDATE job_counts SET n = (SELECT count(*) FROM jobs WHERE state = job_counts.key)"
        " WHERE key <> 'retrying'"
    )
    conn.execute(
        "UPDATE job_counts SET n = (SELECT count(*) FROM jobs"
        " WHERE state = 'pending' AND attempts > 0) WHERE key = 'retrying'"
    )
    conn.execute(  # a state this code does not know (none exists): counted all the same
        "INSERT INTO job_counts (key, n) SELECT state, count(*) FROM jobs"
        f" WHERE state NOT IN ({marks}) GROUP BY state",
        COUNT_KEYS,
    )
    conn.execute("CREATE INDEX dead_letter_failed_at ON dead_letter(failed_at)")


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """``jobs_finished`` keyed on ``finished_at IS NOT NULL`` instead of a list of states.

    SQLite checks a partial index's condition on the old and the new row of every update that
    touches its columns: a claim and an outcome each checked ``state IN (three states)``, which
    SQLite evaluates through a temporary table (about 2 µs a check, 5 µs of a job's 37 in
    claim and outcome); ``IS NOT NULL`` costs nothing. Only finished jobs have a
    ``finished_at`` (a claim clears it), and purge's ``finished_at < ?`` still uses the index.
    """
    conn.execute("DROP INDEX jobs_finished")
    conn.execute(_JOBS_FINISHED)


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
}


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, location: str) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a newer one. Returns the version found."""
    found = current_version(conn)
    if found == SCHEMA_VERSION:
        return found
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{location} uses queue schema {found}, newer than this graphiti_mpq "
            f"(schema {SCHEMA_VERSION}): upgrade graphiti_mpq"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = current_version(conn)  # another process may have migrated meanwhile
        for version in range(found + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
