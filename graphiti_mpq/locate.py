"""Where a queue is and how long things last: the light settings the enqueue path needs.

Stdlib only (``os``, ``re``): hooks pay for every import. ``config`` re-exports these.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .errors import ConfigError

_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([smhd]?)")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int, name: str = "duration") -> float:
    """Seconds from ``0.1``, ``30s``, ``15m``, ``2h`` or ``7d``; anything else is a usage error."""
    if isinstance(text, bool):
        raise ConfigError(f"{name}: expected a duration like 30s, 15m, 2h or 7d, got {text!r}")
    if isinstance(text, int | float):
        if text < 0 or text != text:
            raise ConfigError(f"{name}: must be a non-negative number of seconds, got {text!r}")
        return float(text)
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not text.strip():
        raise ConfigError(f"{name}: expected a duration like 30s, 15m, 2h or 7d, got {text!r}")
    number = text.strip()[: len(text.strip()) - len(match.group(1))]
    return float(number) * _UNIT[match.group(1)]


def default_queue_location(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "graphiti_mpq", "queue.db")


def queue_location(option: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The queue location: ``--db``, else ``GRAPHITI_QUEUE_PATH``, else the XDG state default."""
    env = os.environ if env is None else env
    value = option or env.get("GRAPHITI_QUEUE_PATH") or default_queue_location(env)
    if is_postgres_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))
