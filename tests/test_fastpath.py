"""``graphiti_mpq enqueue`` through the fast path and through click: the same in every case.

Each case runs twice, each time as a real process on its own fresh queue:

- path A: the console script ``graphiti_mpq`` (``entry.main``), which hands ``enqueue`` to
  ``fastpath`` first;
- path B: the click command itself (``graphiti_mpq.cli.main``), as the fallback runs it.

Both must print the same stdout (ids aside: they are random), the same stderr, exit with the
same status and store the same row. A ``sitecustomize`` probe (on ``PYTHONPATH``) records which
modules each process imported, which proves that path A handled the success cases itself
(none of click, structlog, sqlite-utils, filelock or multiprocessing loaded) and handed every
error to click.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq.storage import JobQueue

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("graphiti_mpq"))
HEAVY = ("click", "structlog", "sqlite_utils", "filelock", "multiprocessing")

_CLICK = (
    "import sys\n"
    "from graphiti_mpq.cli import main\n"
    "main.main(args=sys.argv[1:], prog_name='graphiti_mpq')\n"
)

_PROBE = """\
import atexit, json, os, sys

def _report():
    with open(os.environ["MPQ_TEST_PROBE"], "w") as out:
        json.dump(sorted(sys.modules), out)

atexit.register(_report)
"""

_COLUMNS = (
    "job_type, payload, parallel, priority, max_retries, timeout, dedupe_key,"
    " run_at - created_at, state"
)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    modules: list[str]
    rows: list[dict[str, Any]]

    def heavy(self) -> list[str]:
        return [name for name in self.modules if name.split(".")[0] in HEAVY]


def rows_of(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        cursor = conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq")
        rows = []
        for values in cursor.fetchall():
            row = dict(zip([d[0] for d in cursor.description], values, strict=True))
            row["payload"] = json.loads(row["payload"])
            row["delay"] = round(row.pop("run_at - created_at"), 3)
            rows.append(row)
        return rows
    finally:
        conn.close()


class Paths:
    """Runs one case through both paths, each on its own fresh (migrated) queue."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cwd = tmp_path / "work"
        self.cwd.mkdir()
        probe = tmp_path / "probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(_PROBE)
        self.probe_dir = probe
        self.decoy = tmp_path / "decoy" / "queue.db"  # GRAPHITI_QUEUE_PATH when --db is given

    def db(self, side: str) -> Path:
        path = self.tmp_path / side / "queue.db"
        if not path.exists():
            path.parent.mkdir()
            JobQueue(str(path)).open().close()  # migrated up front: no migration import noise
        return path

    def start(self, side: str, argv: list[str]) -> tuple[subprocess.Popen[str], Path, Path]:
        db = self.db(side)
        uses_db_option = any("{db}" in arg for arg in argv)
        argv = [arg.replace("{db}", str(db)) for arg in argv]
        env = dict(os.environ)
        env["GRAPHITI_QUEUE_PATH"] = str(self.decoy if uses_db_option else db)
        env["PYTHONPATH"] = os.pathsep.join([str(self.probe_dir), str(ROOT)])
        probe_file = self.tmp_path / f"modules-{side}.json"
        env["MPQ_TEST_PROBE"] = str(probe_file)
        if side == "a":
            command = [CONSOLE_SCRIPT, *argv]
        else:
            command = [sys.executable, "-c", _CLICK, *argv]
        proc = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return proc, db, probe_file

    @staticmethod
    def finish(started: tuple[subprocess.Popen[str], Path, Path]) -> Run:
        proc, db, probe_file = started
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        modules = json.loads(probe_file.read_text())
        probe_file.unlink()
        return Run(proc.returncode, stdout, stderr, modules, rows_of(db))

    def run(self, side: str, argv: list[str]) -> Run:
        return self.finish(self.start(side, argv))

    def both(self, argv: list[str]) -> tuple[Run, Run]:
        """Both paths at once (separate queues): half the wall time on two cores."""
        a, b = self.start("a", argv), self.start("b", argv)
        return self.finish(a), self.finish(b)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def sh(text: str) -> list[str]:
    """Arguments written as a shell would split them (quotes keep spaces and empty strings)."""
    return shlex.split(text)


JOB_ID = re.compile(r"[0-9a-f]{28}\n")

# (case id, arguments, handled by the fast path)
SUCCESS: list[tuple[str, list[str], bool]] = [
    ("plain", ["enqueue", "add", "hello"], True),
    ("no-args", ["enqueue", "add"], True),
    (
        "spaces-unicode-empty",
        ["enqueue", "add", "two words", "ünïcødé ✓ 日本語", "", " ", "a=b", "tab\there"],
        True,
    ),
    ("leading-dashes", ["enqueue", "add", "-x", "--not-an-option", "-", "-5"], True),
    ("double-dash", ["enqueue", "add", "--", "-x", "--priority", "--", "-h", "--kw=a"], True),
    ("double-dash-only", ["enqueue", "add", "--"], True),
    ("double-dash-later", ["enqueue", "add", "text", "--", "more"], True),
    ("nested", ["enqueue", "memory add", "style", "tabs, not spaces"], True),
    ("command-chars", ["enqueue", "ns:cmd.v2_x-y", "a"], True),
    (
        "kw-repeated",
        sh(
            "enqueue --kw scope=project --kw tag=a --kw tag=b --kw tag=c --kw empty="
            " --kw eq=x=y --kw max_items=5 add t"
        ),
        True,
    ),
    (
        "flags",
        ["enqueue", "--flag", "force", "--flag", "verbose", "--flag", "verbose", "add", "t"],
        True,
    ),
    ("kw-and-flag-same-key", ["enqueue", "--kw", "tag=a", "--flag", "tag", "add"], True),
    ("cwd-relative", ["enqueue", "--cwd", "sub/dir", "add", "t"], True),
    ("cwd-dot", ["enqueue", "--cwd=.", "add", "t"], True),
    ("cwd-absolute", ["enqueue", "--cwd", "/tmp", "add", "t"], True),
    ("parallel", ["enqueue", "--parallel", "add", "t"], True),
    ("priority", ["enqueue", "--priority", "7", "add"], True),
    ("priority-negative", ["enqueue", "--priority", "-3", "add"], True),
    ("priority-plus", ["enqueue", "--priority", "+5", "add"], True),
    ("priority-equals-negative", ["enqueue", "--priority=-2", "add"], True),
    ("priority-repeated-last-wins", ["enqueue", "--priority", "1", "--priority", "2", "add"], True),
    ("delay-seconds", ["enqueue", "--delay", "30s", "add"], True),
    ("delay-minutes", ["enqueue", "--delay", "15m", "add"], True),
    ("delay-bare", ["enqueue", "--delay", "90", "add"], True),
    ("delay-fraction", ["enqueue", "--delay=0.5", "add"], True),
    ("timeout", ["enqueue", "--timeout", "2m", "add"], True),
    ("timeout-equals", ["enqueue", "--timeout=45", "add"], True),
    ("max-retries-0", ["enqueue", "--max-retries", "0", "add"], True),
    ("max-retries-3", ["enqueue", "--max-retries=3", "add"], True),
    ("dedupe-key", ["enqueue", "--dedupe-key", "k1", "add", "x"], True),
    (
        "type-payload",
        sh(
            """enqueue --type reindex --payload"""
            """ '{"collection": "notes", "n": [1, 2.5, null, true], "u": "ü", "o": {}}'"""
        ),
        True,
    ),
    (
        "equals-spellings",
        sh(
            """enqueue --type=t --payload='{"a": 1}' --priority=4 --delay=1m --max-retries=2"""
            " --timeout=10s --dedupe-key=d"
        ),
        True,
    ),
    (
        "payload-with-options",
        ["enqueue", "--parallel", "--priority", "3", "--type", "t", "--payload", "{}"],
        True,
    ),
    ("type-with-command", ["enqueue", "--type", "custom", "add", "x"], True),
    (
        "everything",
        sh(
            "enqueue --type mine --parallel --priority -1 --delay 2h --dedupe-key all"
            " --max-retries 5 --timeout 1.5m --kw a=1 --flag f --cwd x 'memory add' name -v '' ü"
        ),
        True,
    ),
    ("global-db", ["--db", "{db}", "enqueue", "add", "x"], True),
    ("global-db-equals", ["--db={db}", "enqueue", "add", "x"], True),
    ("global-quiet", ["-q", "enqueue", "add", "x"], True),
    ("global-log-format", ["--log-format", "json", "enqueue", "add", "x"], True),
    (
        "global-all",
        ["-q", "--log-format=console", "--db", "{db}", "enqueue", "--priority", "1", "add", "x"],
        True,
    ),
    # Spellings the fast path leaves to click: still the same result either way.
    ("fallback-payload-command", ["enqueue", "--payload", '{"command": "add"}'], False),
    (
        "fallback-payload-kw",
        ["enqueue", "--type", "t", "--payload", '{"command": ["memory", "add"]}', "--kw", "a=b"],
        False,
    ),
    ("fallback-double-dash-first", ["enqueue", "--", "add", "x"], False),
    ("fallback-verbose-name", ["--quiet", "enqueue", "add", "x"], False),
]

ERRORS: list[tuple[str, list[str]]] = [
    ("malformed-payload", ["enqueue", "--type", "t", "--payload", "{bad"]),
    ("payload-not-object", ["enqueue", "--type", "t", "--payload", "[1, 2]"]),
    ("payload-without-type", ["enqueue", "--payload", '{"a": 1}']),
    ("invalid-command", ["enqueue", "bad!", "x"]),
    ("invalid-nested-command", ["enqueue", "memory add!", "x"]),
    ("empty-command", ["enqueue", "", "x"]),
    ("bad-duration", ["enqueue", "--delay", "5x", "add"]),
    ("negative-duration", ["enqueue", "--delay", "-5", "add"]),
    ("bad-timeout", ["enqueue", "--timeout", "soon", "add"]),
    ("zero-timeout", ["enqueue", "--timeout", "0", "add"]),
    ("negative-max-retries", ["enqueue", "--max-retries", "-1", "add"]),
    ("bad-priority", ["enqueue", "--priority", "high", "add"]),
    ("option-after-command", ["enqueue", "add", "text", "--priority", "5"]),
    ("option-equals-after-command", ["enqueue", "add", "--kw=a=b"]),
    ("help-after-command", ["enqueue", "add", "-h"]),
    ("missing-command", ["enqueue"]),
    ("missing-command-with-options", ["enqueue", "--priority", "3"]),
    ("payload-and-command", ["enqueue", "--type", "t", "--payload", "{}", "add"]),
    ("bad-kwargs-key", ["enqueue", "--kw", "1bad=x", "add"]),
    ("bad-flag-key", ["enqueue", "--flag", "has space", "add"]),
    ("kw-without-equals", ["enqueue", "--kw", "novalue", "add"]),
    ("missing-option-value", ["enqueue", "--priority"]),
    ("unknown-option", ["enqueue", "--nope", "add"]),
    ("bad-log-format", ["--log-format", "xml", "enqueue", "add"]),
    ("empty-type", ["enqueue", "--type=", "add"]),
    ("empty-dedupe-key", ["enqueue", "--dedupe-key=", "add"]),
    ("priority-out-of-range", ["enqueue", "--priority", "99999999999999999999", "add"]),
]


def assert_same(a: Run, b: Run) -> None:
    assert (a.code, a.stderr) == (b.code, b.stderr), (a, b)
    assert a.rows == b.rows, (a.rows, b.rows)
    ids_a = JOB_ID.findall(a.stdout)
    ids_b = JOB_ID.findall(b.stdout)
    assert len(ids_a) == len(ids_b), (a.stdout, b.stdout)
    assert a.stdout.replace("".join(ids_a), "") == b.stdout.replace("".join(ids_b), "")


@pytest.mark.parametrize(
    ("argv", "fast"), [pytest.param(argv, fast, id=name) for name, argv, fast in SUCCESS]
)
def test_enqueue_cases_agree(paths: Paths, argv: list[str], fast: bool) -> None:
    a, b = paths.both(argv)
    assert_same(a, b)
    assert a.code == 0 and a.stderr == "", a
    assert JOB_ID.fullmatch(a.stdout), a.stdout
    assert len(a.rows) == 1 and a.rows[0]["state"] == "pending"
    if fast:
        assert a.heavy() == [], f"the fast path imported {a.heavy()}"
        assert "graphiti_mpq.cli" not in a.modules
    else:
        assert "graphiti_mpq.cli" in a.modules  # it fell back to click
    assert "graphiti_mpq.cli" in b.modules
    if "--db" in " ".join(argv):
        assert not paths.decoy.parent.exists()  # --db beat GRAPHITI_QUEUE_PATH


def test_the_stored_rows_are_what_the_options_say(paths: Paths) -> None:
    """The comparison above is only worth something if the rows are right: spot checks."""
    argv = next(argv for name, argv, _ in SUCCESS if name == "everything")
    (row,) = paths.run("a", argv).rows
    assert row == {
        "job_type": "mine",
        "payload": {
            "command": ["memory", "add"],
            "args": ["name", "-v", "", "ü"],
            "kwargs": {"a": "1", "f": True},
            "cwd": str(paths.cwd / "x"),
        },
        "parallel": 1,
        "priority": -1,
        "max_retries": 5,
        "timeout": 90.0,
        "dedupe_key": "all",
        "delay": 7200.0,
        "state": "pending",
    }
    (row,) = paths.run("b", ["enqueue", "--kw", "tag=a", "--kw", "tag=b", "add", "--", "-x"]).rows
    assert row["payload"] == {"command": "add", "args": ["-x"], "kwargs": {"tag": ["a", "b"]}}
    assert (row["job_type"], row["max_retries"], row["timeout"], row["delay"]) == (
        "add",
        None,
        None,
        0,
    )


def test_a_second_enqueue_with_the_same_dedupe_key_prints_the_first_id(paths: Paths) -> None:
    argv = ["enqueue", "--dedupe-key", "same", "add", "x"]
    for side in ("a", "b"):
        first = paths.run(side, argv)
        second = paths.run(side, [*argv[:-1], "other"])
        assert first.code == second.code == 0, (first, second)
        assert JOB_ID.fullmatch(first.stdout)
        assert second.stdout == first.stdout
        assert second.stderr == ""
        assert len(second.rows) == 1 and second.rows[0]["payload"]["args"] == ["x"]
        if side == "a":
            assert second.heavy() == []


@pytest.mark.parametrize("argv", [pytest.param(argv, id=name) for name, argv in ERRORS])
def test_enqueue_errors_agree(paths: Paths, argv: list[str]) -> None:
    a, b = paths.both(argv)
    assert_same(a, b)
    assert a.code == 2, a
    assert a.stdout == ""
    lines = a.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphiti_mpq: error: "), a.stderr
    assert "Traceback" not in a.stderr
    assert a.rows == []  # nothing written
    assert "graphiti_mpq.cli" in a.modules  # the fast path handed it to click


def test_try_enqueue_declines_what_it_does_not_handle(paths: Paths) -> None:
    """In-process: None (fall back) for errors and unusual spellings, before writing anything."""
    from graphiti_mpq.fastpath import try_enqueue

    db = str(paths.db("a"))
    declined = [argv for _, argv in ERRORS] + [argv for _, argv, fast in SUCCESS if not fast]
    declined += [
        ["-v", "enqueue", "add"],
        ["--help", "enqueue"],
        ["enqueue", "--help"],
        ["status"],
        ["--db", "enqueue", "status"],
    ]
    for argv in declined:
        assert try_enqueue(["--db", db, *argv]) is None, argv
    assert rows_of(Path(db)) == []
