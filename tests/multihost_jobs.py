"""Handlers for the multi-host tests, imported by the supervisors with ``--import``.

``span`` records when it ran (one JSON line appended to payload["log"], written in one
``write``) so the test can check from outside that the barrier held across every host.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import graphiti_mpq


@graphiti_mpq.handler("span")
def span(payload: dict[str, Any]) -> Any:
    start = time.time()
    seconds = float(payload.get("seconds", 0.0))
    if seconds:
        time.sleep(seconds)
    end = time.time()
    line = json.dumps({"name": payload["name"], "start": start, "end": end, "pid": os.getpid()})
    fd = os.open(payload["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return payload["name"]


@graphiti_mpq.handler("hang_once")
def hang_once(payload: dict[str, Any]) -> Any:
    """The first attempt (any host) records its pid and hangs; later attempts return."""
    try:
        fd = os.open(payload["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return "again"
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(float(payload.get("seconds", 60.0)))
    return "first"
