"""Starting replayed commands (``graphiti_mpq.spawn``): both the compiled spawn and the exec
wrappers give a command that leads its own group, dies with the process that started it, and
fails to start with an OSError that names what was missing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphiti_mpq import spawn

from .helpers import assert_dies_with_its_spawner

ROOT = str(Path(__file__).resolve().parents[1])
WAYS = ["compiled", "wrappers"]


def _skip_unless_built() -> None:
    if spawn._spawn is None:
        pytest.skip("graphiti_mpq._spawn is not built here (no C compiler at install)")


@pytest.fixture(params=WAYS)
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "compiled":
        _skip_unless_built()
    monkeypatch.setattr(spawn, "use_compiled", request.param == "compiled")
    yield request.param


def _run(argv: list[str], cwd: str | None = None) -> tuple[int, bytes, int]:
    """(exit code, output, process group) of a command run to its end."""
    proc = spawn.start(argv, None, cwd, dict(os.environ))
    assert proc.stdout is not None
    pgid = os.getpgid(proc.pid)
    output = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(), output, pgid


def test_a_command_leads_its_own_group_and_its_output_comes_back(way: str) -> None:
    code, output, pgid = _run(["sh", "-c", 'echo "out $0"; echo err >&2; exit 3', "x"])
    assert code == 3
    assert output == b"out x\nerr\n"
    assert pgid != os.getpgrp()


def test_stdin_is_empty_and_cwd_is_used(way: str, tmp_path: Path) -> None:
    code, output, _ = _run(["sh", "-c", "pwd; cat; echo end"], cwd=str(tmp_path))
    assert code == 0
    assert output == f"{tmp_path}\nend\n".encode()


def test_a_signal_ends_it_with_a_negative_code(way: str) -> None:
    code, _, _ = _run(["sh", "-c", "kill -TERM $$"])
    assert code == -signal.SIGTERM


def test_failures_to_start_name_what_was_missing(way: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    missing = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError) as caught:
        spawn.start(["true"], None, missing, env)
    assert caught.value.filename == missing
    with pytest.raises(FileNotFoundError) as caught:
        spawn.start(["no-such-program-here"], None, None, env)
    assert caught.value.filename == "no-such-program-here"
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        spawn.start([str(script)], None, None, env)
    with pytest.raises(PermissionError):
        spawn.start([str(tmp_path)], None, None, env)


def test_the_command_dies_with_the_process_that_started_it(way: str) -> None:
    """A middle process starts a long sleep and is SIGKILLed: the kernel kills the sleep."""
    assert_dies_with_its_spawner(
        "spawn.start(['sleep', '30'], None, None, dict(os.environ))",
        prelude=f"spawn.use_compiled = {way == 'compiled'}",
    )


def test_the_compiled_spawn_never_runs_a_command_whose_spawner_is_gone(tmp_path: Path) -> None:
    """The race the signal cannot cover: the spawner died before the new process armed it,
    and it was reparented. The new process checks its parent against the one it was given."""
    _skip_unless_built()
    assert spawn._spawn is not None
    ran = tmp_path / "ran"
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        args = (b"/usr/bin/env", [b"env", b"touch", bytes(ran)], [], None, devnull, devnull)
        with pytest.raises(ChildProcessError):
            spawn._spawn.spawn(*args, os.getppid())  # not the parent it will have
        assert not ran.exists()
        pid = spawn._spawn.spawn(*args, os.getpid())
    finally:
        os.close(devnull)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert ran.exists()


def test_the_compiled_spawn_refuses_bad_arguments() -> None:
    _skip_unless_built()
    assert spawn._spawn is not None
    with pytest.raises(TypeError):
        spawn._spawn.spawn(b"/bin/true", ["true"], [], None, 0, 1, os.getpid())  # type: ignore[list-item]
    with pytest.raises(OSError) as caught:
        spawn._spawn.spawn(b"/bin/true", [b"true"], [], None, 987654, 987655, os.getpid())
    assert caught.value.errno == errno.EBADF


def test_the_command_gets_sigpipe_and_sigxfsz_back(way: str) -> None:
    """Python ignores SIGPIPE (and SIGXFSZ); a command must not inherit that: ``yes | head``
    would spin, a file over its size limit would fail without the signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
        code, output, _ = _run(["sh", "-c", "grep -E '^SigIgn:' /proc/$$/status"])
    finally:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    assert code == 0
    ignored = int(output.decode().split(":")[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))


def test_arguments_it_cannot_pass_are_refused(way: str, tmp_path: Path) -> None:
    """A NUL byte would cut an argument short (another command than the one recorded)."""
    env = dict(os.environ)
    ran = tmp_path / "ran"
    with pytest.raises(ValueError):
        spawn.start(["touch", f"{ran}\x00x"], None, None, env)
    with pytest.raises(ValueError):
        spawn.start(["touch", str(ran)], None, None, {**env, "A=B": "1"})
    with pytest.raises(ValueError):
        spawn.start(["touch", str(ran)], None, None, {**env, "X": "a\x00b"})
    assert not ran.exists()


def test_an_exec_that_fails_is_an_oserror_naming_the_program(tmp_path: Path) -> None:
    """Found and executable, but its interpreter is missing: the exec itself fails."""
    _skip_unless_built()
    script = tmp_path / "orphan-script"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    with pytest.raises(FileNotFoundError) as caught:
        spawn.start([str(script)], None, None, dict(os.environ))
    assert caught.value.filename == str(script)


def test_the_streams_reach_the_command_when_ours_are_closed(way: str, tmp_path: Path) -> None:
    """With stdout and stderr closed, the output pipe gets descriptors 1 and 2: they must still
    end up as the command's standard streams."""
    result = tmp_path / "result"
    script = (
        "import os, sys; from graphiti_mpq import spawn; "
        f"spawn.use_compiled = {way == 'compiled'}; "
        "os.close(1); os.close(2); "
        "p = spawn.start(['sh', '-c', 'echo out; echo err >&2'], None, None, dict(os.environ)); "
        "data = p.stdout.read(); code = p.wait(); "
        f"open({str(result)!r}, 'w').write(repr((code, data)))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)
    assert result.read_text() == repr((0, b"out\nerr\n"))


def test_the_first_executable_program_on_the_path_runs(way: str, tmp_path: Path) -> None:
    """As execvp does: a file of the same name that cannot be executed, earlier on the PATH,
    does not hide the program; if no file of that name can be executed, it is refused."""
    early, late = tmp_path / "early", tmp_path / "late"
    for folder, mode in ((early, 0o644), (late, 0o755)):
        folder.mkdir()
        script = folder / "tool"
        script.write_text(f"#!/bin/sh\necho {folder.name}\n")
        script.chmod(mode)
    env = {**os.environ, "PATH": f"{early}:{late}:{os.environ.get('PATH', os.defpath)}"}
    proc = spawn.start(["tool"], None, None, env)
    assert proc.stdout is not None
    assert proc.stdout.read() == b"late\n"
    proc.stdout.close()
    assert proc.wait() == 0
    with pytest.raises(PermissionError):
        spawn.start(["tool"], None, None, {**env, "PATH": str(early)})
