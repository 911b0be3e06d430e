"""``--async`` for any click command: record the invocation as a replay job instead of running it.

Usage (the decorator goes under ``@group.command()``, like any click option)::

    @cli.command()
    @click.argument("content", nargs=-1)
    @click.option("--scope", type=click.Choice(["project", "global"]), default="project")
    @async_option
    def add(content: tuple[str, ...], scope: str) -> None: ...

``graphiti add --async "some text" --scope global`` then stores the job
``{"command": "add", "args": ["some text"], "kwargs": {"scope": "global"}, "cwd": "/abs"}``
(job type ``"add"``) and returns without running ``add``; a worker later replays
``graphiti add --scope global -- "some text"`` in that directory.

What is recorded: the command path below the root program, the positional arguments in order,
and the options whose value the caller gave on the command line or at a prompt (not defaults,
not environment variables nor ``default_map``: the replay sees the serving process's
environment and configuration, and a value taken from the environment, often a secret such as
an API key, is never written to the queue). Anything that cannot be replayed exactly is refused
with one line on stderr and exit status 2, before anything is written.

Hooks call this on every event, so this module imports only click, the stdlib and the light
modules of the package; the queue itself is imported when a job is recorded.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast, overload

import click
from click.core import ParameterSource

from .errors import EXIT_FAILED, EXIT_USAGE, InvalidJobError, QueueError
from .hookctx import is_hook_context
from .validation import validate_payload

__all__ = ["ASYNC_PARAM", "AsyncRefusedError", "async_option", "build_replay_job"]

#: The Python name of the ``--async`` parameter; the decorated function never receives it.
ASYNC_PARAM = "async_"

_HELP = "Record this command as a background job and return at once, without running it."

#: Where a value must come from to be recorded: the caller gave it for this invocation.
_RECORDED_SOURCES = frozenset({ParameterSource.COMMANDLINE, ParameterSource.PROMPT})

#: A long option name the replay can spell: it writes ``--`` + key with underscores as dashes.
_SPELLABLE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")

F = TypeVar("F", bound=Callable[..., Any])


class AsyncRefusedError(click.ClickException):
    """``--async`` cannot record this invocation faithfully; nothing was queued."""

    exit_code = EXIT_USAGE


class _EnqueueFailedError(click.ClickException):
    """The queue refused or failed to store the job (one line, the queue error's exit code)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(_one_line(message))
        # click declares exit_code a class variable; this error carries the queue error's code.
        vars(self)["exit_code"] = exit_code


@overload
def async_option(func: F, /) -> F: ...


@overload
def async_option(func: None = None, /, *, silent: bool | None = None) -> Callable[[F], F]: ...


def async_option(func: F | None = None, /, *, silent: bool | None = None) -> F | Callable[[F], F]:
    """Add ``--async`` to a click command: record the call as a replay job, skip the body.

    Use as ``@async_option`` or ``@async_option(silent=...)`` under ``@group.command()``.
    ``silent=None`` (the default) prints a one-line confirmation with the job id on a terminal
    and nothing at all in a hook context (:func:`~graphiti_mpq.is_hook_context`);
    ``silent=True`` never prints it, ``silent=False`` always does. Errors are always one line
    on stderr with a non-zero exit status.
    """

    def decorate(f: F) -> F:
        if isinstance(f, click.Command):
            raise TypeError(
                "@async_option decorates the command's function: place it under "
                "@group.command(), not above it"
            )

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not kwargs.pop(ASYNC_PARAM, False):
                return f(*args, **kwargs)
            return _record_invocation(click.get_current_context(), silent)

        # functools.wraps shares f's list of pending click params; give the wrapper its own.
        params = getattr(f, "__click_params__", None)
        if params is not None:
            wrapper.__click_params__ = list(params)  # type: ignore[attr-defined]
        option = click.option("--async", ASYNC_PARAM, is_flag=True, default=False, help=_HELP)
        return cast(F, option(wrapper))

    if func is None:
        return decorate
    return decorate(func)


def _record_invocation(ctx: click.Context, silent: bool | None) -> str:
    job_type, payload = build_replay_job(ctx)
    quiet = is_hook_context() if silent is None else silent
    try:
        job_id = _enqueue(job_type, payload)
    except QueueError as exc:
        message = exc.message or "the job could not be queued"
        raise _EnqueueFailedError(message, exc.exit_code) from None
    except OSError as exc:
        raise _EnqueueFailedError(f"the job could not be queued: {exc}", EXIT_FAILED) from None
    if not quiet:
        click.echo(f"queued {job_type} as job {job_id} (runs in the background)")
    return job_id


def _enqueue(job_type: str, payload: dict[str, Any]) -> str:
    """Store the job through the light enqueue path (imported only now, only what it needs)."""
    from .quick import enqueue_one

    return enqueue_one(job_type, payload)


def build_replay_job(ctx: click.Context) -> tuple[str, dict[str, Any]]:
    """The ``(job_type, payload)`` that replays the invocation of ``ctx``'s command.

    Raises :class:`AsyncRefusedError` when the invocation cannot be replayed exactly.
    """
    path = _command_path(ctx)
    _refuse_group_values(ctx)
    if ctx.args:
        _refuse(ctx, f"extra arguments {ctx.args!r} cannot be recorded")
    command: str | list[str] = path[0] if len(path) == 1 else path
    payload: dict[str, Any] = {
        "command": command,
        "args": _record_arguments(ctx),
        "kwargs": _record_options(ctx),
        "cwd": _cwd(ctx),
    }
    try:
        validate_payload(payload)
    except InvalidJobError as exc:
        _refuse(ctx, exc.message)
    return " ".join(path), payload


def _command_path(ctx: click.Context) -> list[str]:
    names: list[str] = []
    current = ctx
    while current.parent is not None:
        names.append(current.info_name or current.command.name or "")
        current = current.parent
    if not names:
        _refuse(
            ctx,
            "it is not a subcommand of a click group "
            "(the replay runs the program followed by the command's name)",
        )
    names.reverse()
    return names


def _refuse_group_values(ctx: click.Context) -> None:
    """Values the caller gave to an enclosing group cannot be replayed: the replay puts every
    option after the whole command path, where the group would not read them."""
    parent = ctx.parent
    while parent is not None:
        for param in parent.command.params:
            if param.name and parent.get_parameter_source(param.name) in _RECORDED_SOURCES:
                _refuse(
                    ctx,
                    f"{_label(param)} belongs to '{parent.command_path}', before the command; "
                    "only the command's own options are replayed (drop it, or set it through "
                    "the environment or configuration)",
                )
        parent = parent.parent


def _record_arguments(ctx: click.Context) -> list[str]:
    args: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Argument) or not _given(ctx, param):
            continue
        value = _value(ctx, param)
        if value is None:
            continue
        items = value if param.nargs == -1 else (value,)
        for item in items:
            scalar = _scalar(ctx, param, item)
            if scalar is not None:
                args.append(_as_arg(scalar))
    return args


def _record_options(ctx: click.Context) -> dict[str, Any]:
    # Several options may share one name (feature switches: --upper/--lower -> "transform").
    by_name: dict[str, list[click.Parameter]] = {}
    for param in ctx.command.params:
        if isinstance(param, click.Argument) or not param.name or param.name == ASYNC_PARAM:
            continue
        by_name.setdefault(param.name, []).append(param)
    kwargs: dict[str, Any] = {}
    for params in by_name.values():
        if not _given(ctx, params[0]):
            continue
        value = _value(ctx, params[0])
        param = _option_that_set(params, value)
        if not isinstance(param, click.Option):
            _refuse(ctx, f"{_label(param)} is not a click option or argument")
        key, entry = _record_option(ctx, param, value)
        if entry is not None:
            kwargs[key] = entry
    return kwargs


def _given(ctx: click.Context, param: click.Parameter) -> bool:
    """The caller gave this parameter a value (checked only for parameters that need it)."""
    assert param.name is not None
    source = ctx.get_parameter_source(param.name)
    if source not in _RECORDED_SOURCES:
        return False
    if isinstance(param.type, click.File):
        _refuse(ctx, f"{_label(param)} opens a file, and files cannot be recorded")
    if param.nargs > 1 or isinstance(param.type, click.Tuple):
        _refuse(ctx, f"{_label(param)} takes several values at once (nargs > 1)")
    if source is ParameterSource.PROMPT and getattr(param, "hide_input", False):
        _refuse(ctx, f"the hidden answer to the prompt of {_label(param)} is not written down")
    return True


def _value(ctx: click.Context, param: click.Parameter) -> Any:
    assert param.name is not None
    if param.name not in ctx.params:
        _refuse(ctx, f"the value of {_label(param)} is not passed to the command")
    return ctx.params[param.name]


def _option_that_set(params: list[click.Parameter], value: Any) -> click.Parameter:
    if len(params) > 1:
        for param in params:
            if isinstance(param, click.Option) and param.is_flag and _activation(param) == value:
                return param
    return params[0]


def _activation(option: click.Option) -> Any:
    """The value a flag gives when used (``flag_activation_value`` from click 8.3)."""
    return getattr(option, "flag_activation_value", option.flag_value)


def _record_option(ctx: click.Context, option: click.Option, value: Any) -> tuple[str, Any]:
    if option.count:
        return _long_name(ctx, option, option.opts), [True] * int(value) if value else None
    if option.is_flag:
        return _record_flag(ctx, option, value)
    key = _long_name(ctx, option, option.opts)
    items = list(value) if option.multiple else [value]
    recorded = [_scalar(ctx, option, item) for item in items]
    if getattr(option, "_flag_needs_value", False):
        # An option whose value may be omitted does not read a value that looks like an option.
        for item in recorded:
            if isinstance(item, str) and len(item) > 1 and item[0] in "-+/":
                _refuse(ctx, f"the value {item!r} of {_label(option)} would be read as an option")
    if option.multiple:
        return key, recorded or None
    return key, recorded[0]


def _record_flag(ctx: click.Context, option: click.Option, value: Any) -> tuple[str, Any]:
    if option.is_bool_flag and option.secondary_opts:
        if option.multiple:
            _refuse(ctx, f"{_label(option)} is an on/off pair that may be repeated")
        opts = option.opts if value else option.secondary_opts
        return _long_name(ctx, option, opts), True
    key = _long_name(ctx, option, option.opts)
    if option.multiple:
        items = list(value)
        if any(item != _activation(option) for item in items):
            _refuse(ctx, f"the values of {_label(option)} cannot be replayed as a repeated flag")
        return key, [True] * len(items) or None
    if value == _activation(option):
        return key, True
    if value == option.get_default(ctx):
        return key, None  # a prompt answered with the default: the replay gets it anyway
    _refuse(ctx, f"the value {value!r} of the flag {_label(option)} cannot be replayed")


def _long_name(ctx: click.Context, option: click.Option, opts: list[str]) -> str:
    """The first long name of ``opts`` (without dashes) that the replay can spell."""
    longs = [opt for opt in opts if opt.startswith("--")]
    for opt in longs:
        if _SPELLABLE.fullmatch(opt[2:]):
            return opt[2:]
    if longs:
        _refuse(
            ctx,
            f"option {longs[0]} cannot be replayed (the replay writes options as "
            "--letters-digits-and-dashes); give it a long name of that form",
        )
    _refuse(ctx, f"option {'/'.join(opts) or _label(option)} has no long name (--name)")


def _scalar(ctx: click.Context, param: click.Parameter, value: Any) -> str | int | float | None:
    """A converted value as JSON that the parameter's type turns back into the same value."""
    if value is None:
        return None
    if isinstance(value, enum.Enum) and isinstance(param.type, click.Choice):
        return value.name  # click matches enum choices by name
    if isinstance(value, bool):
        return "true" if value else "false"  # a value of a non-flag option: spelled out
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            _refuse(ctx, f"the value {value!r} of {_label(param)} is not a JSON number")
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(param.type, click.types.UUIDParameterType):
        value = str(value)
    if not isinstance(value, str):
        _refuse(ctx, f"the value of {_label(param)} ({type(value).__name__}) is not a JSON scalar")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(ctx, f"the value of {_label(param)} is not valid UTF-8 text")
    return value


def _as_arg(value: str | int | float) -> str:
    return value if isinstance(value, str) else repr(value)


def _cwd(ctx: click.Context) -> str:
    try:
        return os.getcwd()
    except OSError as exc:
        _refuse(ctx, f"the current directory cannot be recorded ({exc.strerror})")


def _label(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"argument {param.human_readable_name}"
    if param.opts:
        return f"option {param.opts[0]}"
    return f"parameter {param.name}"


def _refuse(ctx: click.Context, reason: str) -> NoReturn:
    raise AsyncRefusedError(
        _one_line(f"--async cannot record '{ctx.command_path}': {reason}; nothing was queued")
    )


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
