"""Validation of jobs at enqueue: the one place that decides what may enter the queue.

Stdlib only: the enqueue fast path and the storage layer both call it. Every refusal is an
:class:`InvalidJobError` naming the field; nothing is written for a refused job.
"""

from __future__ import annotations

import json
import math
import re

from .errors import InvalidJobError

# typing costs milliseconds at import and hooks pay for each: names for the checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_COMMAND_PARTS = 8
_COMMAND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_KWARG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SCALARS = (str, int, float, bool, type(None))


def compact_json(value: Any) -> str:
    """The stored (and size-checked) form of a payload."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def validate_payload(payload: Any) -> str:
    """Check a payload and return its compact JSON, or raise naming the offending field."""
    if not isinstance(payload, dict):
        raise InvalidJobError("payload", f"must be a JSON object, got {type(payload).__name__}")
    if "command" in payload:
        _validate_replay(payload)
    try:
        text = compact_json(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError("payload", f"not JSON-serialisable ({exc})") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate (a non-UTF-8 argv byte, say) cannot be stored as UTF-8.
        raise InvalidJobError("payload", "contains text that is not valid Unicode") from None
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidJobError("payload", f"{size} bytes as compact JSON; the limit is 1 MiB")
    return text


def _validate_replay(payload: Mapping[str, Any]) -> None:
    command = payload["command"]
    if isinstance(command, str):
        _check_command_part(command, "payload.command")
    elif isinstance(command, list):
        if not 1 <= len(command) <= MAX_COMMAND_PARTS:
            raise InvalidJobError("payload.command", "a list must hold 1 to 8 command names")
        for index, part in enumerate(command):
            _check_command_part(part, f"payload.command[{index}]")
    else:
        raise InvalidJobError("payload.command", "must be a string or a list of strings")
    args = payload.get("args", [])
    if not isinstance(args, list):
        raise InvalidJobError("payload.args", "must be a list of strings")
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            raise InvalidJobError(f"payload.args[{index}]", "must be a string")
        _check_unicode(arg, f"payload.args[{index}]")
    kwargs = payload.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise InvalidJobError("payload.kwargs", "must be an object")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _KWARG_KEY.fullmatch(key):
            raise InvalidJobError(
                f"payload.kwargs[{key!r}]", "key must match ^[A-Za-z][A-Za-z0-9_-]*$"
            )
        _check_kwarg_value(value, f"payload.kwargs.{key}")
    if "cwd" in payload:
        cwd = payload["cwd"]
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise InvalidJobError("payload.cwd", "must be an absolute path")


def _check_command_part(part: Any, field: str) -> None:
    if not isinstance(part, str) or not _COMMAND.fullmatch(part):
        raise InvalidJobError(field, f"must match ^[A-Za-z0-9][A-Za-z0-9_.:-]*$, got {part!r}")


def _check_kwarg_value(value: Any, field: str) -> None:
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, _SCALARS):
                raise InvalidJobError(
                    f"{field}[{index}]", "must be a str, int, float, bool or null"
                )
            _check_finite(item, f"{field}[{index}]")
    elif not isinstance(value, _SCALARS):
        raise InvalidJobError(field, "must be a str, int, float, bool, null or a list of those")
    else:
        _check_finite(value, field)


def _check_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJobError(field, "contains text that is not valid Unicode") from None


def _check_finite(value: Any, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidJobError(field, "must be a finite number")


def validate_job_type(job_type: Any) -> str:
    if not isinstance(job_type, str) or not job_type.strip():
        raise InvalidJobError("job_type", "must be a non-empty string")
    if len(job_type) > 200:
        raise InvalidJobError("job_type", "must be at most 200 characters")
    _check_unicode(job_type, "job_type")
    return job_type


def validate_int(value: Any, field: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidJobError(field, f"must be at least {minimum}, got {value}")
    if abs(value) > 2**62:
        raise InvalidJobError(field, "is out of range")
    return value


def validate_seconds(value: Any, field: str, positive: bool = False) -> float:
    """A number of seconds, or a duration string like ``30s``."""
    if isinstance(value, str):
        from .errors import ConfigError
        from .locate import parse_duration

        try:
            value = parse_duration(value, field)
        except ConfigError as exc:
            raise InvalidJobError(field, str(exc).split(": ", 1)[-1]) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidJobError(field, f"must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise InvalidJobError(field, f"must be {'positive' if positive else 'non-negative'}")
    return float(value)


def validate_dedupe_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidJobError("dedupe_key", "must be a non-empty string")
    _check_unicode(value, "dedupe_key")
    return value
