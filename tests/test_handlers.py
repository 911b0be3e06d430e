"""The handler registry, build_argv and the replay handler, run against a real fake program."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from graphiti_mpq import handlers, procinfo, spawn
from graphiti_mpq.errors import HandlerError
from graphiti_mpq.handlers import build_argv, run_job, run_python, run_replay
from graphiti_mpq.models import Outcome

pytestmark = pytest.mark.timeout(30)

# The fake `graphiti`: records how it was started to $FAKE_RECORD, then acts on its command.
FAKE_PROGRAM = """\
#!{python}
import json, os, subprocess, sys, time

def spawn_grandchild(new_session=False):
    # inherits our stdout: it holds the output pipe open as long as it lives
    child = subprocess.Popen(["sleep", "60"], start_new_session=new_session)
    with open(os.environ["FAKE_PIDFILE"] + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.rename(os.environ["FAKE_PIDFILE"] + ".tmp", os.environ["FAKE_PIDFILE"])

record = {{
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "job_id": os.environ.get("GRAPHITI_MPQ_JOB_ID"),
    "attempt": os.environ.get("GRAPHITI_MPQ_ATTEMPT"),
    "marker": os.environ.get("FAKE_MARKER"),
    "stdin_is_devnull": os.path.samestat(os.fstat(0), os.stat("/dev/null")),
    "stdin": sys.stdin.read(),
    "pid": os.getpid(),
    "pgid": os.getpgrp(),
}}
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump(record, f)
command = sys.argv[1] if len(sys.argv) > 1 else ""
if command == "fail":
    print("some output")
    print("the last words", file=sys.stderr)
    sys.exit(3)
elif command == "hang":
    spawn_grandchild()
    time.sleep(60)
elif command == "orphan":
    spawn_grandchild()
    print("left a grandchild behind")
elif command == "escape":
    spawn_grandchild(new_session=True)
elif command == "spew":
    line = "x" * 99 + "\\n"
    sys.stdout.write(line * 20000)
    sys.stdout.write("THE END\\n")
elif command == "unicode":
    sys.stdout.write("h\\u00e9llo \\u2603\\n")
    sys.stdout.buffer.write(b"bad \\xff byte\\n")
elif command == "term":
    sys.stdout.flush()
    os.kill(os.getpid(), 15)
    time.sleep(5)
else:
    print("ok")
"""


def _wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.program = tmp_path / "bin" / "fake-graphiti"
        self.program.parent.mkdir()
        self.program.write_text(FAKE_PROGRAM.format(python=sys.executable))
        self.program.chmod(0o755)
        self.record_path = tmp_path / "record.json"
        self.pidfile = tmp_path / "grandchild.pid"

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.record_path.read_text())
        return data

    def grandchild(self) -> int:
        assert _wait_until(self.pidfile.exists), "the grandchild never started"
        return int(self.pidfile.read_text())

    def run(self, payload: dict[str, Any], **options: Any) -> Any:
        options.setdefault("program", str(self.program))
        options.setdefault("job_id", "job-1")
        options.setdefault("attempt", 1)
        options.setdefault("timeout", 10.0)
        return run_replay(payload, **options)


@pytest.fixture(params=["compiled", "wrappers"])
def fake(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fake]:
    """A fake program to replay, started by the compiled spawn and by the exec wrappers."""
    if request.param == "compiled" and spawn._spawn is None:
        pytest.skip("graphiti_mpq._spawn is not built here (no C compiler at install)")
    monkeypatch.setattr(spawn, "use_compiled", request.param == "compiled")
    f = Fake(tmp_path)
    monkeypatch.setenv("FAKE_RECORD", str(f.record_path))
    monkeypatch.setenv("FAKE_PIDFILE", str(f.pidfile))
    yield f
    if f.pidfile.exists():  # never leave a sleeping grandchild behind, whatever failed
        pid = int(f.pidfile.read_text())
        if procinfo.is_alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- build_argv -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            {
                "command": "add",
                "args": ["content"],
                "kwargs": {
                    "scope": "project",
                    "force": True,
                    "dry_run": False,
                    "max_items": 5,
                    "tag": ["a", "b"],
                    "verbose": [True, True],
                },
            },
            [
                *("add", "--scope", "project", "--force", "--max-items", "5"),
                *("--tag", "a", "--tag", "b", "--verbose", "--verbose", "--", "content"),
            ],
            id="contract-example",
        ),
        pytest.param(
            {"command": ["memory", "add"], "args": ["x"]},
            ["memory", "add", "--", "x"],
            id="nested-command",
        ),
        pytest.param({"command": "status"}, ["status"], id="no-args-key"),
        pytest.param(
            {"command": "status", "args": [], "kwargs": {"json": True}},
            ["status", "--json"],
            id="empty-args-no-separator",
        ),
        pytest.param(
            {"command": "add", "args": ["--force", "-x", "-"]},
            ["add", "--", "--force", "-x", "-"],
            id="args-starting-with-dash",
        ),
        pytest.param(
            {"command": "add", "args": ["héllo ☃", "日本語"], "kwargs": {"title": "ünï"}},
            ["add", "--title", "ünï", "--", "héllo ☃", "日本語"],
            id="unicode",
        ),
        pytest.param(
            {"command": "add", "args": ["", "a b"], "kwargs": {"name": ""}},
            ["add", "--name", "", "--", "", "a b"],
            id="empty-strings",
        ),
        pytest.param(
            {"command": "x", "kwargs": {"x": None, "n": 0, "ratio": 0.5, "big": 1e16}},
            ["x", "--n", "0", "--ratio", "0.5", "--big", "1e+16"],
            id="numbers-none-and-zero",
        ),
        pytest.param(
            {"command": "x", "kwargs": {"v": [0, False, None, 1.5, True, "s"]}},
            ["x", "--v", "0", "--v", "1.5", "--v", "--v", "s"],
            id="mixed-list",
        ),
        pytest.param(
            {"command": "x", "kwargs": {"no-color": True, "a_b_c": "1", "empty": []}},
            ["x", "--no-color", "--a-b-c", "1"],
            id="dashes-and-empty-list",
        ),
    ],
)
def test_build_argv(payload: dict[str, Any], expected: list[str]) -> None:
    assert build_argv("graphiti", payload) == ["graphiti", *expected]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"command": []},
        {"command": 5},
        {"command": "a", "args": "x"},
        {"command": "a", "kwargs": [1]},
    ],
)
def test_build_argv_rejects_malformed_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(HandlerError):
        build_argv("graphiti", payload)


# --- run_replay -----------------------------------------------------------------------------


def test_replay_argv_env_stdin_and_group(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MARKER", "inherited")
    spawned: list[tuple[int, int | None]] = []
    payload = {
        "command": ["memory", "add"],
        "args": ["-content", "ü"],
        "kwargs": {"scope": "project", "force": True},
    }

    result = fake.run(
        payload,
        job_id="job-42",
        attempt=2,
        on_spawn=lambda pgid: spawned.append((pgid, handlers.current_process_group())),
    )

    assert result.outcome is Outcome.SUCCEEDED, result
    assert result.exit_code == 0
    assert result.output_tail == "ok\n"
    assert result.finished_at is not None
    rec = fake.record()
    assert rec["argv"] == [
        str(fake.program),
        *("memory", "add", "--scope", "project", "--force", "--", "-content", "ü"),
    ]
    assert rec["job_id"] == "job-42"
    assert rec["attempt"] == "2"
    assert rec["marker"] == "inherited"
    assert rec["stdin_is_devnull"] is True
    assert rec["stdin"] == ""
    # its own process group, reported through on_spawn, and forgotten afterwards
    assert rec["pgid"] == rec["pid"]
    assert spawned == [(rec["pid"], rec["pid"])]
    assert handlers.current_process_group() is None
    assert "GRAPHITI_MPQ_JOB_ID" not in os.environ


def test_replay_runs_in_cwd(fake: Fake, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    result = fake.run({"command": "add", "cwd": str(work)})
    assert result.outcome is Outcome.SUCCEEDED
    assert fake.record()["cwd"] == str(work)


def test_replay_defaults_to_our_cwd(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert fake.run({"command": "add"}).outcome is Outcome.SUCCEEDED
    assert fake.record()["cwd"] == str(tmp_path)


def test_relative_program_is_ours_not_the_jobs(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = fake.run({"command": "add", "cwd": str(elsewhere)}, program="bin/fake-graphiti")
    assert result.outcome is Outcome.SUCCEEDED, result
    assert fake.record()["argv"][1:] == ["add"]


def test_replay_missing_cwd_fails_clearly(fake: Fake, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = fake.run({"command": "add", "cwd": str(missing)})
    assert result.outcome is Outcome.FAILED
    assert result.error == f"working directory does not exist: {missing}"
    assert not fake.record_path.exists()


def test_replay_missing_program_fails_clearly(fake: Fake, tmp_path: Path) -> None:
    result = fake.run({"command": "add"}, program=str(tmp_path / "nope"))
    assert result.outcome is Outcome.FAILED
    assert result.error == f"program not found: {tmp_path / 'nope'}"
    result = fake.run({"command": "add"}, program="graphiti-mpq-no-such-program")
    assert result.error == "program not found: graphiti-mpq-no-such-program"


def test_replay_program_not_executable(fake: Fake) -> None:
    fake.program.chmod(0o644)
    result = fake.run({"command": "add"})
    assert result.outcome is Outcome.FAILED
    assert result.error == f"program is not executable: {fake.program}"


def test_replay_nonzero_exit(fake: Fake) -> None:
    result = fake.run({"command": "fail"})
    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3
    assert result.signal is None
    assert result.error == "exit status 3: the last words"
    assert result.output_tail is not None
    assert "some output" in result.output_tail  # stdout and stderr, merged
    assert "the last words" in result.output_tail


def test_replay_killed_by_signal(fake: Fake) -> None:
    result = fake.run({"command": "term"})
    assert result.outcome is Outcome.FAILED
    assert result.exit_code is None
    assert result.signal == "SIGTERM"
    assert result.error == "killed by SIGTERM"


def test_timeout_kills_the_grandchild_too(fake: Fake) -> None:
    started = time.monotonic()
    result = fake.run({"command": "hang"}, timeout=1.0)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.TIMEOUT
    assert result.error == "timed out after 1s"
    assert 1.0 <= elapsed < 2.5
    grandchild = fake.grandchild()
    assert _wait_until(lambda: not procinfo.is_alive(grandchild))
    assert handlers.current_process_group() is None


def test_grandchild_left_behind_is_killed_after_exit(fake: Fake) -> None:
    started = time.monotonic()
    result = fake.run({"command": "orphan"})
    assert time.monotonic() - started < 2.0  # its open pipe did not keep us waiting
    assert result.outcome is Outcome.SUCCEEDED
    assert result.output_tail == "left a grandchild behind\n"
    grandchild = fake.grandchild()
    assert _wait_until(lambda: not procinfo.is_alive(grandchild))


def test_escaped_grandchild_holding_the_pipe_does_not_hang_us(fake: Fake) -> None:
    # It left our process group (setsid), so it survives, but we stop reading in bounded time.
    started = time.monotonic()
    result = fake.run({"command": "escape"})
    assert time.monotonic() - started < 2.0
    assert result.outcome is Outcome.SUCCEEDED
    assert procinfo.is_alive(fake.grandchild())  # the fixture kills it


def test_output_tail_is_bounded(fake: Fake) -> None:
    result = fake.run({"command": "spew"})
    assert result.outcome is Outcome.SUCCEEDED
    assert result.output_tail is not None
    assert len(result.output_tail) == handlers.TAIL_CHARS
    assert result.output_tail.endswith("x\nTHE END\n")


def test_output_is_decoded_with_replacement(fake: Fake) -> None:
    result = fake.run({"command": "unicode"})
    assert result.output_tail == "héllo ☃\nbad \ufffd byte\n"


def test_replay_refuses_a_malformed_payload(fake: Fake) -> None:
    result = fake.run({"command": ["a", 3]})
    assert result.outcome is Outcome.FAILED
    assert result.error is not None and "payload.command" in result.error


def test_on_spawn_failure_kills_the_command(fake: Fake) -> None:
    groups: list[int] = []

    def boom(pgid: int) -> None:
        groups.append(pgid)
        raise RuntimeError("cannot record")

    with pytest.raises(RuntimeError):
        fake.run({"command": "hang"}, on_spawn=boom)
    assert not procinfo.is_alive(groups[0])
    assert handlers.current_process_group() is None


def test_an_argument_with_a_nul_byte_fails_the_attempt_and_frees_the_spawn(fake: Fake) -> None:
    """Passed on, a NUL would cut the argument short: the attempt fails with the reason, and
    the next replay spawns at once (the spawn lock was let go)."""
    result = fake.run({"command": "ok", "args": ["a\x00b"]})
    assert result.outcome is Outcome.FAILED
    assert result.error is not None and "null byte" in result.error
    assert not fake.record_path.exists()
    assert not handlers.spawn_lock.locked()
    assert fake.run({"command": "ok"}).outcome is Outcome.SUCCEEDED


# --- Python handlers, registry and dispatch --------------------------------------------------


def test_run_python_success() -> None:
    result = run_python(lambda p: {"echo": p["x"]}, {"x": [1, "a"]})
    assert result.outcome is Outcome.SUCCEEDED
    assert result.result == {"echo": [1, "a"]}
    assert result.error is None


def test_run_python_exception() -> None:
    def broken(payload: dict[str, Any]) -> None:
        raise ValueError(f"bad value {payload['x']}")

    result = run_python(broken, {"x": 7})
    assert result.outcome is Outcome.FAILED
    assert result.error == "ValueError: bad value 7"
    assert result.output_tail is not None
    assert result.output_tail.startswith("Traceback")
    assert "in broken" in result.output_tail


def test_run_python_traceback_tail_is_bounded() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("bottom " + "z" * 9000)
        deep(n - 1)

    result = run_python(lambda p: deep(5), {})
    assert result.output_tail is not None
    assert len(result.output_tail) == handlers.TAIL_CHARS
    assert result.output_tail.rstrip().endswith("zzz")
    assert result.error is not None
    assert result.error.startswith("RuntimeError: bottom zzz")
    assert len(result.error) == handlers.TAIL_CHARS


@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan")])
def test_run_python_non_serialisable_result(value: object) -> None:
    result = run_python(lambda p: value, {})
    assert result.outcome is Outcome.FAILED
    assert result.error is not None
    assert result.error.startswith("result is not JSON-serialisable: ")


@pytest.fixture
def job_type() -> Iterator[str]:
    name = f"test-type-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    handlers.unregister(name)


def test_registry(job_type: str) -> None:
    assert handlers.get_handler(job_type) is None

    @handlers.handler(job_type)
    def first(payload: dict[str, Any]) -> int:
        return 1

    assert handlers.get_handler(job_type) is first
    assert job_type in handlers.registered_types()

    @handlers.handler(job_type)
    def second(payload: dict[str, Any]) -> int:
        return 2

    assert handlers.get_handler(job_type) is second
    assert first({}) == 1  # the decorator returns the function unchanged
    assert handlers.unregister(job_type)
    assert job_type not in handlers.registered_types()


def test_registered_handler_wins_over_replay(job_type: str) -> None:
    handlers.handler(job_type)(lambda p: "python")
    result = run_job(
        job_type,
        {"command": "add"},
        program="graphiti-mpq-no-such-program",
        job_id="j",
        attempt=1,
        timeout=5,
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert result.result == "python"


def test_run_job_replays_a_command(fake: Fake, job_type: str) -> None:
    result = run_job(
        job_type,
        {"command": "add", "args": ["x"]},
        program=str(fake.program),
        job_id="j",
        attempt=1,
        timeout=5,
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert fake.record()["argv"][1:] == ["add", "--", "x"]


def test_run_job_without_handler_or_command(job_type: str) -> None:
    result = run_job(job_type, {"x": 1}, program="graphiti", job_id="j", attempt=1, timeout=5)
    assert result.outcome is Outcome.FAILED
    assert result.error == (
        f"no handler registered for job type {job_type!r} and the payload has no 'command'"
    )


def test_import_handler_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job_type: str
) -> None:
    module = tmp_path / "gmpq_test_handlers_mod.py"
    module.write_text(
        textwrap.dedent(
            f"""
            from graphiti_mpq.handlers import handler

            @handler({job_type!r})
            def run(payload):
                return payload
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        handlers.import_handler_modules([" gmpq_test_handlers_mod ", ""])
        assert handlers.get_handler(job_type) is not None
    finally:
        sys.modules.pop("gmpq_test_handlers_mod", None)


def test_import_handler_modules_names_the_missing_module() -> None:
    with pytest.raises(HandlerError, match="gmpq_no_such_module"):
        handlers.import_handler_modules(["gmpq_no_such_module"])


def test_import_handler_modules_names_a_broken_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gmpq_broken_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(HandlerError, match=r"gmpq_broken_mod.*RuntimeError: boom"):
            handlers.import_handler_modules(["gmpq_broken_mod"])
    finally:
        sys.modules.pop("gmpq_broken_mod", None)


def test_registry_import_stays_light() -> None:
    # What importing the registry adds (the package's own __init__ is not this module's doing).
    code = (
        "import sys, graphiti_mpq; before = set(sys.modules); import graphiti_mpq.handlers; "
        "heavy = {'sqlite_utils', 'structlog', 'filelock', 'multiprocessing', 'subprocess'}; "
        "print(sorted(heavy & (set(sys.modules) - before)))"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
