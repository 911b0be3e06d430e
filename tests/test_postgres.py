"""What only the PostgreSQL backend has: its URL and schema, migrations, the advisory-lock
barrier, LISTEN/NOTIFY wake-ups, connection loss, clocks, and recovery across hosts.

The store's behaviour itself is tested on both backends by test_store.py and
test_claims_multiprocess.py. Connections are cut the way a server restart or an operator
would cut them: ``pg_terminate_backend``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq import status
from graphiti_mpq.errors import (
    BackendMissingError,
    ConfigError,
    DatabaseError,
    InvalidJobError,
    SchemaTooNewError,
)
from graphiti_mpq.models import AttemptResult, Outcome
from graphiti_mpq.storage import open_queue
from graphiti_mpq.storage.pg_conn import SCHEMA_VERSION, VERSION_TABLE, parse_location
from graphiti_mpq.storage.pg_wait import PgBarrier, PgWakeListener
from graphiti_mpq.storage.postgres import PostgresQueue

from .backends import PgSchemas, raw_sql, with_schema
from .helpers import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_pg(pg_location: str) -> Iterator[Callable[..., PostgresQueue]]:
    """Opened PostgreSQL queues on the test's fresh schema; all closed at the end."""
    opened: list[PostgresQueue] = []

    def make(location: str | None = None, **options: Any) -> PostgresQueue:
        options.setdefault("backoff_base", 0.1)
        q = PostgresQueue(location or pg_location, **options)
        opened.append(q)
        return q.open()

    yield make
    for q in opened:
        q.close()


@pytest.fixture
def pq(make_pg: Callable[..., PostgresQueue]) -> PostgresQueue:
    return make_pg()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Barriers and listeners to close at the end, whatever happened."""
    things: list[Any] = []
    yield things
    for thing in things:
        thing.close()


def admin(pg_schemas: PgSchemas, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """One statement on a plain connection to the test server."""
    import psycopg

    with psycopg.connect(parse_location(pg_schemas.url).conninfo, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []


def cut(pg_schemas: PgSchemas, conn: Any) -> None:
    """pg_terminate_backend one connection (a psycopg connection)."""
    assert admin(pg_schemas, "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,)) == [
        (True,)
    ]


def terminate(pg_schemas: PgSchemas, purpose: str, pid: int | None = None) -> int:
    """pg_terminate_backend every connection of ``purpose`` (store, barrier, listener) of a
    process (default: this one); returns how many were cut."""
    name = f"graphiti_mpq {purpose} pid={pid or os.getpid()}"
    rows = admin(
        pg_schemas,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    return sum(1 for (done,) in rows if done)


# -- locations and errors ------------------------------------------------------------------


def test_the_schema_comes_from_the_option_then_the_url_then_the_default() -> None:
    base = "postgresql://u:s3cret@db.example:5432/q"
    assert parse_location(base).schema == "graphiti_mpq"
    target = parse_location(base + "?schema=team_a&sslmode=prefer")
    assert target.schema == "team_a"
    assert "schema" not in target.conninfo and "sslmode=prefer" in target.conninfo
    assert parse_location(base + "?schema=team_a", "other").schema == "other"
    # the password never shows in messages
    assert "s3cret" not in target.display and "u:***@db.example" in target.display
    assert "s3cret" not in parse_location("postgresql://h/q?password=s3cret").display
    for bad in ("1abc", "a-b", "x" * 64, 'a"b'):
        with pytest.raises(ConfigError):
            parse_location(base, bad)


def test_a_missing_driver_says_how_to_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(BackendMissingError) as info:
        open_queue("postgresql://postgres@127.0.0.1/test")
    message = str(info.value)
    assert "pip install 'graphiti-mpq[postgres]'" in message and "\n" not in message


def test_an_unreachable_server_is_one_clear_line_without_the_password() -> None:
    q = PostgresQueue("postgresql://postgres:s3cret@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(DatabaseError) as info:
        q.open()
    q.close()
    message = str(info.value)
    assert "cannot reach the queue database" in message and "127.0.0.1:1" in message
    assert "s3cret" not in message and "\n" not in message


def test_the_cli_uses_the_postgres_backend(pg_location: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHITI_QUEUE")}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-m", "graphiti_mpq", "--db", pg_location]
    added = subprocess.run(
        [*run, "enqueue", "--type", "t", "--payload", "{}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job_id = added.stdout.strip()
    shown = subprocess.run(
        [*run, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pending"] == 1
    q = open_queue(pg_location)
    try:
        assert q.get_job(job_id).state == "pending"
    finally:
        q.close()


# -- schema and migrations -----------------------------------------------------------------


def test_a_fresh_schema_is_created_and_versioned(pq: PostgresQueue) -> None:
    tables = {
        row[0]
        for row in raw_sql(pq, "SELECT tablename FROM pg_tables WHERE schemaname = ?", (pq.schema,))
    }
    assert tables == {"jobs", "attempts", "dead_letter", "processes", "job_counts", VERSION_TABLE}
    assert raw_sql(pq, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION,)]
    indexes = {
        row[0]
        for row in raw_sql(
            pq, "SELECT indexname FROM pg_indexes WHERE schemaname = ?", (pq.schema,)
        )
    }
    assert indexes >= {"jobs_claim_order", "jobs_owned", "jobs_dedupe_live", "attempts_job"}


def test_a_version_1_schema_is_upgraded_in_place(
    make_pg: Callable[..., PostgresQueue], pg_location: str
) -> None:
    import psycopg

    from graphiti_mpq.storage.pg_conn import MIGRATIONS

    target = parse_location(pg_location)
    now = time.time()
    jobs = [  # (id, state, attempts)
        ("p1", "pending", 0),
        ("r1", "pending", 2),
        ("c1", "claimed", 0),
        ("u1", "running", 1),
        ("s1", "succeeded", 1),
        ("d1", "dead", 4),
        ("x1", "cancelled", 0),
    ]
    with psycopg.connect(target.conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute(f'CREATE SCHEMA "{target.schema}"')
        conn.execute(f'SET search_path = "{target.schema}"')
        conn.execute(f"CREATE TABLE {VERSION_TABLE} (version integer NOT NULL)")
        conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (1)")
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        for offset, (job_id, state, attempts) in enumerate(jobs):
            conn.execute(
                "INSERT INTO jobs (id, job_type, payload, parallel, state, attempts, run_at,"
                " created_at) VALUES (%s, 't', '{}', true, %s, %s, %s, %s)",
                (job_id, state, attempts, now, now - 100 + offset),
            )
        conn.execute(
            "INSERT INTO dead_letter (job_id, failed_at, errors) VALUES ('d1', %s, '[]')", (now,)
        )
    q = make_pg()
    assert raw_sql(q, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 2
    assert raw_sql(q, "SELECT id, state, attempts FROM jobs ORDER BY seq") == jobs
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.running) == (3, 1, 1)
    assert (stats.succeeded, stats.cancelled, stats.dead_letter) == (1, 1, 1)
    assert stats.oldest_pending_at == pytest.approx(now - 100)
    q.retry_dead(["d1"])
    q.cancel("p1")
    stats = q.get_stats()
    assert (stats.pending, stats.retrying, stats.cancelled, stats.dead_letter) == (3, 1, 2, 0)


def test_opening_again_and_concurrently_migrates_once(
    make_pg: Callable[..., PostgresQueue], pg_location: str
) -> None:
    errors: list[BaseException] = []
    opened: list[PostgresQueue] = []

    def open_one() -> None:
        try:
            opened.append(PostgresQueue(pg_location).open())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for q in opened:
        q.close()
    assert errors == []
    q = make_pg()
    job_id = q.enqueue("t", {})
    assert make_pg().get_job(job_id).state == "pending"
    assert raw_sql(q, f"SELECT count(*) FROM {VERSION_TABLE}") == [(1,)]


def test_a_newer_schema_is_refused_and_left_alone(pq: PostgresQueue, pg_location: str) -> None:
    job_id = pq.enqueue("t", {})
    raw_sql(pq, f"UPDATE {VERSION_TABLE} SET version = ?", (SCHEMA_VERSION + 1,))
    newer = PostgresQueue(pg_location)
    with pytest.raises(SchemaTooNewError) as info:
        newer.open()
    newer.close()
    message = str(info.value)
    assert str(SCHEMA_VERSION + 1) in message and "upgrade" in message
    assert pq.schema in message
    assert raw_sql(pq, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION + 1,)]
    assert raw_sql(pq, "SELECT state FROM jobs WHERE id = ?", (job_id,)) == [("pending",)]


def test_a_schema_of_another_app_is_refused(pg_schemas: PgSchemas) -> None:
    name = pg_schemas.new()
    admin(pg_schemas, f'CREATE SCHEMA "{name}"')
    admin(pg_schemas, f'CREATE TABLE "{name}".notes (body text)')
    q = PostgresQueue(with_schema(pg_schemas.url, name))
    with pytest.raises(DatabaseError) as info:
        q.open()
    q.close()
    assert "something else" in str(info.value)
    tables = admin(pg_schemas, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (name,))
    assert tables == [("notes",)]
    pg_schemas.drop(name)


def test_queues_in_two_schemas_are_separate(
    make_pg: Callable[..., PostgresQueue], pg_schemas: PgSchemas, closing: list[Any]
) -> None:
    a = make_pg()
    b = make_pg(with_schema(pg_schemas.url, pg_schemas.new()))
    a.enqueue("t", {})
    assert (a.get_pending_count(), b.get_pending_count()) == (1, 0)
    # their barriers do not exclude each other
    barrier_a, barrier_b = a.barrier(), b.barrier()
    closing.extend([barrier_a, barrier_b])
    assert barrier_a.acquire_exclusive(1.0)
    assert barrier_b.acquire_exclusive(1.0)


def test_nul_in_text_is_refused_at_enqueue_and_scrubbed_from_errors(pq: PostgresQueue) -> None:
    with pytest.raises(InvalidJobError) as info:
        pq.enqueue("a\x00b", {})
    assert info.value.field == "job_type"
    with pytest.raises(InvalidJobError) as info:
        pq.enqueue_many([{"job_type": "t", "payload": {}, "dedupe_key": "\x00"}])
    assert info.value.field == "jobs[0].dedupe_key"
    pq.enqueue("t", {"text": "nul \x00 inside"})  # JSON escapes it
    (job,) = pq.get_batch(1)
    assert job.payload == {"text": "nul \x00 inside"}
    owner = job.owner
    result = AttemptResult(Outcome.FAILED, error="bad\x00byte", output_tail="\udcff\x00tail")
    pq.finish([(job, result)], owner=owner)
    attempt = pq.get_attempts(job.id)[0]
    assert attempt.error == "bad\ufffdbyte" and attempt.output_tail == "?\ufffdtail"


# -- the barrier: advisory locks -----------------------------------------------------------


def test_shared_holds_coexist_and_exclude_the_exclusive_one(
    make_pg: Callable[..., PostgresQueue], closing: list[Any]
) -> None:
    q = make_pg()
    a, b, c = q.barrier(), make_pg().barrier(), make_pg().barrier()
    closing.extend([a, b, c])
    assert a.try_shared() and b.try_shared()
    assert (a.mode, b.mode) == ("shared", "shared")
    started = time.monotonic()
    assert not c.acquire_exclusive(0.3)
    assert 0.25 <= time.monotonic() - started < 5
    assert c.mode is None
    a.release()
    assert not c.acquire_exclusive(0.1)
    b.release()
    assert c.acquire_exclusive(0.1) and c.mode == "exclusive"
    assert not a.try_shared()  # no wait
    assert not b.acquire_exclusive(0.05)
    c.release()
    assert a.try_shared()
    with pytest.raises(RuntimeError):
        a.acquire_exclusive(0.1)


def test_a_waiting_exclusive_request_holds_back_new_shared_ones(
    pq: PostgresQueue, closing: list[Any]
) -> None:
    a, waiter, late = pq.barrier(), pq.barrier(), pq.barrier()
    closing.extend([a, waiter, late])
    assert a.try_shared()
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire_exclusive(10.0)))
    thread.start()
    # once the exclusive request queues, a later shared request does not jump it
    queued = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid::bigint = ? AND objid::bigint = ?"
    )
    key = (a.key >> 32, a.key & 0xFFFFFFFF)
    wait_until(lambda: raw_sql(pq, queued, key)[0][0] == 1, what="the exclusive request to queue")
    assert not late.try_shared()
    a.release()
    thread.join(10)
    assert got == [True] and waiter.mode == "exclusive"


def test_a_terminated_holder_loses_the_barrier_and_says_so(
    pq: PostgresQueue, pg_schemas: PgSchemas, closing: list[Any]
) -> None:
    holder = pq.barrier()
    other = PgBarrier(holder.target, holder.key)
    closing.extend([holder, other])
    assert holder.acquire_exclusive(1.0)
    assert holder.healthy()
    assert not other.try_shared()
    cut(pg_schemas, holder._conn)  # the server drops the holder's session
    # the hold is gone at once for the others, and the holder learns it without a query
    wait_until(other.try_shared, what="the barrier to be free")
    wait_until(lambda: not holder.healthy(), what="the holder to notice")
    assert holder.mode == "exclusive"  # still believed held until released
    holder.release()  # nothing to give back, no error
    assert holder.mode is None and holder.healthy()
    other.release()
    assert holder.acquire_exclusive(1.0)  # a new connection
    assert holder.healthy()


def test_a_lost_shared_hold_admits_no_more_work_until_released(
    pq: PostgresQueue, pg_schemas: PgSchemas, closing: list[Any]
) -> None:
    holder = pq.barrier()
    closing.append(holder)
    assert holder.try_shared()
    cut(pg_schemas, holder._conn)
    wait_until(lambda: not holder.healthy(), what="the holder to notice")
    assert not holder.try_shared()
    holder.release()
    assert holder.try_shared() and holder.healthy()


def test_the_barrier_survives_a_dead_idle_connection(
    pq: PostgresQueue, pg_schemas: PgSchemas, closing: list[Any]
) -> None:
    barrier = pq.barrier()
    closing.append(barrier)
    assert barrier.try_shared()
    barrier.release()
    cut(pg_schemas, barrier._conn)  # nothing held: the next request just reconnects
    assert barrier.try_shared()
    barrier.release()
    cut(pg_schemas, barrier._conn)
    assert barrier.acquire_exclusive(0.5)


# -- wake-up: LISTEN/NOTIFY ----------------------------------------------------------------


def test_an_enqueue_wakes_a_listener_without_polling(
    make_pg: Callable[..., PostgresQueue], closing: list[Any]
) -> None:
    q = make_pg()
    listener = q.wake_listener()
    closing.append(listener)
    started = time.monotonic()
    assert listener.wait(0.3) is False
    assert time.monotonic() - started >= 0.28
    other = make_pg()  # another process's enqueue
    woke: list[float] = []

    def wait() -> None:
        if listener.wait(10.0):
            woke.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    enqueued = time.monotonic()
    other.enqueue("t", {})
    thread.join(10)
    assert woke and woke[0] - enqueued < 2.0
    assert listener.wait(0.05) is False  # consumed
    other.enqueue_many([{"job_type": "t", "payload": {}} for _ in range(3)])
    assert listener.wait(5.0) is True
    assert listener.wait(0.05) is False  # one wake-up for many notifications


def test_a_notification_arrives_only_when_the_enqueue_commits(
    pq: PostgresQueue, closing: list[Any]
) -> None:
    import psycopg

    listener = pq.wake_listener()
    closing.append(listener)
    with psycopg.connect(pq.target.conninfo) as conn:  # not autocommit: one transaction
        conn.execute("SELECT pg_notify(%s, '')", (listener.channel,))
        assert listener.wait(0.3) is False
        conn.commit()
    assert listener.wait(5.0) is True


def test_a_listener_survives_a_lost_connection(
    pq: PostgresQueue, pg_schemas: PgSchemas, closing: list[Any]
) -> None:
    listener = pq.wake_listener()
    closing.append(listener)
    cut(pg_schemas, listener._conn)
    # it reports a wake-up (a notification may have been missed), then listens again
    assert wait_until(lambda: listener.wait(0.5), what="the listener to reconnect")
    pq.enqueue("t", {})
    assert wait_until(lambda: listener.wait(0.5), what="the next notification")


def test_closing_a_listener_wakes_its_waiter(pq: PostgresQueue) -> None:
    listener = pq.wake_listener()
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            listener.wait(30.0)
        except (OSError, ValueError) as exc:
            raised.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    listener.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert raised and isinstance(raised[0], ValueError)
    listener.close()  # twice is fine


def test_a_listener_without_the_server_raises_at_once(pq: PostgresQueue) -> None:
    bad = parse_location("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(DatabaseError):
        PgWakeListener(bad, "graphiti_mpq_0")


# -- the store's connection ----------------------------------------------------------------


def test_the_store_reconnects_after_its_connection_is_terminated(
    pq: PostgresQueue, pg_schemas: PgSchemas
) -> None:
    job_id = pq.enqueue("t", {}, True)
    cut(pg_schemas, pq._conn)
    assert pq.get_job(job_id).state == "pending"  # a read retries on a new connection
    cut(pg_schemas, pq._conn)
    (job,) = pq.get_batch(1)  # and so does a write
    cut(pg_schemas, pq._conn)
    pq.ack(job, "done")
    assert pq.get_job(job_id).result == "done"
    assert [a.outcome for a in pq.get_attempts(job_id)] == ["succeeded"]


def test_a_connection_lost_during_commit_is_resolved_by_looking(
    pq: PostgresQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server may or may not have committed when the connection died during COMMIT:
    the store looks at the database instead of guessing (no double enqueue, no lost claim,
    no ack refused as "not running")."""
    import psycopg

    real_execute = psycopg.Connection.execute
    plan: list[str] = []  # "after": COMMIT reaches the server, then the connection dies

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == "COMMIT" and plan and self is pq._conn:
            if plan.pop() == "after":
                real_execute(self, "COMMIT")
            real_execute(self, "SELECT pg_terminate_backend(pg_backend_pid())")
        return real_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    assert pq.get_batch(0) == []  # registers the API owner before the cuts
    made = []
    for when in ("after", "before"):
        plan.append(when)
        made.append(pq.enqueue("t", {"when": when}, True))
        assert not plan
    assert sorted(j.id for j in pq.list_jobs()) == sorted(made)  # each exactly once
    plan.append("after")
    claimed = pq.get_batch(5)
    assert sorted(j.id for j in claimed) == sorted(made)  # the committed claim is returned
    pq.enqueue("t", {"n": 3}, True)
    plan.append("before")
    (third,) = pq.get_batch(5)  # not committed: claimed again on the new connection
    assert third.attempts == 1 and len(pq.get_attempts(third.id)) == 1
    plan.append("after")
    pq.ack(claimed[0], "ok")  # recorded, and not refused
    plan.append("before")
    pq.ack(claimed[1], "ok")
    assert {pq.get_job(j.id).state for j in claimed} == {"succeeded"}
    assert [len(pq.get_attempts(j.id)) for j in claimed] == [1, 1]
    pending = pq.enqueue("t", {}, True)
    plan.append("after")
    assert pq.cancel(pending).state == "cancelled"
    assert not plan


def test_the_clock_of_the_server_wins_over_a_skewed_host(
    pg_location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # this host is an hour ahead
    skewed = PostgresQueue(pg_location, backoff_base=0.1).open()
    try:
        job_id = skewed.enqueue("t", {}, True)
        monkeypatch.setattr(time, "time", real)
        created = skewed.get_job(job_id).created_at
        assert abs(created - real()) < 5  # stamped on the server's clock
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
        (job,) = skewed.get_batch(1)  # due now by the server's clock, not in an hour
        owner = skewed.register_process("supervise", "skewed-host", 2.0)
        skewed.heartbeat(owner, 2.0)
        monkeypatch.setattr(time, "time", real)
        # a correct host does not see the skewed host's heartbeat as an hour old
        honest = PostgresQueue(pg_location).open()
        try:
            procs = {p.id: p for p in honest.list_processes()}
            assert procs[owner].alive
            assert honest.recover("honest-host", kill=lambda row: None) == []
        finally:
            honest.close()
        skewed.ack(job)
    finally:
        skewed.close()


# -- claims and recovery across hosts ------------------------------------------------------


def test_a_claim_waits_for_the_claim_lock_and_is_stamped_after_it(
    pq: PostgresQueue,
) -> None:
    import psycopg

    from graphiti_mpq.storage.pg_conn import lock_key

    job_id = pq.enqueue("t", {}, True)
    assert pq.get_batch(0) == []  # registers the API owner now, not under the lock
    key = lock_key(pq._keys(), 1)
    with psycopg.connect(pq.target.conninfo) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(pq.get_batch(1)))
        thread.start()
        time.sleep(0.3)
        assert result == [] and thread.is_alive()  # waiting for the lock
        released = time.time()
        holder.commit()
    thread.join(10)
    (jobs,) = result
    assert [j.id for j in jobs] == [job_id]
    assert jobs[0].started_at is not None and jobs[0].started_at >= released


CLAIM_AND_VANISH = """
    import json, os, signal, sys
    from graphiti_mpq.storage import open_queue
    q = open_queue(sys.argv[1])
    owner = q.register_process("supervise", sys.argv[2], float(sys.argv[3]))
    jobs = q.claim(owner, 10, float(sys.argv[3]))
    print(json.dumps({"owner": owner, "ids": [j.id for j in jobs]}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no goodbye: the host "crashed"
"""


def test_jobs_of_a_crashed_host_are_recovered_by_another_once_the_lease_passes(
    pq: PostgresQueue,
) -> None:
    ids = [pq.enqueue("t", {"i": i}, True) for i in range(3)]
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLAIM_AND_VANISH), pq.location, "host-a", "1.5"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    crashed = json.loads(child.stdout)
    assert sorted(crashed["ids"]) == sorted(ids)
    killed_at = time.time()
    # host-b cannot check a pid of host-a: only the lease decides
    assert pq.recover("host-b", kill=lambda row: pytest.fail("not yet")) == []
    seen: list[dict[str, Any]] = []
    recovered = wait_until(
        lambda: pq.recover("host-b", kill=seen.append), timeout=15, what="lease expiry"
    )
    assert time.time() - killed_at >= 1.0
    assert sorted(r.job.id for r in recovered) == sorted(ids)
    assert {row["owner_host"] for row in seen} == {"host-a"}
    for job_id in ids:
        (attempt,) = pq.get_attempts(job_id)
        assert attempt.outcome == "lost" and "lease" in (attempt.error or "")
        assert "host-a" in (attempt.error or "")
    # the crashed host shows as not alive; its jobs run again elsewhere
    procs = {p.id: p for p in pq.list_processes()}
    assert not procs[crashed["owner"]].alive
    again: list[Any] = []
    wait_until(lambda: again.extend(pq.get_batch(5)) or len(again) == 3, what="the retries")
    assert sorted(j.id for j in again) == sorted(ids) and {j.attempts for j in again} == {2}


def test_a_dead_pid_is_proof_on_its_own_host_id(pq: PostgresQueue) -> None:
    job_id = pq.enqueue("t", {}, True)
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLAIM_AND_VANISH), pq.location, "host-a", "60"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(child.stdout)["ids"] == [job_id]
    recovered = pq.recover("host-a", kill=lambda row: None)  # same host id: pid checked
    assert [r.job.id for r in recovered] == [job_id]
    assert "died" in (pq.get_attempts(job_id)[0].error or "")


def test_status_shows_the_supervisors_of_every_host(pq: PostgresQueue) -> None:
    owners = [pq.register_process("supervise", host, 30.0) for host in ("h1", "h2", "h3")]
    raw_sql(
        pq, "UPDATE processes SET last_heartbeat = last_heartbeat - 60 WHERE id = ?", (owners[2],)
    )
    report = status.build_status(pq)
    shown = [(s["host"], s["alive"]) for s in report["supervisors"]]
    assert shown == [("h1", True), ("h2", True), ("h3", False)]
    assert report["worker_running"] is True
