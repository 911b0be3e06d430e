"""``async_option``: what ``--async`` records, what it refuses, its output, and faithful replay."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from graphiti_mpq import async_click, hookctx
from graphiti_mpq.async_click import async_option
from graphiti_mpq.errors import DatabaseBusyError, InvalidJobError, QueueError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "graphiti_cli.py"

# --- a small CLI ----------------------------------------------------------------------------

calls: list[tuple[str, dict[str, Any]]] = []


@click.group()
@click.option("--db", default=None)
def cli(db: str | None) -> None:
    pass


@cli.command()
@click.argument("content", nargs=-1)
@click.option("--scope", type=click.Choice(["project", "global"]), default="project")
@click.option("--force", is_flag=True)
@click.option("--x/--no-x", "x", default=True)
@click.option("--tag", multiple=True)
@click.option("-v", "--verbose", count=True)
@click.option("--max-items", "--limit", type=int, default=5)
@click.option("--ratio", type=float, default=0.5)
@click.option("--confirm", type=bool, default=None)
@click.option("-n", "short_only", type=int, default=None)
@click.option("--pair", nargs=2, default=None)
@click.option("--out", type=click.File("w"), default=None)
@click.option("--when", type=click.DateTime(), default=None)
@click.option("--path", type=click.Path(path_type=Path), default=None)
@click.option("--upper", "transform", flag_value="upper")
@click.option("--lower", "transform", flag_value="lower")
@click.option("--from-env", envvar="ASYNC_TEST_FROM_ENV", default="dflt")
@async_option
def add(**received: Any) -> None:
    calls.append(("add", received))


@cli.group()
def memory() -> None:
    pass


@memory.command("add")
@click.argument("name")
@click.argument("text", nargs=-1)
@click.option("--kind", default="note")
@async_option(silent=False)
def memory_add(**received: Any) -> None:
    calls.append(("memory add", received))


@cli.command()
@async_option(silent=True)
def quiet(**received: Any) -> None:
    calls.append(("quiet", received))


@click.command()
@click.argument("content")
@async_option
def standalone(content: str) -> None:
    calls.append(("standalone", {"content": content}))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    calls.clear()
    for name in ("GRAPHITI_HOOK", "ASYNC_TEST_FROM_ENV", "GRAPHITI_EXAMPLE_LOG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Capture what ``--async`` would store, without a queue."""
    jobs: list[tuple[str, dict[str, Any]]] = []

    def fake_enqueue(job_type: str, payload: dict[str, Any]) -> str:
        jobs.append((job_type, json.loads(json.dumps(payload))))
        return f"job-{len(jobs)}"

    monkeypatch.setattr(async_click, "_enqueue", fake_enqueue)
    return jobs


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "a dir with spaces ü"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def invoke(command: click.Command, args: list[str], **kwargs: Any) -> Result:
    return CliRunner().invoke(command, args, catch_exceptions=False, **kwargs)


# --- what it records ------------------------------------------------------------------------


def test_records_the_call_and_skips_the_body(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path
) -> None:
    result = invoke(
        cli,
        [
            "add",
            "--async",
            "first arg",
            "--scope",
            "global",
            "--force",
            "--no-x",
            "--tag",
            "a",
            "--tag",
            "b c",
            "-vv",
            "--verbose",
            "--limit",
            "7",
            "--ratio",
            "1.25",
            "--confirm",
            "false",
            "--lower",
            "--path",
            "rel/file.txt",
            "--",
            "-second",
            "",
        ],
        env={"GRAPHITI_HOOK": "1"},
    )
    assert result.exit_code == 0, result.output
    assert calls == []
    assert queued == [
        (
            "add",
            {
                "command": "add",
                "args": ["first arg", "-second", ""],
                "kwargs": {
                    "scope": "global",
                    "force": True,
                    "no-x": True,
                    "tag": ["a", "b c"],
                    "verbose": [True, True, True],
                    "max-items": 7,
                    "ratio": 1.25,
                    "confirm": "false",
                    "lower": True,
                    "path": "rel/file.txt",
                },
                "cwd": str(workdir),
            },
        )
    ]


def test_defaults_and_environment_are_not_recorded(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path
) -> None:
    result = invoke(cli, ["add", "--async"], env={"ASYNC_TEST_FROM_ENV": "secret"})
    assert result.exit_code == 0, result.output
    assert queued == [("add", {"command": "add", "args": [], "kwargs": {}, "cwd": str(workdir)})]


def test_an_option_set_to_its_default_is_recorded(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path
) -> None:
    result = invoke(cli, ["add", "--async", "--x", "--scope", "project", "--max-items", "5"])
    assert result.exit_code == 0, result.output
    assert queued[0][1]["kwargs"] == {"x": True, "scope": "project", "max-items": 5}


def test_nested_group_records_the_command_path(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path
) -> None:
    result = invoke(cli, ["memory", "add", "--async", "n", "t1", "t2", "--kind", "fact"])
    assert result.exit_code == 0, result.output
    assert calls == []
    assert queued == [
        (
            "memory add",
            {
                "command": ["memory", "add"],
                "args": ["n", "t1", "t2"],
                "kwargs": {"kind": "fact"},
                "cwd": str(workdir),
            },
        )
    ]


def test_without_async_the_body_runs_and_never_sees_the_flag(
    queued: list[tuple[str, dict[str, Any]]],
) -> None:
    result = invoke(cli, ["add", "x"])
    assert result.exit_code == 0, result.output
    assert queued == []
    assert calls[0][0] == "add"
    assert "async_" not in calls[0][1]
    assert calls[0][1]["content"] == ("x",)


def test_help_shows_the_option() -> None:
    result = invoke(cli, ["add", "--help"])
    assert "--async" in result.output


def test_decorator_above_the_command_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"under @group\.command"):
        async_option(click.command()(lambda: None))


# --- what it refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["add", "--async", "-n", "3"], "no long name"),
        (["add", "--async", "--pair", "a", "b"], "nargs > 1"),
        (["add", "--async", "--out", "out.txt"], "file"),
        (["add", "--async", "--when", "2024-01-02"], "not a JSON scalar"),
        (["add", "--async", "--ratio", "nan"], "not a JSON number"),
        (["--db", "other.db", "add", "--async", "x"], "--db"),
        (["--db", "other.db", "memory", "add", "--async", "x"], "--db"),
        (["add", "--async", "--", "bad\udcffbytes"], "UTF-8"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path, args: list[str], needle: str
) -> None:
    result = invoke(cli, args, env={"GRAPHITI_HOOK": "1"})
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "nothing was queued" in lines[0]
    assert queued == []
    assert calls == []
    assert not (workdir / "out.txt").exists()


def test_a_short_only_option_left_unset_is_fine(
    queued: list[tuple[str, dict[str, Any]]], workdir: Path
) -> None:
    assert invoke(cli, ["add", "--async", "x"]).exit_code == 0
    assert len(queued) == 1


def test_a_command_outside_a_group_is_refused(queued: list[tuple[str, dict[str, Any]]]) -> None:
    result = invoke(standalone, ["--async", "x"])
    assert result.exit_code == 2
    assert "not a subcommand of a click group" in result.stderr
    assert queued == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DatabaseBusyError("database busy"), 1),
        (InvalidJobError("payload", "too big"), 2),
        (QueueError("line one\nline two"), 1),
    ],
)
def test_queue_errors_are_one_line_with_their_exit_code(
    monkeypatch: pytest.MonkeyPatch, error: QueueError, code: int
) -> None:
    def failing_enqueue(job_type: str, payload: dict[str, Any]) -> str:
        raise error

    monkeypatch.setattr(async_click, "_enqueue", failing_enqueue)
    result = invoke(cli, ["add", "--async", "x"], env={"GRAPHITI_HOOK": "1"})
    assert result.exit_code == code
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert calls == []


# --- output ---------------------------------------------------------------------------------


def test_hook_context_prints_nothing(queued: list[tuple[str, dict[str, Any]]]) -> None:
    result = invoke(cli, ["add", "--async", "x"], env={"GRAPHITI_HOOK": "1"})
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == ""


def test_terminal_prints_one_confirmation_line(queued: list[tuple[str, dict[str, Any]]]) -> None:
    result = invoke(cli, ["add", "--async", "x"], env={"GRAPHITI_HOOK": "0"})
    assert result.exit_code == 0
    assert result.stdout == "queued add as job job-1 (runs in the background)\n"
    assert result.stderr == ""


def test_silent_false_overrides_a_hook_context(queued: list[tuple[str, dict[str, Any]]]) -> None:
    result = invoke(cli, ["memory", "add", "--async", "x"], env={"GRAPHITI_HOOK": "1"})
    assert result.stdout == "queued memory add as job job-1 (runs in the background)\n"
    assert result.stderr == ""


def test_silent_true_overrides_a_terminal(queued: list[tuple[str, dict[str, Any]]]) -> None:
    result = invoke(cli, ["quiet", "--async"], env={"GRAPHITI_HOOK": "0"})
    assert result.exit_code == 0
    assert result.stdout == result.stderr == ""
    assert [job_type for job_type, _ in queued] == ["quiet"]


class _Stdout(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("hook", "tty", "expected"),
    [
        (None, True, False),
        (None, False, True),
        ("", True, False),
        ("", False, True),
        ("1", True, True),
        ("yes", True, True),
        ("true", False, True),
        ("0", True, False),
        ("0", False, False),
    ],
)
def test_is_hook_context(
    monkeypatch: pytest.MonkeyPatch, hook: str | None, tty: bool, expected: bool
) -> None:
    if hook is not None:
        monkeypatch.setenv("GRAPHITI_HOOK", hook)
    monkeypatch.setattr(sys, "stdout", _Stdout(tty))
    assert hookctx.is_hook_context() is expected


def test_is_hook_context_without_a_usable_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    assert hookctx.is_hook_context() is True
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    assert hookctx.is_hook_context() is True


# --- faithful replay through the reference CLI ----------------------------------------------


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("graphiti_cli_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_example()


@pytest.fixture
def program(tmp_path: Path) -> str:
    """A stand-in for the ``graphiti`` program: runs the example CLI."""
    wrapper = tmp_path / "graphiti"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{EXAMPLE}" "$@"\n', encoding="utf-8")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def _direct(example: ModuleType, args: list[str], log: Path) -> dict[str, Any]:
    result = invoke(example.cli, args, env={"GRAPHITI_EXAMPLE_LOG": str(log)})
    assert result.exit_code == 0, result.output
    lines = log.read_text(encoding="utf-8").splitlines()
    log.unlink()
    assert len(lines) == 1
    record: dict[str, Any] = json.loads(lines[0])
    return record


def _replay(program: str, payload: dict[str, Any], log: Path) -> dict[str, Any]:
    from graphiti_mpq.handlers import build_argv

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHITI")}
    env["GRAPHITI_EXAMPLE_LOG"] = str(log)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        build_argv(program, payload),
        cwd=payload["cwd"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    log.unlink()
    assert len(lines) == 1
    record: dict[str, Any] = json.loads(lines[0])
    return record


def _with_async(args: list[str]) -> list[str]:
    depth = 2 if args[0] == "memory" else 1
    return [*args[:depth], "--async", *args[depth:]]


REPLAY_CASES = {
    "spaces": ["add", "hello big world", "two  spaces "],
    "leading dashes": ["add", "--", "-starts with a dash", "--force", "-v", "--"],
    "unicode": ["add", "ünïcødé ✓ 日本語 🎉", "--tag", "naïve"],
    "empty strings": ["add", "", "--tag", ""],
    "newlines and quotes": ["add", "line 1\nline 2", 'it\'s "quoted" $HOME `x` \\'],
    "everything": [
        "add",
        "a",
        "b c",
        "--tag",
        "x",
        "--tag",
        "y z",
        "--scope",
        "global",
        "--force",
        "--no-summarize",
        "-vv",
        "--verbose",
        "--max-facts",
        "0",
    ],
    "on side of a pair": ["add", "x", "--summarize", "--max-facts", "-3"],
    "option values like options": ["add", "x", "--tag", "-dash", "--tag=--", "--tag", "--force"],
    "nested group": ["memory", "add", "--kind", "fact", "--", "name", "text one", "-two"],
    "nested nargs=-1 empty": ["memory", "add", "only-name", "--weight", "0.125"],
}


@pytest.mark.parametrize("args", list(REPLAY_CASES.values()), ids=list(REPLAY_CASES))
def test_replay_reproduces_the_direct_call(
    example: ModuleType,
    queued: list[tuple[str, dict[str, Any]]],
    workdir: Path,
    tmp_path: Path,
    program: str,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    log = tmp_path / "received.jsonl"
    direct = _direct(example, args, log)

    result = invoke(example.cli, _with_async(args), env={"GRAPHITI_EXAMPLE_LOG": str(log)})
    assert result.exit_code == 0, result.output
    assert not log.exists(), "--async ran the body"
    [(job_type, payload)] = queued
    assert job_type == " ".join(args[:2] if args[0] == "memory" else args[:1])
    assert payload["cwd"] == str(workdir)

    monkeypatch.chdir(tmp_path)  # the replay must go back to the recorded directory by itself
    assert _replay(program, payload, log) == direct


# --- end to end through the queue (needs graphiti_mpq.api) ----------------------------------


@pytest.fixture
def queue_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from graphiti_mpq import api

    path = tmp_path / "q.db"
    monkeypatch.setenv("GRAPHITI_QUEUE_PATH", str(path))
    api.reset()
    yield path
    api.reset()


def test_async_stores_a_replay_job_in_the_queue(queue_path: Path, workdir: Path) -> None:
    from graphiti_mpq import api

    result = invoke(
        cli, ["memory", "add", "--async", "n", "t", "--kind", "fact"], env={"GRAPHITI_HOOK": "0"}
    )
    assert result.exit_code == 0, result.output
    assert calls == []
    line = result.stdout.strip()
    assert line.startswith("queued memory add as job ")
    job_id = line.removeprefix("queued memory add as job ").split()[0]
    job = api.get_queue().get_job(job_id)
    assert job.job_type == "memory add"
    assert job.parallel is False
    assert job.payload == {
        "command": ["memory", "add"],
        "args": ["n", "t"],
        "kwargs": {"kind": "fact"},
        "cwd": str(workdir),
    }


def test_stored_job_replays_like_the_direct_call(
    example: ModuleType, queue_path: Path, workdir: Path, tmp_path: Path, program: str
) -> None:
    from graphiti_mpq import api

    args = ["add", "--tag", "t 1", "--tag", "-t2", "--no-summarize", "-vv", "--", "-x y", "ü", ""]
    log = tmp_path / "received.jsonl"
    direct = _direct(example, args, log)

    ids: list[str] = []
    real_enqueue = async_click._enqueue

    def spy(job_type: str, payload: dict[str, Any]) -> str:
        ids.append(real_enqueue(job_type, payload))
        return ids[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(async_click, "_enqueue", spy)
        result = invoke(example.cli, _with_async(args), env={"GRAPHITI_HOOK": "1"})
    assert result.exit_code == 0, result.output
    assert result.stdout == result.stderr == ""
    job = api.get_queue().get_job(ids[0])
    assert job.job_type == "add"
    assert _replay(program, job.payload, log) == direct


def test_importing_the_option_stays_light() -> None:
    code = (
        "import sys, graphiti_mpq.async_click, graphiti_mpq.hookctx\n"
        "heavy = {'sqlite_utils', 'structlog', 'filelock', 'multiprocessing'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]"
