"""``graphiti_mpq enqueue`` without click or structlog: the console entry tries this first.

It understands the common, well-formed spellings of the ``enqueue`` command and records the
job through the light path (``quick``). Anything else (help, a usage error, an invalid job, an
unusual spelling, ``-v``) returns None and the click CLI handles the whole command, so errors
and their exit codes come from one place. ``tests/test_fastpath.py`` runs each case both ways
and compares the output, the stored rows and the exit status.
"""

from __future__ import annotations

import json
import os
import sys

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


_GLOBAL_VALUE = {"--db", "--log-format"}
_LOG_FORMATS = {"auto", "console", "json"}
_VALUE_OPTIONS = {
    "--type",
    "--payload",
    "--priority",
    "--delay",
    "--dedupe-key",
    "--max-retries",
    "--timeout",
    "--kw",
    "--flag",
    "--cwd",
}
_ENQUEUE_NAMES = _VALUE_OPTIONS | {"--parallel", "--help", "-h"}


class _Fallback(Exception):
    """Not a case for the fast path: let click handle the command."""


def _split_globals(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--db value, the arguments after ``enqueue``); raise _Fallback for anything else."""
    db = None
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "enqueue":
            return db, argv[index + 1 :]
        name, eq, value = arg.partition("=")
        if name in _GLOBAL_VALUE:
            if not eq:
                index += 1
                if index >= len(argv):
                    raise _Fallback
                value = argv[index]
            if name == "--db":
                db = value
            elif value not in _LOG_FORMATS:
                raise _Fallback
            index += 1
            continue
        if arg == "-q":
            index += 1
            continue
        raise _Fallback  # -v (debug logs), --help, another command, ...
    raise _Fallback


def _parse_enqueue(args: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {"kw": [], "flag": [], "parallel": False}
    index = 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        if arg == "--parallel":
            options["parallel"] = True
            index += 1
            continue
        name, eq, value = arg.partition("=")
        if name not in _VALUE_OPTIONS:
            raise _Fallback
        if not eq:
            index += 1
            if index >= len(args):
                raise _Fallback
            value = args[index]
        key = name[2:].replace("-", "_")
        if key in ("kw", "flag"):
            options[key].append(value)
        elif key in options:
            options[key] = value  # click keeps the last of a repeated option
        else:
            options[key] = value
        index += 1
    rest = args[index:]
    options["command"] = rest[0] if rest else None
    extra = rest[1:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    elif any(arg.split("=", 1)[0] in _ENQUEUE_NAMES for arg in extra):
        raise _Fallback  # click refuses an option of enqueue written after COMMAND
    options["args"] = extra
    return options


def _int(text: str, minimum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _Fallback from None
    if minimum is not None and value < minimum:
        raise _Fallback
    return value


def cli_kwargs(kw: Iterable[str], flags: Iterable[str]) -> dict[str, Any]:
    """``--kw KEY=VALUE`` (strings) and ``--flag KEY`` (True); a repeated key makes a list.

    Shared with the click command, so both paths build the same kwargs; raises ValueError
    for a ``--kw`` without ``=``.
    """
    items: list[tuple[str, Any]] = []
    for text in kw:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {text!r}")
        items.append((key, value))
    items.extend((key, True) for key in flags)
    result: dict[str, Any] = {}
    for key, value in items:
        if key in result:
            previous = result[key]
            result[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            result[key] = value
    return result


def _job(options: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(job type, payload, enqueue options) exactly as the click command builds them."""
    from .locate import parse_duration

    try:
        kwargs = cli_kwargs(options["kw"], options["flag"])
    except ValueError:
        raise _Fallback from None
    command = options["command"]
    if "payload" in options:
        if command is not None or kwargs or "cwd" in options or "type" not in options:
            raise _Fallback
        try:
            payload = json.loads(options["payload"])
        except ValueError:
            raise _Fallback from None
        job_type = options["type"]
    else:
        if command is None:
            raise _Fallback
        payload = {
            "command": command.split(" ") if " " in command else command,
            "args": list(options["args"]),
            "kwargs": kwargs,
        }
        if "cwd" in options:
            payload["cwd"] = os.path.abspath(options["cwd"])
        job_type = options.get("type", command)
    extra: dict[str, Any] = {"priority": _int(options.get("priority", "0"))}
    try:
        extra["delay"] = parse_duration(options["delay"]) if "delay" in options else 0
        if "timeout" in options:
            extra["timeout"] = parse_duration(options["timeout"])
    except ValueError:
        raise _Fallback from None
    extra["dedupe_key"] = options.get("dedupe_key")
    if "max_retries" in options:
        extra["max_retries"] = _int(options["max_retries"], minimum=0)
    return job_type, payload, extra


def try_enqueue(argv: list[str]) -> int | None:
    """Run ``enqueue`` here and return the exit status, or None to let click do it all."""
    try:
        db, args = _split_globals(argv)
        options = _parse_enqueue(args)
        job_type, payload, extra = _job(options)
        from .errors import QueueError
        from .locate import is_postgres_url, queue_location
        from .quick import enqueue_one

        location = queue_location(db)
        if is_postgres_url(location):
            raise _Fallback
        try:
            job_id = enqueue_one(job_type, payload, options["parallel"], location, **extra)
        except QueueError:
            raise _Fallback from None  # click reports it, in its words, with its exit code
    except _Fallback:
        return None
    sys.stdout.write(job_id + "\n")
    sys.stdout.flush()
    return 0
