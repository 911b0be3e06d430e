"""Plumbing shared by the CLI commands: the state of the global options, opening the queue,
durations, confirmations, one-line errors and output helpers.

The commands themselves live in ``cli.py`` (operator commands) and ``cli_serve.py``
(``supervise``, ``drain``); both reach the global options through :func:`pass_state`.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from .config import Settings, load_settings, parse_duration, queue_location
from .errors import EXIT_FAILED, EXIT_USAGE, ConfigError, QueueError
from .storage import open_queue

if TYPE_CHECKING:
    from .storage.base import QueueStore

__all__ = [
    "BUSY_TIMEOUT_ENV",
    "DURATION",
    "PROG",
    "AnyParamType",
    "CliError",
    "CliState",
    "Duration",
    "FloatParamType",
    "QueueGroup",
    "confirm_destructive",
    "is_terminal",
    "json_out",
    "one_line",
    "open_queue_for",
    "pass_state",
    "shorten",
    "table",
]

#: The program name in messages and help, however the CLI was started.
PROG = "graphiti_mpq"

#: How long a CLI command waits for another process's write lock before it reports
#: "database busy" (a duration; 5 s by default). Tests set it low.
BUSY_TIMEOUT_ENV = "GRAPHITI_QUEUE_BUSY_TIMEOUT"
DEFAULT_BUSY_TIMEOUT = 5.0


@dataclass
class CliState:
    """What the global options decided; stored as ``ctx.obj`` by the group callback."""

    #: The queue location: ``--db``, else ``GRAPHITI_QUEUE_PATH``, else the XDG default.
    location: str = field(default_factory=queue_location)
    #: ``auto``, ``console`` or ``json``.
    log_format: str = "auto"
    #: -1 with ``-q``, 0 by default, 1 with ``-v``.
    verbosity: int = 0

    @property
    def verbose(self) -> bool:
        return self.verbosity > 0

    @property
    def log_level(self) -> str:
        return {-1: "warning", 0: "info"}.get(self.verbosity, "debug")

    def settings(self, **options: Any) -> Settings:
        """Settings for this location: ``options`` (None: not given) > environment > default."""
        return load_settings(self.location, env=None, **options)

    def configure_logging(self) -> None:
        """Set up the logs as the global options say; commands that log call it first.

        Not done for every command by the group: structlog (and the asyncio it imports) costs
        tens of milliseconds, and reading commands such as ``status`` never log.
        """
        from .logs import configure_logging

        configure_logging(self.log_format, self.log_level)


if TYPE_CHECKING:  # click >= 8.2 makes ParamType generic; 8.1 cannot subscript it at run time
    FloatParamType = click.ParamType[float]
    AnyParamType = click.ParamType[Any]
else:
    FloatParamType = AnyParamType = click.ParamType


#: Passes the :class:`CliState` of the current invocation as the first argument of a command.
pass_state = click.make_pass_decorator(CliState, ensure=True)


def busy_timeout() -> float:
    """Seconds to wait for a lock held by another process (``GRAPHITI_QUEUE_BUSY_TIMEOUT``)."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV, "")
    return parse_duration(raw, BUSY_TIMEOUT_ENV) if raw else DEFAULT_BUSY_TIMEOUT


def open_queue_for(state: CliState, settings: Settings | None = None) -> QueueStore:
    """Open (and migrate) the queue the global options name; closed when the command ends."""
    settings = settings if settings is not None else state.settings()
    queue = open_queue(
        settings.location,
        settings.capacity,
        max_retries=settings.max_retries,
        backoff_base=settings.backoff_base,
        busy_timeout=busy_timeout(),
    )
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(queue.close)
    queue.ingest_spool()  # jobs spooled while the database was busy are shown (and served)
    return queue


class Duration(FloatParamType):
    """A duration: seconds, optionally suffixed ``s``, ``m``, ``h`` or ``d`` (``90``, ``15m``)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return parse_duration(str(value))
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)


DURATION = Duration()


class CliError(click.ClickException):
    """An error for the user: one line on stderr and its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(one_line(message))
        # click declares exit_code on the class; each error carries its own.
        vars(self)["exit_code"] = exit_code

    @classmethod
    def from_queue_error(cls, exc: QueueError) -> CliError:
        return cls(exc.message or type(exc).__name__, exc.exit_code)


def one_line(text: str) -> str:
    """``text`` with its lines joined: an error is always exactly one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def is_terminal() -> bool:
    """A person can answer: stdin and stdout are both terminals."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def confirm_destructive(yes: bool, prompt: str, *, action: str, ask: bool = True) -> None:
    """Go on with a destructive command, or stop it.

    With ``--yes``: go on. On a terminal: ask ``prompt`` (unless ``ask`` is false, e.g. when
    there is nothing to delete); a "no" fails the command (exit 1). Without a terminal and
    without ``--yes``: a usage error (exit 2) before anything is touched, whatever there is to
    delete, so a script behaves the same on an empty queue and a full one.
    """
    if yes:
        return
    if not is_terminal():
        raise CliError(f"refusing to {action} without --yes (not a terminal)", EXIT_USAGE)
    if ask and not click.confirm(prompt, default=False):
        raise CliError(f"not confirmed: did not {action}", EXIT_FAILED)


def json_out(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (the only thing a ``--json`` command prints there)."""
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart (the last one unpadded), under optional headers."""
    grid = [list(headers), *rows] if headers is not None else [list(row) for row in rows]
    if not grid:
        return ""
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]) - 1)]
    lines = []
    for row in grid:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def shorten(text: str | None, width: int = 60) -> str:
    """One line of at most ``width`` characters (``-`` for nothing)."""
    if not text:
        return "-"
    flat = one_line(text)
    return flat if len(flat) <= width else flat[: width - 3] + "..."


_MAIN_PARAMS = ("args", "prog_name", "complete_var", "standalone_mode", "windows_expand_args")


class QueueGroup(click.Group):
    """The root group: every error reaches the user as one line on stderr, no traceback.

    ``invoke`` turns a :class:`QueueError` into its one line and exit code, and any other
    exception into one line with exit 1 (the traceback too, above it, under ``-v``). ``main``
    runs click without its standalone handling and prints every click error (usage errors
    included) as ``graphiti_mpq: error: ...`` itself. The console script, ``python -m
    graphiti_mpq`` and ``CliRunner`` all go through ``main``, so they behave the same.

    A command ends with status 0 by returning None; ``ctx.exit(code)`` or raising an error
    gives another status.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except QueueError as exc:
            _traceback_if_verbose(ctx)
            raise CliError.from_queue_error(exc) from exc
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # click's main quietly ends a command whose reader went away
            verbose = _traceback_if_verbose(ctx)
            hint = "" if verbose else " (run with -v for the traceback)"
            raise CliError(f"unexpected {type(exc).__name__}: {exc}{hint}", EXIT_FAILED) from exc

    def main(self, *args: Any, **kwargs: Any) -> Any:
        params: dict[str, Any] = dict(zip(_MAIN_PARAMS, args, strict=False)) | kwargs
        if not params.get("standalone_mode", True):
            return super().main(**params)
        params["standalone_mode"] = False
        params["prog_name"] = params.get("prog_name") or PROG
        try:
            rv = super().main(**params)
        except click.ClickException as exc:
            _report(render_error(exc))
            sys.exit(exc.exit_code)
        except click.Abort:
            _report(f"{PROG}: error: aborted")
            sys.exit(EXIT_FAILED)
        except QueueError as exc:  # raised outside a command (e.g. by an option's callback)
            _report(render_error(CliError.from_queue_error(exc)))
            sys.exit(exc.exit_code)
        except Exception as exc:
            _report(f"{PROG}: error: unexpected {type(exc).__name__}: {one_line(str(exc))}")
            sys.exit(EXIT_FAILED)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def render_error(exc: click.ClickException) -> str:
    """``graphiti_mpq: error: <message>``; a usage error also names the help to read."""
    message = one_line(exc.format_message())
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} --help')"
    return f"{PROG}: error: {message}"


def _report(line: str) -> None:
    click.echo(line, err=True)


def _traceback_if_verbose(ctx: click.Context) -> bool:
    state = ctx.find_object(CliState)
    verbose = state is not None and state.verbose
    if verbose:
        click.echo(traceback.format_exc(), err=True, nl=False)
    return verbose
