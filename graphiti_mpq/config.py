"""Settings: command-line option > environment variable > default.

The light pieces the enqueue path needs (location, durations) live in ``locate``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConfigError
from .locate import (
    default_queue_location,
    is_postgres_url,
    parse_duration,
    queue_location,
)

START_METHODS = ("fork", "forkserver", "spawn")

__all__ = [
    "START_METHODS",
    "Settings",
    "default_queue_location",
    "is_postgres_url",
    "load_settings",
    "parse_count",
    "parse_duration",
    "queue_location",
]


def parse_count(text: str | int, name: str, minimum: int = 0) -> int:
    """A whole number of at least ``minimum``; anything else is a usage error."""
    if isinstance(text, bool):
        raise ConfigError(f"{name}: expected a whole number, got {text!r}")
    try:
        value = int(text) if isinstance(text, int) else int(text.strip(), 10)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    return value


def sibling(location: str, suffix: str) -> Path:
    """A file that belongs to a SQLite queue: it sits beside the database (``queue.db.lock``)."""
    return Path(location + suffix)


@dataclass(frozen=True)
class Settings:
    """What a serving process needs; built once from options and the environment."""

    location: str
    program: str = "graphiti"
    max_retries: int = 3
    backoff_base: float = 10.0
    capacity: int = 100
    workers: int = 4
    job_timeout: float = 600.0
    imports: tuple[str, ...] = ()
    grace: float = 30.0
    lease: float = 60.0
    host_id: str = field(default_factory=socket.gethostname)
    start_method: str = "forkserver"
    enqueue_wait: float = 0.05

    def with_options(self, **options: object) -> Settings:
        """These settings with the options a command was given (None means not given)."""
        given = {k: v for k, v in options.items() if v is not None and v != ()}
        return replace(self, **given) if given else self  # type: ignore[arg-type]


_ENV: dict[str, tuple[str, str]] = {
    # field: (environment variable, kind)
    "program": ("GRAPHITI_BIN", "str"),
    "max_retries": ("GRAPHITI_QUEUE_MAX_RETRIES", "count"),
    "backoff_base": ("GRAPHITI_QUEUE_BACKOFF_BASE", "duration"),
    "capacity": ("GRAPHITI_QUEUE_CAPACITY", "positive"),
    "workers": ("GRAPHITI_QUEUE_WORKERS", "positive"),
    "job_timeout": ("GRAPHITI_QUEUE_JOB_TIMEOUT", "duration"),
    "imports": ("GRAPHITI_QUEUE_IMPORTS", "list"),
    "grace": ("GRAPHITI_QUEUE_GRACE", "duration"),
    "lease": ("GRAPHITI_QUEUE_LEASE", "duration"),
    "host_id": ("GRAPHITI_QUEUE_HOST_ID", "str"),
    "start_method": ("GRAPHITI_QUEUE_START_METHOD", "method"),
    "enqueue_wait": ("GRAPHITI_QUEUE_ENQUEUE_WAIT", "duration"),
}


def _convert(kind: str, raw: str, name: str) -> object:
    if kind == "count":
        return parse_count(raw, name)
    if kind == "positive":
        return parse_count(raw, name, minimum=1)
    if kind == "duration":
        return parse_duration(raw, name)
    if kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "method":
        if raw not in START_METHODS:
            raise ConfigError(f"{name}: expected one of {', '.join(START_METHODS)}, got {raw!r}")
        return raw
    if not raw.strip():
        raise ConfigError(f"{name}: must not be empty")
    return raw


def load_settings(
    location: str | None = None, env: Mapping[str, str] | None = None, **options: object
) -> Settings:
    """Settings from options (None = not given), then the environment, then defaults."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, (var, kind) in _ENV.items():
        raw = env.get(var)
        if raw is not None and raw != "":
            values[name] = _convert(kind, raw, var)
    settings = Settings(location=queue_location(location, env), **values)  # type: ignore[arg-type]
    return settings.with_options(**options)
