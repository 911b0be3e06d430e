"""The operator CLI: every command, its JSON shapes, and bad input as one-line errors.

Most tests run the click group in-process (``CliRunner``; the global options go before the
command); a few run ``python -m graphiti_mpq`` for real to prove the exit codes and the
absence of tracebacks end to end. The queue is the per-test file of ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import structlog
from click.testing import CliRunner, Result

from graphiti_mpq import cli_common
from graphiti_mpq.cli import main
from graphiti_mpq.models import QueuedJob
from graphiti_mpq.storage import JobQueue, open_queue

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """The CLI configures structlog on a CliRunner stream; leave no stale stream behind."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def queue(queue_path: str) -> Iterator[JobQueue]:
    """The same queue the CLI uses, opened directly to set up situations and check results."""
    q = open_queue(queue_path, backoff_base=30.0)
    yield q
    q.close()


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def fails(code: int, *args: str, expect: str = "", env: dict[str, str] | None = None) -> str:
    """Run a command that must fail with ``code``: one line on stderr, no traceback."""
    result = run(*args, env=env)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert_one_line_error(result.stderr, expect)
    assert result.stdout == ""
    return result.stderr


def assert_one_line_error(stderr: str, expect: str = "") -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("graphiti_mpq: error: "), stderr
    assert "Traceback" not in stderr
    assert expect in lines[0], stderr


def job_ids() -> list[str]:
    return [job["id"] for job in json.loads(ok("jobs", "--json").stdout)]


def enqueue(*args: str) -> str:
    out = ok("enqueue", *args).stdout
    assert out.endswith("\n") and out.count("\n") == 1, out
    return out.strip()


def claim(queue: JobQueue) -> QueuedJob:
    (job,) = queue.get_batch(1)
    return job


def claim_and_check(queue: JobQueue, job_id: str) -> QueuedJob:
    job = claim(queue)
    assert job.id == job_id
    return job


def make_dead(queue: JobQueue, error: str = "boom") -> str:
    job_id = queue.enqueue("doomed", {"command": "fail"})
    job = claim(queue)
    assert job.id == job_id
    queue.move_to_dead_letter(job, error)
    return job_id


def make_succeeded(queue: JobQueue) -> str:
    job_id = queue.enqueue("fine", {"n": 1})
    job = claim(queue)
    assert job.id == job_id
    queue.ack(job, result={"ok": True})
    return job_id


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_command_form_stores_the_replay_payload(queue: JobQueue) -> None:
    job_id = enqueue(
        "--kw", "scope=project", "--kw", "tag=a", "--kw", "tag=b", "--flag", "force",
        "--flag", "verbose", "--flag", "verbose", "add", "some text", "more",
    )  # fmt: skip
    job = queue.get_job(job_id)
    assert job.job_type == "add"
    assert job.payload == {
        "command": "add",
        "args": ["some text", "more"],
        "kwargs": {"scope": "project", "tag": ["a", "b"], "force": True, "verbose": [True, True]},
    }
    assert (job.parallel, job.priority, job.max_retries, job.timeout) == (False, 0, None, None)


def test_enqueue_payload_form_stores_the_payload_as_given(queue: JobQueue) -> None:
    payload = {"collection": "notes", "ids": [1, 2], "deep": {"x": None}, "text": "é ü"}
    job_id = enqueue("--type", "reindex", "--payload", json.dumps(payload))
    job = queue.get_job(job_id)
    assert (job.job_type, job.payload) == ("reindex", payload)


def test_enqueue_payload_with_a_command_defaults_the_type_to_it(queue: JobQueue) -> None:
    job_id = enqueue("--payload", '{"command": ["memory", "add"], "args": ["x"]}')
    assert queue.get_job(job_id).job_type == "memory add"


def test_enqueue_options(queue: JobQueue, tmp_path: Path) -> None:
    before = time.time()
    job_id = enqueue(
        "--type", "custom", "--parallel", "--priority", "7", "--delay", "2m",
        "--max-retries", "1", "--timeout", "90", "--dedupe-key", "k1", "--cwd", str(tmp_path),
        "add", "x",
    )  # fmt: skip
    job = queue.get_job(job_id)
    assert (job.job_type, job.parallel, job.priority) == ("custom", True, 7)
    assert (job.max_retries, job.timeout, job.dedupe_key) == (1, 90.0, "k1")
    assert before + 120 <= job.run_at <= time.time() + 120
    assert job.payload["cwd"] == str(tmp_path)
    # the same dedupe key while the first is live: the existing id, nothing added
    assert enqueue("--dedupe-key", "k1", "add", "other") == job_id
    assert job_ids() == [job_id]


def test_enqueue_nested_command_by_spaces(queue: JobQueue) -> None:
    job = queue.get_job(enqueue("memory add", "text"))
    assert (job.job_type, job.payload["command"]) == ("memory add", ["memory", "add"])


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        (["add", "-hello"], ["-hello"]),
        (["add", "-v", "--scope", "project", "-"], ["-v", "--scope", "project", "-"]),
        (["add", "--", "-x", "--kw", "a=b"], ["-x", "--kw", "a=b"]),
        (["add", "--", "--", "x"], ["--", "x"]),
        (["--", "add", "-x"], ["-x"]),
    ],
)
def test_enqueue_records_args_that_start_with_a_dash(
    queue: JobQueue, argv: list[str], args: list[str]
) -> None:
    assert queue.get_job(enqueue(*argv)).payload["args"] == args


def test_enqueue_option_after_command_is_refused_not_recorded(queue: JobQueue) -> None:
    fails(2, "enqueue", "add", "text", "--kw", "scope=x", expect="comes after COMMAND")
    fails(2, "enqueue", "add", "--priority=3", expect="comes after COMMAND")
    fails(2, "enqueue", "add", "-h", expect="comes after COMMAND")
    assert job_ids() == []


# -- bad input: one line, exit 2, nothing written ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--type", "t", "--payload", '{"a": '], "--payload"),
        (["--type", "t", "--payload", "{'a': 1}"], "--payload"),
        (["--type", "t", "--payload", "nope"], "--payload"),
        # replay validation, one rule at a time
        (["bad;rm", "x"], "payload.command"),
        (["add\n"], "payload.command"),
        (["--", "-bad"], "payload.command"),
        (["memory  add"], "payload.command[1]"),
        (["--type", "t", "--payload", '{"command": ""}'], "payload.command"),
        (["--type", "t", "--payload", '{"command": 5}'], "payload.command"),
        (["--type", "t", "--payload", '{"command": []}'], "payload.command"),
        (["--type", "t", "--payload", json.dumps({"command": ["a"] * 9})], "payload.command"),
        (["--payload", '{"command": ["a", "b c"]}'], "payload.command[1]"),
        (["--payload", '{"command": "add", "args": "x"}'], "payload.args"),
        (["--payload", '{"command": "add", "args": [1]}'], "payload.args[0]"),
        (["--payload", '{"command": "add", "kwargs": []}'], "payload.kwargs"),
        (["--kw", "1bad=x", "add"], "payload.kwargs['1bad']"),
        (["--kw", "has space=x", "add"], "payload.kwargs['has space']"),
        (["--flag", "_x", "add"], "payload.kwargs['_x']"),
        (["--payload", '{"command": "add", "kwargs": {"a": {"b": 1}}}'], "payload.kwargs.a"),
        (["--payload", '{"command": "add", "kwargs": {"a": [[1]]}}'], "payload.kwargs.a[0]"),
        (["--payload", '{"command": "add", "cwd": "relative/dir"}'], "payload.cwd"),
        (["--type", "t", "--payload", "[1, 2]"], "payload"),
        (["--type", "t", "--payload", '{"x": NaN}'], "payload"),
        # other refusals
        (["--type", "", "add"], "job_type"),
        (["--type", "t", "--payload", "{}", "add"], "not both"),
        (["--payload", "{}"], "--type"),
        ([], "missing COMMAND"),
        (["--kw", "novalue", "add"], "KEY=VALUE"),
        (["--kw", "a=1", "--type", "t", "--payload", "{}"], "need a payload with a command"),
        (["--kw", "a=1", "--payload", '{"command": "x", "kwargs": {"a": 2}}'], "'a'"),
        (["--priority", "high", "add"], "--priority"),
        (["--priority", str(2**63), "add"], "priority"),
        (["--max-retries", "-1", "add"], "--max-retries"),
        (["--timeout", "0", "add"], "timeout"),
        (["--delay", "soon", "add"], "--delay"),
        (["--dedupe-key", "", "add"], "dedupe_key"),
    ],
)
def test_enqueue_bad_input_is_one_line_exit_2_and_writes_nothing(
    queue: JobQueue, argv: list[str], field: str
) -> None:
    existing = queue.enqueue("keep", {"n": 1})
    before = ok("jobs", "--json").stdout
    fails(2, "enqueue", *argv, expect=field)
    assert ok("jobs", "--json").stdout == before
    assert job_ids() == [existing]


def test_enqueue_payload_over_one_mib_is_refused(queue: JobQueue) -> None:
    big = json.dumps({"text": "x" * (1024 * 1024)})
    fails(2, "enqueue", "--type", "t", "--payload", big, expect="1 MiB")
    assert job_ids() == []


# -- status ----------------------------------------------------------------------------------


STATUS_KEYS = {
    "pending", "retrying", "running", "succeeded", "cancelled", "dead_letter", "capacity",
    "health", "worker_running", "supervisors", "dead_letter_jobs", "oldest_pending_age",
}  # fmt: skip


def test_status_json_has_every_key_and_the_counts(queue: JobQueue) -> None:
    make_dead(queue)
    make_succeeded(queue)
    queue.enqueue("waiting", {})
    report = json.loads(ok("status", "--json").stdout)
    assert STATUS_KEYS <= set(report)
    assert (report["pending"], report["succeeded"], report["dead_letter"]) == (1, 1, 1)
    assert (report["capacity"], report["health"], report["worker_running"]) == (100, "ok", False)
    assert report["supervisors"] == []
    assert [d["job_type"] for d in report["dead_letter_jobs"]] == ["doomed"]
    assert report["oldest_pending_age"] >= 0


def test_status_capacity_and_health_follow_the_settings(queue: JobQueue) -> None:
    for n in range(4):
        queue.enqueue("t", {"n": n})
    result = run("status", "--json", env={"GRAPHITI_QUEUE_CAPACITY": "5"})
    report = json.loads(result.stdout)
    assert (report["capacity"], report["health"]) == (5, "warning")


def test_status_for_a_person(queue: JobQueue, queue_path: str) -> None:
    make_dead(queue, "exit 1: it broke")
    queue.enqueue("waiting", {})
    owner = queue.register_process("supervise", socket.gethostname(), 60.0)
    with queue._write() as conn:  # started three minutes ago
        conn.execute("UPDATE processes SET started_at = ? WHERE id = ?", (time.time() - 190, owner))
    out = ok("status").stdout
    assert queue_path in out
    for text in ("pending", "running", "succeeded", "dead letter", "health", "ok"):
        assert text in out
    assert "HOST" in out and "JOBS DONE" in out and "ALIVE" in out
    (row,) = [line for line in out.splitlines() if f" {os.getpid()} " in line]
    assert "supervise" in row and "3m ago" in row and row.rstrip().endswith("yes")
    assert "exit 1: it broke" in out


def test_status_says_when_nothing_serves_the_queue() -> None:
    out = ok("status").stdout
    assert "serving: none" in out


# -- jobs and show ---------------------------------------------------------------------------


def test_jobs_newest_first_state_filter_and_limit(queue: JobQueue) -> None:
    done = make_succeeded(queue)
    dead = make_dead(queue)
    pending = [queue.enqueue("p", {"n": n}) for n in range(3)]
    assert job_ids() == [*reversed(pending), dead, done]
    listed = json.loads(ok("jobs", "--state", "pending", "--limit", "2", "--json").stdout)
    assert [job["id"] for job in listed] == [pending[2], pending[1]]
    assert {job["state"] for job in listed} == {"pending"}
    (dead_job,) = json.loads(ok("jobs", "--state", "dead", "--json").stdout)
    assert (dead_job["id"], dead_job["state"], dead_job["last_error"]) == (dead, "dead", "boom")
    job_keys = {
        "id", "job_type", "state", "payload", "parallel", "priority", "attempts", "max_retries",
        "timeout", "dedupe_key", "run_at", "created_at", "started_at", "finished_at",
        "last_error", "result",
    }  # fmt: skip
    assert set(dead_job) == job_keys
    assert dead_job["created_at"].endswith("+00:00")
    human = ok("jobs").stdout.splitlines()
    assert human[0].split() == ["ID", "STATE", "TYPE", "PRI", "TRIES", "CREATED", "NOTE"]
    assert [line.split()[0] for line in human[1:]] == [*reversed(pending), dead, done]
    assert ok("jobs", "--state", "cancelled").stdout == "no cancelled jobs\n"
    fails(2, "jobs", "--state", "lost", expect="--state")
    fails(2, "jobs", "--limit", "0", expect="--limit")


def test_jobs_lists_50_by_default(queue: JobQueue) -> None:
    ids = queue.enqueue_many([{"job_type": "bulk", "payload": {"n": n}} for n in range(55)])
    listed = job_ids()
    assert listed == list(reversed(ids))[:50]
    assert len(ok("jobs").stdout.splitlines()) == 51


def test_show_json_attempt_history_and_waiting_for_a_retry(queue: JobQueue) -> None:
    job_id = queue.enqueue("flaky", {"command": "x"})
    queue.nack(claim(queue), "first failure")
    data = json.loads(ok("show", job_id, "--json").stdout)
    assert (data["id"], data["state"], data["attempts"], data["last_error"]) == (
        job_id, "pending", 1, "first failure",
    )  # fmt: skip
    (attempt,) = data["attempt_history"]
    assert (attempt["attempt"], attempt["outcome"], attempt["error"]) == (
        1,
        "failed",
        "first failure",
    )
    assert set(attempt) == {
        "attempt", "started_at", "finished_at", "outcome", "exit_code", "signal", "error",
        "output_tail",
    }  # fmt: skip
    waiting = data["waiting_for"]
    assert (waiting["reason"], waiting["until"], waiting["ahead"]) == ("retry", data["run_at"], 0)
    out = ok("show", job_id).stdout
    assert "waiting for its retry at" in out and "(in " in out
    assert "first failure" in out and "failed" in out


def test_show_waiting_for_a_delay(queue: JobQueue) -> None:
    job_id = enqueue("--delay", "1h", "add", "later")
    data = json.loads(ok("show", job_id, "--json").stdout)
    assert data["waiting_for"]["reason"] == "delay"
    assert data["attempt_history"] == []
    assert "the end of its delay" in ok("show", job_id).stdout


def test_show_waiting_in_the_queue_and_behind_the_barrier(queue: JobQueue) -> None:
    first = queue.enqueue("par", {"n": 1}, parallel=True)
    second = queue.enqueue("par", {"n": 2}, parallel=True)
    third = queue.enqueue("par", {"n": 3}, parallel=True)
    data = json.loads(ok("show", third, "--json").stdout)
    assert data["waiting_for"] == {"reason": "queue", "until": None, "ahead": 2}
    out = ok("show", third).stdout
    assert "queued behind 2 jobs" in out and "nothing serves this queue" in out
    # the first runs; a sequential job waits for the barrier
    assert claim(queue).id == first
    sequential = queue.enqueue("seq", {"n": 4})
    data = json.loads(ok("show", sequential, "--json").stdout)
    assert data["waiting_for"]["reason"] == "barrier"
    assert "held back by the barrier (a sequential job runs alone)" in ok("show", sequential).stdout
    running = json.loads(ok("show", first, "--json").stdout)
    assert (running["state"], running["waiting_for"]) == ("running", None)
    assert running["attempt_history"][0]["outcome"] is None
    assert second in job_ids()


def test_show_of_a_finished_job_has_no_waiting_for(queue: JobQueue) -> None:
    job_id = make_succeeded(queue)
    data = json.loads(ok("show", job_id, "--json").stdout)
    assert (data["state"], data["waiting_for"], data["result"]) == ("succeeded", None, {"ok": True})
    out = ok("show", job_id).stdout
    assert "succeeded" in out and "waiting" not in out


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "nope"],
        ["show", "nope", "--json"],
        ["cancel", "nope"],
        ["dead-letter", "retry", "nope"],
    ],
)
def test_unknown_job_id_exits_3(argv: list[str]) -> None:
    fails(3, *argv, expect="unknown job id: nope")


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_a_pending_job(queue: JobQueue) -> None:
    job_id = queue.enqueue("t", {})
    assert ok("cancel", job_id).stdout == f"cancelled {job_id}\n"
    assert queue.get_job(job_id).state == "cancelled"
    fails(4, "cancel", job_id, expect="cancelled")


def test_cancel_a_running_or_finished_job_exits_4(queue: JobQueue) -> None:
    running = queue.enqueue("t", {})
    job = claim_and_check(queue, running)
    fails(4, "cancel", running, expect="only a pending job can be cancelled")
    assert queue.get_job(running).state == "running"
    queue.ack(job)
    fails(4, "cancel", running, expect="succeeded")
    assert queue.get_job(running).state == "succeeded"


# -- dead letters ----------------------------------------------------------------------------


def test_dead_letter_list(queue: JobQueue) -> None:
    assert ok("dead-letter", "list").stdout == "no dead-letter jobs\n"
    assert json.loads(ok("dead-letter", "list", "--json").stdout) == []
    job_id = make_dead(queue, "exit 2: no such file")
    (entry,) = json.loads(ok("dead-letter", "list", "--json").stdout)
    assert (entry["id"], entry["state"], entry["errors"]) == (
        job_id,
        "dead",
        ["exit 2: no such file"],
    )
    assert entry["failed_at"].endswith("+00:00")
    out = ok("dead-letter", "list").stdout
    assert job_id in out and "exit 2: no such file" in out and "doomed" in out


def test_dead_letter_retry_by_id_and_all(queue: JobQueue) -> None:
    one, two, three = make_dead(queue), make_dead(queue), make_dead(queue)
    assert ok("dead-letter", "retry", one).stdout == f"requeued {one}\n"
    job = queue.get_job(one)
    assert (job.state, job.attempts) == ("pending", 0)
    out = ok("dead-letter", "retry", "--all").stdout
    assert sorted(out.split()) == sorted(["requeued", two, "requeued", three])
    assert ok("dead-letter", "retry", "--all").stdout == "no dead-letter jobs to retry\n"
    # the history is kept across the retry
    history = json.loads(ok("show", one, "--json").stdout)["attempt_history"]
    assert [a["error"] for a in history] == ["boom"]


def test_dead_letter_retry_refusals(queue: JobQueue) -> None:
    dead = make_dead(queue)
    pending = queue.enqueue("t", {})
    fails(4, "dead-letter", "retry", dead, pending, expect="not dead")
    fails(3, "dead-letter", "retry", dead, "nope", expect="nope")
    assert queue.get_job(dead).state == "dead"  # all or nothing
    fails(2, "dead-letter", "retry", expect="--all")
    fails(2, "dead-letter", "retry", dead, "--all", expect="not both")


def test_dead_letter_purge(queue: JobQueue) -> None:
    dead = make_dead(queue)
    kept = queue.enqueue("t", {})
    fails(2, "dead-letter", "purge", expect="refusing to purge the dead-letter jobs without --yes")
    assert queue.get_job(dead).state == "dead"
    assert ok("dead-letter", "purge", "--yes").stdout == "deleted 1 dead-letter job\n"
    assert job_ids() == [kept]
    assert json.loads(ok("status", "--json").stdout)["dead_letter"] == 0


def test_destructive_commands_ask_on_a_terminal(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_common, "is_terminal", lambda: True)
    dead = make_dead(queue)
    declined = run("dead-letter", "purge", input="n\n")
    assert declined.exit_code == 1
    assert "Delete 1 dead-letter job for good?" in declined.stdout
    assert_one_line_error(declined.stderr, "not confirmed")
    assert queue.get_job(dead).state == "dead"
    accepted = run("dead-letter", "purge", input="y\n")
    assert accepted.exit_code == 0 and "deleted 1 dead-letter job" in accepted.stdout
    assert job_ids() == []
    # nothing to delete: no question
    assert ok("dead-letter", "purge").stdout == "deleted 0 dead-letter jobs\n"


# -- purge -----------------------------------------------------------------------------------


def age(queue: JobQueue, job_id: str, seconds: float) -> None:
    with queue._write() as conn:
        conn.execute(
            "UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - seconds, job_id)
        )


def test_purge_older_than(queue: JobQueue) -> None:
    old_done, recent_done = make_succeeded(queue), make_succeeded(queue)
    old_dead = make_dead(queue)
    old_cancelled = queue.enqueue("t", {})
    queue.cancel(old_cancelled)
    pending = queue.enqueue("t", {})
    for job_id in (old_done, old_dead, old_cancelled):
        age(queue, job_id, 3 * 86400)
    fails(2, "purge", "--older-than", "2d", expect="refusing to purge finished jobs without --yes")
    assert len(job_ids()) == 5
    out = ok("purge", "--older-than", "2d", "--yes").stdout
    assert out == "deleted 3 finished jobs older than 2d\n"
    assert sorted(job_ids()) == sorted([recent_done, pending])
    assert ok("dead-letter", "list", "--json").stdout.strip() == "[]"
    fails(2, "purge", "--yes", expect="--older-than")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604800), ("0.5", 0.5)],
)
def test_purge_durations(queue: JobQueue, text: str, seconds: float) -> None:
    job_id = make_succeeded(queue)
    age(queue, job_id, seconds + 5)
    fresh = make_succeeded(queue)
    age(queue, fresh, max(seconds - 5, 0))
    assert ok("purge", "--older-than", text, "--yes").stdout.startswith("deleted 1 finished job ")
    assert job_ids() == [fresh]


@pytest.mark.parametrize("text", ["abc", "5x", "-5", "", "1.5.2", "inf", "10 m"])
def test_bad_durations_are_usage_errors(queue: JobQueue, text: str) -> None:
    job_id = make_succeeded(queue)
    age(queue, job_id, 86400)
    fails(2, "purge", "--older-than", text, "--yes", expect="--older-than")
    fails(2, "enqueue", "--delay", text, "add", expect="--delay")
    assert job_ids() == [job_id]


# -- the queue location ----------------------------------------------------------------------


def test_db_option_beats_the_environment(tmp_path: Path, queue_path: str) -> None:
    other = str(tmp_path / "other" / "q.db")
    job_id = enqueue_with("--db", other)
    assert ok("--db", other, "jobs", "--json").stdout.count(job_id) == 1
    assert job_ids() == []  # the GRAPHITI_QUEUE_PATH queue is untouched
    assert oct(os.stat(os.path.dirname(other)).st_mode & 0o777) == "0o700"


def enqueue_with(*global_args: str) -> str:
    return ok(*global_args, "enqueue", "add", "x").stdout.strip()


def test_db_naming_a_directory(tmp_path: Path) -> None:
    for argv in (["status"], ["enqueue", "add", "x"], ["jobs"]):
        fails(1, "--db", str(tmp_path), *argv, expect="is a directory")


def test_db_naming_a_file_of_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    content = bytes(range(256)) * 64
    path.write_bytes(content)
    for argv in (
        ["status"],
        ["enqueue", "add", "x"],
        ["show", "x"],
        ["purge", "--older-than", "1d", "--yes"],
    ):
        fails(1, "--db", str(path), *argv, expect="not a graphiti_mpq queue database")
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.db"]


def test_db_naming_a_sqlite_database_of_something_else(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    content = path.read_bytes()
    fails(1, "--db", str(path), "enqueue", "add", "x", expect="not a queue")
    assert path.read_bytes() == content


def test_db_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    fails(1, "--db", str(tmp_path / "file" / "q.db"), "enqueue", "add", "x", expect="cannot create")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores file modes, so a chmod-ed location is not read-only for this run",
)
def test_db_in_a_read_only_location(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "q.db"
    existing = enqueue_with("--db", str(db))
    content = db.read_bytes()
    db.chmod(0o400)
    folder.chmod(0o500)
    try:
        fails(1, "--db", str(db), "enqueue", "add", "y")
        fails(
            1, "--db", str(folder / "sub" / "q.db"), "enqueue", "add", "y", expect="cannot create"
        )
        status = run("--db", str(db), "jobs", "--json")
        if status.exit_code == 0:  # SQLite may read a read-only WAL database
            assert existing in status.stdout
        else:
            assert_one_line_error(status.stderr)
        assert db.read_bytes() == content
    finally:
        folder.chmod(0o700)
        db.chmod(0o600)


def test_postgres_location_without_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the postgres extra is not installed
    stderr = fails(1, "--db", "postgresql://localhost/x", "status")
    assert "pip install 'graphiti-mpq[postgres]'" in stderr


def test_an_unreachable_postgres_server_is_one_line() -> None:
    stderr = fails(1, "--db", "postgresql://postgres:s3cret@127.0.0.1:1/x", "status")
    assert "cannot reach the queue database" in stderr and "s3cret" not in stderr


# -- a database locked by another process ----------------------------------------------------

_HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "exclusive":
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE jobs SET priority = priority")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def lock_holder(queue_path: str) -> Iterator[Any]:
    holders: list[subprocess.Popen[str]] = []

    def hold(mode: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, queue_path, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


BUSY = {"GRAPHITI_QUEUE_BUSY_TIMEOUT": "0.3"}


def test_writes_against_a_write_lock_report_database_busy(
    queue: JobQueue, lock_holder: Any
) -> None:
    job_id = queue.enqueue("t", {})
    queue.close()
    lock_holder("write")
    started = time.monotonic()
    for argv in (["cancel", job_id], ["dead-letter", "retry", "--all"]):
        fails(1, *argv, expect="database busy", env=BUSY)
    # enqueue never fails on a busy database: it spools (tests/test_spool.py)
    assert time.monotonic() - started < 5  # the 0.3 s busy timeout, not the default 5 s
    # readers are not blocked by a writer (WAL)
    assert json.loads(run("status", "--json", env=BUSY).stdout)["pending"] == 1


def test_reads_against_an_exclusive_lock_report_database_busy(
    queue: JobQueue, lock_holder: Any
) -> None:
    job_id = queue.enqueue("t", {})
    queue.close()
    lock_holder("exclusive")
    for argv in (["status"], ["show", job_id], ["cancel", job_id]):
        fails(1, *argv, expect="database busy", env=BUSY)


def test_bad_busy_timeout_setting_is_a_usage_error() -> None:
    fails(
        2, "status", expect="GRAPHITI_QUEUE_BUSY_TIMEOUT", env={"GRAPHITI_QUEUE_BUSY_TIMEOUT": "x"}
    )


# -- error handling and global options -------------------------------------------------------


def test_unexpected_errors_are_one_line_with_the_traceback_only_under_verbose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: JobQueue) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(JobQueue, "get_stats", broken)
    stderr = fails(1, "status", expect="unexpected RuntimeError: disk on fire second line")
    assert "-v" in stderr
    verbose = run("-v", "status")
    assert verbose.exit_code == 1
    assert "Traceback" in verbose.stderr and "disk on fire" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith(
        "graphiti_mpq: error: unexpected RuntimeError"
    )


def test_usage_errors_are_one_line() -> None:
    fails(2, "no-such-command", expect="No such command")
    fails(2, "status", "--bogus", expect="--bogus")
    fails(2, "--log-format", "xml", "status", expect="--log-format")
    fails(2, "-v", "-q", "status", expect="cannot be combined")
    fails(2, "show", expect="ID")


def test_bad_environment_setting_is_one_line() -> None:
    fails(2, "status", expect="GRAPHITI_QUEUE_CAPACITY", env={"GRAPHITI_QUEUE_CAPACITY": "lots"})


def test_logs_go_to_stderr_and_follow_the_level(queue: JobQueue) -> None:
    quiet = run("--log-format", "json", "enqueue", "add", "x")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    verbose = run("-v", "--log-format", "json", "enqueue", "add", "y")
    (line,) = verbose.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["job_id"]) == ("job_enqueued", verbose.stdout.strip())


def test_help_and_version() -> None:
    assert "enqueue" in ok("--help").stdout
    assert ok("--version").stdout.strip().endswith("0.1.0")


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path", list(_commands(main)), ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    out = ok(*path, "--help").stdout
    assert "Example:" in out, out


# -- end to end: python -m graphiti_mpq ------------------------------------------------------


def cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "graphiti_mpq", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_python_dash_m_end_to_end(queue: JobQueue, tmp_path: Path) -> None:
    created = cli_process("enqueue", "add", "-hello")
    assert (created.returncode, created.stderr) == (0, "")
    job_id = created.stdout.strip()
    assert queue.get_job(job_id).payload["args"] == ["-hello"]
    claim(queue)
    cases = [
        (["cancel", job_id], 4, "only a pending job"),
        (["show", "nope"], 3, "unknown job id: nope"),
        (["enqueue", "--type", "t", "--payload", "{oops"], 2, "--payload"),
        (["--db", str(tmp_path), "status"], 1, "is a directory"),
        (["purge", "--older-than", "5x"], 2, "--older-than"),
        (["dead-letter", "purge"], 2, "without --yes (not a terminal)"),
    ]
    for argv, code, expect in cases:
        done = cli_process(*argv)
        assert done.returncode == code, (argv, done.stdout, done.stderr)
        assert_one_line_error(done.stderr, expect)
        assert done.stdout == ""
    shown = json.loads(cli_process("show", job_id, "--json").stdout)
    assert shown["state"] == "running"


def test_python_dash_m_database_busy(queue: JobQueue, lock_holder: Any) -> None:
    job_id = queue.enqueue("t", {})
    queue.close()
    lock_holder("write")
    done = cli_process("cancel", job_id, env=BUSY)
    assert done.returncode == 1
    assert_one_line_error(done.stderr, "database busy")
