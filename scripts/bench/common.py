"""Shared helpers: paths, subprocess environments, /proc readings, log parsing, waiting."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process the bench starts: no GRAPHITI_* setting leaks in, and
    ``bench`` (the handlers module) is importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHITI_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SCRIPTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def graphiti_cmd(*args: str) -> list[str]:
    """``graphiti_mpq ARGS`` through the console script of this environment when installed."""
    script = Path(PY).parent / "graphiti_mpq"
    if script.exists():
        return [str(script), *args]
    return [PY, "-m", "graphiti_mpq", *args]


def run_task(name: str, timeout: float = 900.0, **params: Any) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (``python -m bench.tasks NAME PARAMS``)."""
    proc = subprocess.run(
        [PY, "-m", "bench.tasks", name, json.dumps(params)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench task {name} {params} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- /proc ----------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def parent_map() -> dict[int, int]:
    """pid -> ppid of every process."""
    result = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None:
                result[int(name)] = int(fields[1])
    return result


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    parents = parent_map()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == current]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """utime + stime of each live process, in seconds."""
    result = {}
    for pid in pids:
        fields = proc_stat(pid)
        if fields is not None:
            result[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return result


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- logs -----------------------------------------------------------------------------------


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a graphiti_mpq process (other lines are skipped)."""
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def drain_window(events: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(first jobs_claimed, last job_completed, jobs completed) from a serving process's log."""
    starts = [event_time(e) for e in events if e.get("event") == "jobs_claimed"]
    ends = [event_time(e) for e in events if e.get("event") == "job_completed"]
    if not starts or not ends:
        raise RuntimeError("the log has no jobs_claimed/job_completed events")
    return min(starts), max(ends), len(ends)


# -- statistics -----------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
