"""The spool: a single enqueue never fails or waits on a busy SQLite database.

While another process holds the write lock (``BEGIN IMMEDIATE``), ``graphiti_mpq enqueue``
and ``--async`` record the job in ``<db>.spool/`` and exit 0 at once with its id. The next
reading command, drain or supervisor ingests the spool exactly once, in spool order, applying
dedupe; a damaged file is set aside; ``enqueue_many`` never spools; a spool that cannot be
written is one clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq.errors import DatabaseBusyError
from graphiti_mpq.storage import JobQueue, insert, spool

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("graphiti_mpq"))
EXAMPLE_CLI = str(ROOT / "examples" / "graphiti_cli.py")

_HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE jobs SET priority = priority")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
print("released", flush=True)
"""


class Holder:
    """A separate process holding the write lock of the queue until ``release()``."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD, location],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "locked\n"

    def assert_holding(self) -> None:
        assert self.proc.poll() is None, "the lock holder is gone"
        conn = sqlite3.connect(self.location, timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.close()

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "released\n"
        assert self.proc.wait(timeout=30) == 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def queue(queue_path: str) -> Iterator[JobQueue]:
    q = JobQueue(queue_path, busy_timeout=5.0).open()
    yield q
    q.close()


@pytest.fixture
def hold(queue: JobQueue) -> Iterator[Holder]:
    holder = Holder(queue.location)
    yield holder
    holder.close()


def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def mpq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(CONSOLE_SCRIPT, *args, env=env)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    proc = mpq(*args, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def spool_files(location: str, suffix: str = ".job") -> list[str]:
    folder = spool.spool_dir(location)
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(suffix))


def spooled_ids(location: str) -> list[str]:
    return [name[: -len(".job")].rsplit("-", 1)[-1] for name in spool_files(location)]


def stored(location: str, where: str = "1") -> list[dict[str, Any]]:
    conn = sqlite3.connect(location)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq")]
    finally:
        conn.close()


def spool_rows(location: str, *jobs: dict[str, Any]) -> list[str]:
    """Spool jobs the way a busy enqueue does (prepared rows written to the spool)."""
    rows = [
        insert.prepare_row(job.pop("job_type", "t"), job.pop("payload", {}), **job) for job in jobs
    ]
    return spool.write(location, rows)


# -- a busy database: enqueue and --async spool, and the jobs exist and run after -------------


def test_enqueue_and_async_spool_under_a_write_lock_then_are_ingested_in_order_and_run(
    queue: JobQueue, hold: Holder, tmp_path: Path
) -> None:
    location = queue.location
    first = mpq("enqueue", "--kw", "scope=project", "add", "first job")
    assert first.returncode == 0 and first.stderr == "", first
    id1 = first.stdout.strip()

    # --async on a terminal-like context (GRAPHITI_HOOK=0): one line naming the id
    second = run(
        sys.executable, EXAMPLE_CLI, "add", "--async", "two words", "--tag", "x",
        env={"GRAPHITI_HOOK": "0"}, cwd=tmp_path,
    )  # fmt: skip
    assert second.returncode == 0 and second.stderr == "", second
    assert second.stdout.startswith("queued add as job "), second.stdout
    id2 = second.stdout.split("job ", 1)[1].split()[0]

    # --async in a hook context: nothing at all on stdout or stderr
    third = run(
        sys.executable, EXAMPLE_CLI, "memory", "add", "--async", "name", "ü text", cwd=tmp_path
    )
    assert (third.returncode, third.stdout, third.stderr) == (0, "", ""), third

    hold.assert_holding()  # every call above returned while the lock was still held
    ids = spooled_ids(location)
    assert len(ids) == 3 and ids[:2] == [id1, id2], ids
    id3 = ids[2]
    assert stored(location) == []
    # a reading command does not fail (nor wait) while the spool cannot be ingested
    assert json.loads(ok("status", "--json"))["pending"] == 0
    hold.assert_holding()

    hold.release()
    shown = json.loads(ok("show", id2, "--json"))  # a reading command ingests the spool
    assert shown["state"] == "pending"
    assert shown["payload"] == {
        "command": "add",
        "args": ["two words"],
        "kwargs": {"tag": ["x"]},
        "cwd": str(tmp_path),
    }
    assert spool_files(location) == []
    listed = json.loads(ok("jobs", "--json"))
    assert sorted(job["id"] for job in listed) == sorted([id1, id2, id3])
    assert [row["id"] for row in stored(location)] == [id1, id2, id3]  # seq = spool order
    assert stored(location, f"id = '{id3}'")[0]["job_type"] == "memory add"

    summary = json.loads(ok("drain", "--json", env={"GRAPHITI_BIN": "/bin/true"}))
    assert (summary["succeeded"], summary["failed"], summary["dead"]) == (3, 0, 0)
    assert [row["state"] for row in stored(location)] == ["succeeded"] * 3
    assert json.loads(ok("show", id1, "--json"))["attempts"] == 1  # ran exactly once


def test_the_supervisor_ingests_the_spool_when_poked(queue: JobQueue, hold: Holder) -> None:
    """The API enqueue spools too; ingest_spool is a no-op while the lock is held."""
    job_id = queue.enqueue("t", {"n": 1})
    assert spooled_ids(queue.location) == [job_id]
    assert queue.ingest_spool() == 0  # still locked: best effort, no wait, no error
    hold.release()
    assert queue.ingest_spool() == 1
    assert [row["id"] for row in stored(queue.location)] == [job_id]


# -- exactly once, dedupe at ingest, damaged files ---------------------------------------------


def test_ingest_is_exactly_once_even_if_a_file_survives_the_commit(
    queue: JobQueue, tmp_path: Path
) -> None:
    ids = spool_rows(queue.location, {"payload": {"n": 1}}, {"payload": {"n": 2}})
    folder = Path(spool.spool_dir(queue.location))
    (name, *_) = spool_files(queue.location)
    kept = tmp_path / "copy"
    shutil.copy(folder / name, kept)

    assert queue.ingest_spool() == 2
    assert spool_files(queue.location) == []
    # a crash between the commit and the removal leaves the file: ingesting it again adds nothing
    shutil.copy(kept, folder / name)
    assert queue.ingest_spool() == 0
    assert spool_files(queue.location) == []  # and the stray file is cleaned up
    assert [row["id"] for row in stored(queue.location)] == ids

    # even once the job has run and finished, the stale file does not bring it back
    (job,) = queue.get_batch(1)
    queue.ack(job)
    shutil.copy(kept, folder / name)
    assert queue.ingest_spool() == 0
    assert len(stored(queue.location)) == 2


def test_dedupe_is_applied_at_ingest(queue: JobQueue) -> None:
    queue.enqueue("t", {"n": 0}, dedupe_key="done")
    (job,) = queue.get_batch(1)
    queue.ack(job)
    live = queue.enqueue("t", {"n": 0}, dedupe_key="k")
    queue.close()

    holder = Holder(queue.location)
    try:
        enqueued = [
            ok("enqueue", "--dedupe-key", key, "add", str(n)).strip()
            for n, key in enumerate(["k", "n", "n", "done"])
        ]
        holder.assert_holding()
    finally:
        holder.release()
        holder.close()
    dup_live, fresh, dup_fresh, after_done = enqueued
    assert live not in enqueued  # the id is given at spool time
    ok("status")  # ingests

    rows = {row["id"]: row for row in stored(queue.location)}
    assert rows[fresh]["state"] == "pending"
    assert rows[after_done]["state"] == "pending"  # a finished job is no duplicate
    for dup, of in ((dup_live, live), (dup_fresh, fresh)):
        assert rows[dup]["state"] == "cancelled"
        assert rows[dup]["duplicate_of"] == of
        assert of in rows[dup]["last_error"]
        assert rows[dup]["finished_at"] is not None
        shown = json.loads(ok("show", dup, "--json"))
        assert shown["state"] == "cancelled" and of in shown["last_error"]
    assert rows[live]["state"] == "pending"


def test_a_damaged_spool_file_is_set_aside_and_blocks_nothing(queue: JobQueue) -> None:
    location = queue.location
    good_before = spool_rows(location, {"payload": {"n": 1}})
    folder = Path(spool.spool_dir(location))
    stamp = spool_files(location)[0].split("-", 1)[0]
    row = json.loads((folder / spool_files(location)[0]).read_text())
    damaged = {
        f"{stamp}-1-aaaaaaaaaaaaaaaa.job": '["aaaaaaaaaaaaaaaa", "t", "{}"',  # cut short
        f"{stamp}-1-bbbbbbbbbbbbbbbb.job": '{"not": "a row"}',
        f"{stamp}-1-cccccccccccccccc.job": json.dumps(["cccccccccccccccc", *row[1:3]]),
        f"{stamp}-1-dddddddddddddddd.job": json.dumps(row),  # the name does not match its id
        f"{stamp}-1-eeeeeeeeeeeeeeee.job": json.dumps(["eeeeeeeeeeeeeeee", None, *row[2:]]),
        f"{stamp}-1-ffffffffffffffff.job": "\xff\xfe not utf-8",
    }
    for name, text in damaged.items():
        (folder / name).write_text(text, encoding="latin-1")
    (folder / f"{stamp}-1-0000000000000000.job").mkdir()  # not even a file
    good_after = spool_rows(location, {"payload": {"n": 2}})

    assert queue.ingest_spool() == 2
    assert [r["id"] for r in stored(location)] == good_before + good_after
    assert spool_files(location) == []
    assert len(spool_files(location, ".bad")) == len(damaged) + 1
    assert queue.ingest_spool() == 0
    assert json.loads(ok("jobs", "--json"))  # reading commands go on working


# -- what never spools, and a real fault ------------------------------------------------------


def test_enqueue_many_never_spools(queue: JobQueue, hold: Holder) -> None:
    impatient = JobQueue(queue.location, busy_timeout=0.2)
    try:
        with pytest.raises(DatabaseBusyError, match="database busy"):
            impatient.enqueue_many([{"job_type": "t", "payload": {"n": n}} for n in range(3)])
    finally:
        impatient.close()
    hold.assert_holding()
    assert spool_files(queue.location) == []
    hold.release()
    assert queue.ingest_spool() == 0
    assert stored(queue.location) == []


def test_api_enqueue_spools_at_its_own_wait_and_the_queue_keeps_its_busy_timeout(
    queue: JobQueue, hold: Holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``JobQueue.enqueue`` writes through a connection of its own that waits the enqueue wait
    (read again on every call); the queue's other writes still wait the full busy timeout."""
    patient = JobQueue(queue.location, busy_timeout=1.0)
    try:
        first = patient.enqueue("t", {"n": 1}, True)
        monkeypatch.setenv("GRAPHITI_QUEUE_ENQUEUE_WAIT", "0.3")
        began = time.monotonic()
        second = patient.enqueue("t", {"n": 2}, True)
        assert time.monotonic() - began >= 0.25  # the new wait was applied
        hold.assert_holding()
        assert spooled_ids(queue.location) == [first, second]
        began = time.monotonic()
        with pytest.raises(DatabaseBusyError, match="database busy"):
            patient.enqueue_many([{"job_type": "t", "payload": {"n": 3}}])
        assert time.monotonic() - began >= 0.9  # not cut short by the enqueue's wait
        hold.release()
        third = patient.enqueue("t", {"n": 4}, True)  # stored at once now
        assert [row["id"] for row in stored(queue.location)] == [third]
        assert patient.ingest_spool() == 2
        assert [row["id"] for row in stored(queue.location)] == [third, first, second]
    finally:
        patient.close()


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], prefix: str) -> None:
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "spool" in lines[0], proc.stderr


def test_a_spool_that_cannot_be_written_is_one_line_and_exit_1(
    queue: JobQueue, hold: Holder, tmp_path: Path
) -> None:
    Path(spool.spool_dir(queue.location)).write_text("not a folder")
    _assert_one_line_error(mpq("enqueue", "add", "x"), "graphiti_mpq: error: ")
    hook = run(sys.executable, EXAMPLE_CLI, "add", "--async", "x", cwd=tmp_path)
    _assert_one_line_error(hook, "Error: ")
    hold.assert_holding()
    hold.release()
    # nothing was written, and the other commands still work beside the broken spool
    assert json.loads(ok("jobs", "--json")) == []
    assert json.loads(ok("status", "--json"))["pending"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_spool_folder_without_write_permission_is_one_line_and_exit_1(
    queue: JobQueue, hold: Holder
) -> None:
    folder = Path(spool.spool_dir(queue.location))
    folder.mkdir(mode=0o500)
    try:
        proc = mpq("enqueue", "add", "x")
        _assert_one_line_error(proc, "graphiti_mpq: error: ")
        assert "Permission denied" in proc.stderr
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)
