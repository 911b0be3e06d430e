"""Where the time of a drain goes: py-spy samples of the supervisor and its pool children.

``scripts/bench.py --profile N`` drains N no-op Python-handler jobs (2 workers) under
``py-spy record --subprocesses`` and summarises the samples by process role: the serving
process, its pool children, the fork server. Only samples of running (not idle) threads are
counted, so a role's share is CPU time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import PY, child_env, drain_window, graphiti_cmd, log_events, run_task

_HEAD = re.compile(r'process (\d+):"(.*?)"(?:;|$)')
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str, keep_line: bool = False) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    line = f":{match['line']}" if keep_line and match["line"] else ""
    return f"{match['func']} ({path}{line})"


def _parse(raw: Path, root: int) -> dict[str, dict[str, Any]]:
    """Per role: total samples, self samples per frame, inclusive samples per function."""
    roles: dict[str, dict[str, Any]] = {}
    for text in raw.read_text().splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        # py-spy prefixes the chain of processes, root first: process PID:"CMDLINE";... (a
        # command line may hold ';', the fork server's does); the last one was sampled.
        pid, cmdline, rest = 0, "", stack
        while (match := _HEAD.match(rest)) is not None:
            pid, cmdline, rest = int(match[1]), match[2], rest[match.end() :]
        if not pid:
            continue
        frames = [f for f in rest.split(";") if f]
        if pid == root:
            role = "serving process (supervise/drain)"
        elif "resource_tracker" in cmdline:
            role = "resource tracker"
        elif "forkserver" in cmdline and not any("_serve_one" in f for f in frames):
            role = "fork server"
        else:
            role = "pool children"
        data = roles.setdefault(role, {"total": 0, "self": Counter(), "incl": Counter()})
        data["total"] += count
        if frames:
            data["self"][_short(frames[-1], keep_line=True)] += count
            for name in {_short(f) for f in frames}:
                data["incl"][name] += count
    return roles


def run_profile(
    jobs: int, workers: int = 2, rate: int = 250, gil: bool = False, replay: bool = False
) -> str:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="graphiti-mpq-profile-") as tmp:
        db = str(Path(tmp) / "queue.db")
        if replay:
            from bench.tasks import replay_jobs
            from graphiti_mpq import JobQueue

            JobQueue(db).enqueue_many(replay_jobs(jobs))
            serving = ("--program", "/bin/true")
        else:
            run_task("build_db", db=db, pending=jobs)
            serving = ("--import", "bench.jobs")
        raw = Path(tmp) / "samples.txt"
        log = Path(tmp) / "drain.log"
        with log.open("wb") as err:
            launched = time.time()
            proc = subprocess.Popen(
                [
                    spy,
                    *("record", "--subprocesses", "--format", "raw", "-r", str(rate)),
                    *(["--gil"] if gil else []),
                    *("-o", str(raw), "--"),
                    *graphiti_cmd("--log-format", "json", "--db", db, "drain"),
                    *("--workers", str(workers), *serving, "--json"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env(),
            )
            proc.wait()
        events = log_events(log)
        first, last, done = drain_window(events)
        root = next(e["pid"] for e in events if e.get("event") == "supervisor_started")
        roles = _parse(raw, root)
    lines = [
        f"drain of {done} {'replay (/bin/true)' if replay else 'no-op'} jobs, {workers} workers:"
        f" {done / (last - first):,.0f} jobs/s "
        f"(first claim -> last outcome {last - first:.2f}s, start-up {first - launched:.2f}s;"
        f" under py-spy at {rate} Hz)",
        "samples by process role (1 sample = 1/rate s of a "
        + ("thread holding the GIL):" if gil else "thread py-spy saw running):"),
    ]
    for role, data in sorted(roles.items(), key=lambda kv: -kv[1]["total"]):
        lines.append(f"  {role}: {data['total']} samples ({data['total'] / rate:.2f} CPU s)")
    for role, data in sorted(roles.items(), key=lambda kv: -kv[1]["total"]):
        if data["total"] < 5:
            continue
        lines.append(f"\n== {role}: inclusive (function, share of this role's samples)")
        for name, count in data["incl"].most_common(30):
            lines.append(f"  {100 * count / data['total']:5.1f}%  {name}")
        own = [(n, c) for n, c in data["incl"].most_common() if "(graphiti_mpq/" in n]
        lines.append(f"== {role}: inclusive, graphiti_mpq's own functions")
        for name, count in own[:25]:
            lines.append(f"  {100 * count / data['total']:5.1f}%  {name}")
        lines.append(f"== {role}: self (innermost frame)")
        for name, count in data["self"].most_common(15):
            lines.append(f"  {100 * count / data['total']:5.1f}%  {name}")
    return "\n".join(lines)


def run_loop_profile(jobs: int, workers: int = 2, top: int = 30) -> str:
    """cProfile of the serving loop alone: a drain run inside this process (main thread only;
    the pool's helper threads and the children are not in it)."""
    import cProfile
    import io
    import pstats

    from graphiti_mpq.config import load_settings
    from graphiti_mpq.logs import configure_logging
    from graphiti_mpq.storage import open_queue
    from graphiti_mpq.supervisor import Supervisor

    with tempfile.TemporaryDirectory(prefix="graphiti-mpq-profile-") as tmp:
        db = str(Path(tmp) / "queue.db")
        run_task("build_db", db=db, pending=jobs)
        with (Path(tmp) / "drain.log").open("w") as log:
            configure_logging("json", "info", stream=log)
            settings = load_settings(db, workers=workers, imports=("bench.jobs",))
            queue = open_queue(db, settings.capacity)
            supervisor = Supervisor(queue, settings, kind="drain", mode="drain")
            profiler = cProfile.Profile()
            began = time.perf_counter()
            profiler.enable()
            summary = supervisor.run()
            profiler.disable()
            seconds = time.perf_counter() - began
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    if os.environ.get("BENCH_PROFILE_DUMP"):
        stats.dump_stats(os.environ["BENCH_PROFILE_DUMP"])  # for pstats callers and callees
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    head = (
        f"in-process drain of {summary.succeeded} jobs, {workers} workers: {seconds:.2f}s"
        f" ({summary.succeeded / seconds:,.0f} jobs/s including start-up, under cProfile)\n"
    )
    return head + out.getvalue()
