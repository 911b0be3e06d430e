"""Opening a PostgreSQL queue: the URL, connections, the schema and its migrations, errors.

A queue lives in its own PostgreSQL schema (``graphiti_mpq`` unless the URL says
``?schema=name``): its tables, a version table and nothing else. Opening a queue connects,
points ``search_path`` at that schema and migrates it when it is older than this code (under a
transaction-scoped advisory lock, so concurrent openers do not race); a newer schema is
refused. Every connection names itself (``application_name``) so an operator can tell the
store, barrier and listener connections of each process apart in ``pg_stat_activity``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import (
    BackendMissingError,
    ConfigError,
    DatabaseBusyError,
    DatabaseError,
    QueueError,
    SchemaTooNewError,
)

if TYPE_CHECKING:
    import psycopg

DEFAULT_SCHEMA = "graphiti_mpq"
SCHEMA_VERSION = 2
VERSION_TABLE = "graphiti_mpq_version"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

#: Client-side TCP keepalives: a dead server or a partition is noticed within ~15 s.
_CLIENT_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
#: Server-side keepalives, slower than the client's: a partitioned holder notices its lost
#: barrier (and stops its jobs) before the server lets another host take the barrier.
_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "4",
}
#: A session stuck inside a transaction (its process stopped or cut off) must not keep the
#: claim lock or row locks forever.
_IDLE_IN_TRANSACTION = "60s"


def need_psycopg() -> None:
    """Raise the one-line error that says how to install the backend."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise BackendMissingError(
            "a postgresql:// queue needs the postgres extra: pip install 'graphiti-mpq[postgres]'"
        ) from None


@dataclass(frozen=True)
class PgTarget:
    """Where a queue lives: the connection string, its schema, and a printable name."""

    #: the URL without our own query parameters (what libpq gets)
    conninfo: str
    schema: str
    #: the URL with any password masked, for messages and logs
    display: str

    @property
    def version_table(self) -> str:
        return f'"{self.schema}".{VERSION_TABLE}'


def parse_location(location: str, schema: str | None = None) -> PgTarget:
    """Split ``postgresql://...?schema=name`` into libpq's URL and the schema name.

    ``schema`` (an option) wins over the URL's ``schema`` parameter, which wins over the
    default ``graphiti_mpq``.
    """
    parts = urlsplit(location)
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_url = [value for key, value in query if key == "schema"]
    rest = [(key, value) for key, value in query if key != "schema"]
    chosen = schema or (from_url[-1] if from_url else "") or DEFAULT_SCHEMA
    if not _SCHEMA_NAME.fullmatch(chosen):
        raise ConfigError(
            f"schema: expected a name of letters, digits and _ (at most 63), got {chosen!r}"
        )
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    return PgTarget(conninfo, chosen, _mask(parts, rest, chosen))


def _mask(parts: Any, query: list[tuple[str, str]], schema: str) -> str:
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    shown = [(k, "***" if k == "password" else v) for k, v in query]
    if schema != DEFAULT_SCHEMA:
        shown.append(("schema", schema))
    return str(urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown))))


# -- errors --------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """The connection is gone (not a problem with one statement)."""
    import psycopg

    if not isinstance(exc, psycopg.OperationalError):
        return False
    import psycopg.errors as pe

    return not isinstance(exc, pe.LockNotAvailable | pe.QueryCanceled | pe.DiskFull)


def translate(exc: BaseException, target: PgTarget) -> QueueError:
    """One clear error for a driver error; the caller raises it ``from exc``."""
    import psycopg.errors as pe

    text = _one_line(exc)
    where = target.display
    if isinstance(exc, pe.LockNotAvailable | pe.DeadlockDetected):
        return DatabaseBusyError(f"database busy: {where}: {text}")
    if isinstance(exc, pe.ReadOnlySqlTransaction):
        return DatabaseError(f"database is read-only: {where}")
    if isinstance(exc, pe.InsufficientPrivilege):
        return DatabaseError(f"permission denied on {where}: {text}")
    if isinstance(exc, pe.DiskFull):
        return DatabaseError(f"disk full writing {where}")
    if is_connection_error(exc):
        return DatabaseError(f"cannot reach the queue database {where}: {text}")
    return DatabaseError(f"database error on {where}: {text}")


@contextmanager
def translated(target: PgTarget) -> Iterator[None]:
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, target) from exc


# -- connections ---------------------------------------------------------------------------


def connect(
    target: PgTarget,
    purpose: str,
    *,
    dict_rows: bool = False,
    lock_timeout: float | None = None,
) -> psycopg.Connection[Any]:
    """An autocommit connection whose ``search_path`` is the queue's schema.

    Raises ``DatabaseError`` (one line, password masked) when the server cannot be reached.
    """
    need_psycopg()
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.rows import dict_row

    with translated(target):
        try:
            given = conninfo_to_dict(target.conninfo)
        except psycopg.ProgrammingError as exc:
            raise DatabaseError(f"invalid PostgreSQL URL {target.display}: {exc}") from None
        options: dict[str, Any] = {
            key: value for key, value in _CLIENT_KEEPALIVES.items() if key not in given
        }
        options.setdefault("connect_timeout", given.get("connect_timeout", "10"))
        if "application_name" not in given:
            options["application_name"] = f"graphiti_mpq {purpose} pid={os.getpid()}"
        conn: psycopg.Connection[Any]
        if dict_rows:
            conn = psycopg.connect(
                target.conninfo, autocommit=True, row_factory=dict_row, **options
            )
        else:
            conn = psycopg.connect(target.conninfo, autocommit=True, **options)
        try:
            settings = dict(_SERVER_KEEPALIVES)
            settings["search_path"] = f'"{target.schema}"'
            settings["idle_in_transaction_session_timeout"] = _IDLE_IN_TRANSACTION
            if lock_timeout is not None:
                settings["lock_timeout"] = f"{max(1, int(lock_timeout * 1000))}ms"
            names = list(settings)
            conn.execute(
                "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in names),
                [item for name in names for item in (name, settings[name])],
            )
        except BaseException:
            conn.close()
            raise
    return conn


def drop(conn: psycopg.Connection[Any] | None) -> None:
    """Close a connection of this process; a forked child leaves its parent's alone."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # already broken: nothing to release
        pass


def lock_key(namespace_oid: int, purpose: int) -> int:
    """An advisory lock key of this queue: its schema's OID and a purpose (1 claim, 2 barrier).

    A fixed prefix ("gr") keeps the keys apart from other applications' small integers.
    """
    return (0x6772 << 48) | (namespace_oid << 4) | purpose


def channel_name(namespace_oid: int) -> str:
    """The LISTEN/NOTIFY channel of the queue in this schema."""
    return f"graphiti_mpq_{namespace_oid}"


# -- schema --------------------------------------------------------------------------------

_LIVE = "('pending', 'claimed', 'running')"

_V1 = (
    """CREATE TABLE jobs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL,
        job_type text NOT NULL,
        payload text NOT NULL,
        parallel boolean NOT NULL DEFAULT false,
        priority bigint NOT NULL DEFAULT 0,
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        max_retries bigint,
        timeout double precision,
        dedupe_key text,
        run_at double precision NOT NULL,
        created_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        last_error text,
        result text,
        owner bigint,
        lease_until double precision,
        worker_pid integer,
        worker_start bigint,
        pgid integer,
        duplicate_of text,
        round integer NOT NULL DEFAULT 0
    )""",
    "CREATE UNIQUE INDEX jobs_id ON jobs (id)",
    # Claims: eligible jobs in contract order.
    "CREATE INDEX jobs_claim_order ON jobs (priority DESC, seq) INCLUDE (run_at, parallel)"
    " WHERE state = 'pending'",
    # When the next pending job falls due.
    "CREATE INDEX jobs_pending_run_at ON jobs (run_at) WHERE state = 'pending'",
    "CREATE INDEX jobs_state_seq ON jobs (state, seq)",
    # Recovery and the barrier rule read only the owned jobs.
    "CREATE INDEX jobs_owned ON jobs (owner, state) WHERE state IN ('claimed', 'running')",
    # Dedupe: at most one live job per key, enforced by the database itself.
    "CREATE UNIQUE INDEX jobs_dedupe_live ON jobs (dedupe_key)"
    f" WHERE dedupe_key IS NOT NULL AND state IN {_LIVE}",
    "CREATE INDEX jobs_finished ON jobs (finished_at)"
    " WHERE state IN ('succeeded', 'dead', 'cancelled')",
    """CREATE TABLE attempts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id text NOT NULL,
        round integer NOT NULL DEFAULT 0,
        attempt integer NOT NULL,
        started_at double precision,
        finished_at double precision,
        outcome text,
        exit_code integer,
        signal text,
        error text,
        output_tail text,
        owner bigint,
        worker_pid integer,
        pgid integer
    )""",
    "CREATE INDEX attempts_job ON attempts (job_id, id)",
    """CREATE TABLE dead_letter (
        job_id text PRIMARY KEY,
        failed_at double precision NOT NULL,
        errors text NOT NULL
    )""",
    """CREATE TABLE processes (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        pid_start bigint,
        kind text NOT NULL,
        lease double precision,
        started_at double precision NOT NULL,
        last_heartbeat double precision NOT NULL,
        jobs_done bigint NOT NULL DEFAULT 0,
        stopped_at double precision
    )""",
)

_RETRYING = "state = 'pending' AND attempts > 0"

#: Counts of jobs per state (and ``retrying``: pending with attempts > 0) without counting a
#: million rows. Statement-level triggers append one delta row per key a statement changed, so
#: concurrent writers never wait on (or deadlock over) shared count rows; ``get_stats`` sums
#: the deltas, and ``fold_counts`` folds them back into one row per key now and then.
_V2 = (
    "CREATE TABLE job_counts (key text NOT NULL, n bigint NOT NULL)",
    f"""CREATE FUNCTION job_counts_apply() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO job_counts (key, n)
            SELECT key, sum(d) FROM (
                SELECT state AS key, 1 AS d FROM new_rows
                UNION ALL SELECT 'retrying', 1 FROM new_rows WHERE {_RETRYING}
            ) AS delta GROUP BY key;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO job_counts (key, n)
            SELECT key, sum(d) FROM (
                SELECT state AS key, -1 AS d FROM old_rows
                UNION ALL SELECT 'retrying', -1 FROM old_rows WHERE {_RETRYING}
            ) AS delta GROUP BY key;
        ELSE
            INSERT INTO job_counts (key, n)
            SELECT key, sum(d) FROM (
                SELECT state AS key, 1 AS d FROM new_rows
                UNION ALL SELECT 'retrying', 1 FROM new_rows WHERE {_RETRYING}
                UNION ALL SELECT state, -1 FROM old_rows
                UNION ALL SELECT 'retrying', -1 FROM old_rows WHERE {_RETRYING}
            ) AS delta GROUP BY key HAVING sum(d) <> 0;
        END IF;
        RETURN NULL;
    END $$""",
    # Triggers first: they lock jobs against writers until the migration commits, so the
    # backfill below sees every row written before and the triggers every row written after.
    "CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION job_counts_apply()",
    "CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION job_counts_apply()",
    "CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION job_counts_apply()",
    "INSERT INTO job_counts (key, n) SELECT state, count(*) FROM jobs GROUP BY state"
    f" UNION ALL SELECT 'retrying', count(*) FROM jobs WHERE {_RETRYING}",
    # The latest dead letters (status).
    "CREATE INDEX dead_letter_failed_at ON dead_letter (failed_at)",
)

#: The statements of each version. Append a version to change the schema.
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _V1, 2: _V2}

#: Delta rows of ``job_counts`` beyond which they are folded.
FOLD_COUNTS_AFTER = 64


def fold_counts(conn: psycopg.Connection[Any], key: int) -> None:
    """Fold the delta rows of ``job_counts`` into one row per key, inside the caller's
    transaction. Writers only append deltas, so this waits for none of them; ``key`` (an
    advisory lock) keeps two folds apart, and a fold that finds it taken is skipped."""
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
    if row is None or not _first(row):
        return
    conn.execute(
        "WITH gone AS (DELETE FROM job_counts RETURNING key, n)"
        " INSERT INTO job_counts (key, n)"
        " SELECT key, sum(n) FROM gone GROUP BY key HAVING sum(n) <> 0"
    )


def _found_version(conn: psycopg.Connection[Any], target: PgTarget) -> int | None:
    """The schema version, or None where there is no version table yet."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (target.version_table,)).fetchone()
    if row is None or not _first(row):
        return None
    row = conn.execute(f"SELECT max(version) FROM {target.version_table}").fetchone()
    value = _first(row) if row is not None else None
    return 0 if value is None else int(value)


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def _too_new(target: PgTarget, found: int) -> SchemaTooNewError:
    return SchemaTooNewError(
        f"{target.display} (schema {target.schema}) uses queue schema {found}, newer than this"
        f" graphiti_mpq (schema {SCHEMA_VERSION}): upgrade graphiti_mpq"
    )


def migrate(conn: psycopg.Connection[Any], target: PgTarget) -> int:
    """Bring the queue's schema to SCHEMA_VERSION; refuse a newer one. Returns the version found.

    A schema that holds tables but no version table belongs to something else and is refused.
    """
    with translated(target):
        found = _found_version(conn, target)
        if found == SCHEMA_VERSION:
            return found
        if found is not None and found > SCHEMA_VERSION:
            raise _too_new(target, found)
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"graphiti_mpq:{target.schema}",)
            )
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"')
            found = _found_version(conn, target)  # another process may have migrated meanwhile
            if found is None:
                _refuse_foreign(conn, target)
                conn.execute(f"CREATE TABLE {target.version_table} (version integer NOT NULL)")
                conn.execute(f"INSERT INTO {target.version_table} (version) VALUES (0)")
                found = 0
            if found > SCHEMA_VERSION:
                raise _too_new(target, found)
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)  # unqualified: search_path is the schema
            conn.execute(f"UPDATE {target.version_table} SET version = %s", (SCHEMA_VERSION,))
    return found


def _refuse_foreign(conn: psycopg.Connection[Any], target: PgTarget) -> None:
    row = conn.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (target.schema,)
    ).fetchone()
    if row is not None and _first(row):
        raise DatabaseError(
            f"schema {target.schema} of {target.display} holds tables of something else,"
            " not a queue: choose another schema with ?schema=name"
        )


def namespace_oid(conn: psycopg.Connection[Any], target: PgTarget) -> int:
    row = conn.execute(
        "SELECT oid::bigint FROM pg_namespace WHERE nspname = %s", (target.schema,)
    ).fetchone()
    if row is None:
        raise DatabaseError(f"schema {target.schema} of {target.display} disappeared")
    return int(_first(row))
