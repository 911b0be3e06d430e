"""The benchmark command: every metric of issue 5, several runs each, peers interleaved.

Each run of a metric measures every contender once, in a rotating order, so graphiti_mpq and
its peers share the machine's state of the moment; the table gives medians, min and max over
the runs and the ratio of graphiti_mpq (the subject) to each row.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bench.common import PY, REPO, child_env, graphiti_cmd, run_task, summary

Sample = dict[str, float]
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Contender:
    label: str
    run: Callable[[Path, int], Sample]


@dataclass
class Measure:
    key: str
    unit: str
    higher_is_better: bool


@dataclass
class Target:
    text: str
    value: Callable[[Callable[[str, str], float]], float]
    ok: Callable[[float], bool]


@dataclass
class Metric:
    key: str
    title: str
    measures: list[Measure]
    contenders: list[Contender]
    runs: int
    subject: str = "graphiti_mpq"
    targets: list[Target] = field(default_factory=list)
    note: str = ""
    requires: Callable[[], str | None] | None = None  # None when runnable, else why not
    skipped: str | None = None
    results: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # runs that failed, why (not in results)

    def median(self, contender: str, measure: str) -> float:
        return summary(self.results[(contender, measure)])["median"]


@dataclass
class Config:
    quick: bool
    workdir: Path
    runs: int | None
    big: int  # jobs in the big table (claim cost, status)
    n_one: int
    n_many: int
    n_drain: int
    n_replay: int
    pickup_samples: int
    idle_seconds: float
    rss_big: int
    pg_url: str


def make_config(quick: bool, workdir: Path, runs: int | None, pg_url: str) -> Config:
    if quick:
        return Config(
            quick, workdir, runs, 200_000, 1_000, 20_000, 2_000, 300, 30, 5.0, 10_000, pg_url
        )
    return Config(
        quick, workdir, runs, 1_000_000, 5_000, 100_000, 10_000, 1_000, 100, 30.0, 100_000, pg_url
    )


def _db(cfg: Config, metric: str, label: str, run: int) -> str:
    folder = cfg.workdir / f"{metric}-{label.replace(' ', '_').replace('/', '_')}-{run}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return str(folder / "queue.db")


def _task_contender(cfg: Config, metric: str, label: str, task: str, **params: Any) -> Contender:
    def run(workdir: Path, index: int) -> Sample:
        db = _db(cfg, metric, label, index)
        try:
            return run_task(task, db=db, **params)
        finally:
            shutil.rmtree(Path(db).parent, ignore_errors=True)

    return Contender(label, run)


def _process_contender(label: str, argv: Callable[[str], list[str]], cfg: Config) -> Contender:
    """Wall time of a whole process (fresh interpreter), its queue already created."""
    folder = cfg.workdir / f"process-{label.split()[0]}"
    folder.mkdir(parents=True, exist_ok=True)
    db = str(folder / "queue.db")
    env = child_env()

    def once() -> float:
        began = time.perf_counter()
        subprocess.run(argv(db), env=env, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - began

    warmed = []

    def run(workdir: Path, index: int) -> Sample:
        if not warmed:
            once()  # creates the queue; warms the page cache
            warmed.append(True)
        return {"wall_ms": once() * 1000}

    return Contender(label, run)


# -- PostgreSQL -------------------------------------------------------------------------------

_pg_state: dict[str, str | None] = {}


def pg_unavailable(url: str) -> str | None:
    """None when the PostgreSQL server answers (its version is kept for the report), else why
    the PostgreSQL metrics are skipped."""
    if url not in _pg_state:
        try:
            import psycopg
        except ImportError:
            _pg_state[url] = "psycopg is not installed in this environment (pip install psycopg)"
            return _pg_state[url]
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            _pg_state[url] = None
            _pg_state["version"] = str(row[0]) if row else "?"
        except Exception as exc:  # any failure means: no server to measure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = urlsplit(url)
            _pg_state[url] = (
                f"PostgreSQL at {where.hostname}:{where.port or 5432}{where.path} is "
                f"unreachable ({first}); --pg URL or BENCH_PG_URL names another server"
            )
    return _pg_state[url]


def _pg_schema_url(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


def _pg_drop(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _pg_contender(cfg: Config, metric: str, label: str, task: str, **params: Any) -> Contender:
    """A task on a fresh schema of the PostgreSQL database, dropped afterwards."""

    def run(workdir: Path, index: int) -> Sample:
        schema = f"bench_{metric}_{label.split()[0]}_{index}_{os.getpid()}"
        logdir = cfg.workdir / schema
        logdir.mkdir(parents=True, exist_ok=True)
        _pg_drop(cfg.pg_url, schema)
        try:
            url = _pg_schema_url(cfg.pg_url, schema)
            extra = {"logdir": str(logdir)} if task == "pg_drain" else {}
            return run_task(task, url=url, **params, **extra)
        finally:
            _pg_drop(cfg.pg_url, schema)
            shutil.rmtree(logdir, ignore_errors=True)

    return Contender(label, run)


HUEY_ENQUEUE = """\
import sys
from huey import SqliteHuey
huey = SqliteHuey(filename=sys.argv[1])
@huey.task()
def add(content): pass
add("We chose SQLite")
"""


def metrics(cfg: Config) -> list[Metric]:
    q = cfg.quick
    rate = [Measure("rate", "jobs/s", True)]
    drain_measures = [Measure("rate", "jobs/s", True), Measure("startup", "s", False)]
    big = f"{cfg.big:,} pending"
    return [
        Metric(
            "enqueue_one",
            f"enqueue, one job per call ({cfg.n_one:,} calls), each its own durable commit",
            rate,
            [
                _task_contender(cfg, "one", label, "enqueue_one", impl=impl, n=cfg.n_one)
                for label, impl in [
                    ("graphiti_mpq", "graphiti_mpq"),
                    ("graphiti_mpq synchronous=FULL", "graphiti_mpq-full"),
                    ("litequeue", "litequeue"),
                    ("huey", "huey"),
                ]
            ],
            3 if q else 5,
            targets=[
                Target(">= 20,000 jobs/s", lambda m: m("graphiti_mpq", "rate"), lambda v: v >= 2e4),
                Target(
                    ">= 2x litequeue",
                    lambda m: m("graphiti_mpq", "rate") / m("litequeue", "rate"),
                    lambda v: v >= 2,
                ),
            ],
        ),
        Metric(
            "enqueue_many",
            f"enqueue, batch API: {cfg.n_many:,} jobs in one call",
            rate,
            [
                _task_contender(cfg, "many", label, "enqueue_many", impl=label, n=cfg.n_many)
                for label in ("graphiti_mpq", "executemany")
            ],
            3 if q else 5,
            targets=[
                Target(
                    ">= 200,000 jobs/s", lambda m: m("graphiti_mpq", "rate"), lambda v: v >= 2e5
                ),
                Target(
                    ">= 0.5x executemany",
                    lambda m: m("graphiti_mpq", "rate") / m("executemany", "rate"),
                    lambda v: v >= 0.5,
                ),
            ],
            note="executemany: the same prepared rows, same table and indexes, one transaction",
        ),
        Metric(
            "enqueue_process",
            "whole process: enqueue one job from a shell (existing queue)",
            [Measure("wall_ms", "ms", False)],
            [
                _process_contender(
                    "graphiti_mpq",
                    lambda db: graphiti_cmd("--db", db, "enqueue", "add", "We chose SQLite"),
                    cfg,
                ),
                _process_contender(
                    "python -c 'import sqlite3'", lambda db: [PY, "-c", "import sqlite3"], cfg
                ),
                _process_contender(
                    "litequeue",
                    lambda db: [
                        PY,
                        "-c",
                        "import sys, litequeue; "
                        'litequeue.LiteQueue(sys.argv[1]).put(\'{"command": "add"}\')',
                        db,
                    ],
                    cfg,
                ),
                _process_contender("huey", lambda db: [PY, "-c", HUEY_ENQUEUE, db], cfg),
            ],
            8 if q else 20,
            targets=[
                Target(
                    "<= 1.5x python -c 'import sqlite3'",
                    lambda m: (
                        m("graphiti_mpq", "wall_ms") / m("python -c 'import sqlite3'", "wall_ms")
                    ),
                    lambda v: v <= 1.5,
                )
            ],
        ),
        Metric(
            "drain_noop",
            f"drain of {cfg.n_drain:,} no-op Python-handler jobs, 2 workers "
            "(first claim -> last outcome; start-up apart)",
            drain_measures,
            [
                _task_contender(
                    cfg, "drain", label, "drain_noop", impl=label, n=cfg.n_drain, workers=2
                )
                for label in ("graphiti_mpq", "huey", "litequeue")
            ],
            2 if q else 3,
            targets=[
                Target(">= 20,000 jobs/s", lambda m: m("graphiti_mpq", "rate"), lambda v: v >= 2e4),
                Target(
                    ">= 10x huey",
                    lambda m: m("graphiti_mpq", "rate") / m("huey", "rate"),
                    lambda v: v >= 10,
                ),
            ],
            note="huey: SqliteHuey defaults, Consumer(workers=2, worker_type='process'); "
            "litequeue: a hand-written consumer, 2 forked processes (pop, run, done; "
            "a locked database retried)",
        ),
        Metric(
            "drain_replay",
            f"drain of {cfg.n_replay:,} replay jobs running /bin/true, 2-way",
            drain_measures,
            [
                _task_contender(
                    cfg, "replay", label, "drain_replay", impl=label, n=cfg.n_replay, workers=2
                )
                for label in ("graphiti_mpq", "plain-loop", "huey")
            ],
            2 if q else 3,
            targets=[
                Target(
                    ">= 0.8x the plain subprocess.run loop",
                    lambda m: m("graphiti_mpq", "rate") / m("plain-loop", "rate"),
                    lambda v: v >= 0.8,
                )
            ],
            note="plain-loop: 2 forked processes, each subprocess.run(['/bin/true', 'x']) in a "
            "loop; huey: a task calling subprocess.run",
        ),
        Metric(
            "pickup",
            f"pickup latency, idle server: enqueue -> handler start ({cfg.pickup_samples} jobs "
            "a run, 0.2 s idle before each)",
            [Measure("p50", "ms", False), Measure("p95", "ms", False)],
            [
                _task_contender(
                    cfg, "pickup", label, "pickup", impl=label, samples=cfg.pickup_samples, gap=0.2
                )
                for label in ("graphiti_mpq", "huey")
            ],
            1 if q else 3,
            targets=[
                Target("p50 <= 5 ms", lambda m: m("graphiti_mpq", "p50"), lambda v: v <= 5),
                Target("p95 <= 20 ms", lambda m: m("graphiti_mpq", "p95"), lambda v: v <= 20),
            ],
        ),
        Metric(
            "claim",
            f"JobQueue.claim (4 jobs a claim) with {big} vs 1,000 pending",
            [Measure("median_us", "us", False)],
            [
                Contender(big, _claim_big(cfg)),
                _task_contender(cfg, "claim", "1,000 pending", "claim_small", claims=300, batch=4),
            ],
            2 if q else 3,
            subject=big,
            targets=[
                Target(
                    "ratio <= 1.3",
                    lambda m: m(big, "median_us") / m("1,000 pending", "median_us"),
                    lambda v: v <= 1.3,
                )
            ],
        ),
        Metric(
            "status",
            f"`status --json`, whole process, {cfg.big:,} jobs in the table",
            [Measure("wall_ms", "ms", False), Measure("inproc_ms", "ms", False)],
            [
                Contender(f"graphiti_mpq ({big})", _status(cfg, "big")),
                Contender(
                    f"graphiti_mpq ({cfg.big:,} succeeded + 1,000 pending)", _status(cfg, "done")
                ),
                _process_contender(
                    "python -c 'import sqlite3'", lambda db: [PY, "-c", "import sqlite3"], cfg
                ),
            ],
            5 if q else 10,
            subject=f"graphiti_mpq ({big})",
            targets=[
                Target(
                    "<= 200 ms (worst of the two tables)",
                    lambda m: max(
                        m(f"graphiti_mpq ({big})", "wall_ms"),
                        m(f"graphiti_mpq ({cfg.big:,} succeeded + 1,000 pending)", "wall_ms"),
                    ),
                    lambda v: v <= 200,
                )
            ],
        ),
        Metric(
            "idle_cpu",
            f"idle server CPU over {cfg.idle_seconds:g} s (process and all its descendants)",
            [Measure("cpu_pct", "% core", False)],
            [
                _task_contender(
                    cfg, "idle", label, "idle_cpu", impl=label, seconds=cfg.idle_seconds, settle=2.0
                )
                for label in ("graphiti_mpq", "huey")
            ],
            1,
            targets=[
                Target("< 1 % of a core", lambda m: m("graphiti_mpq", "cpu_pct"), lambda v: v < 1)
            ],
        ),
        Metric(
            "rss",
            f"supervisor RSS after {cfg.rss_big:,} jobs vs after 1,000 (same process)",
            [
                Measure("rss_small_mib", "MiB", False),
                Measure("rss_big_mib", "MiB", False),
                Measure("ratio", "x", False),
            ],
            [
                _task_contender(
                    cfg, "rss", "graphiti_mpq", "rss", small=1000, big=cfg.rss_big, chunk=10_000
                )
            ],
            1,
            targets=[Target("<= 1.2x", lambda m: m("graphiti_mpq", "ratio"), lambda v: v <= 1.2)],
        ),
        Metric(
            "pg_drain",
            f"PostgreSQL: drain of {cfg.n_drain:,} no-op jobs by 1, 2 or 3 supervisors "
            "(2 workers each) on one queue (first claim -> last outcome, all logs)",
            [*drain_measures, Measure("busiest_share", "of jobs", False)],
            [
                _pg_contender(
                    cfg, "drain", label, "pg_drain", n=cfg.n_drain, supervisors=k, workers=2
                )
                for k, label in ((1, "1 supervisor"), (2, "2 supervisors"), (3, "3 supervisors"))
            ],
            2 if q else 3,
            subject="1 supervisor",
            note="supervise --workers 2 --host-id hN --import bench.jobs, started together; "
            "one fresh schema a measurement",
            requires=lambda: pg_unavailable(cfg.pg_url),
        ),
        Metric(
            "pg_enqueue",
            f"PostgreSQL: enqueue, one job per call ({cfg.n_one:,} calls), each its own commit",
            rate,
            [_pg_contender(cfg, "one", "graphiti_mpq", "pg_enqueue_one", n=cfg.n_one)],
            3 if q else 5,
            note="graphiti_mpq.enqueue(..., parallel=True, silent=True), GRAPHITI_QUEUE_PATH=URL",
            requires=lambda: pg_unavailable(cfg.pg_url),
        ),
        Metric(
            "pg_enqueue_many",
            f"PostgreSQL: enqueue, batch API: {cfg.n_many:,} jobs in one call",
            rate,
            [_pg_contender(cfg, "many", "graphiti_mpq", "pg_enqueue_many", n=cfg.n_many)],
            3 if q else 5,
            requires=lambda: pg_unavailable(cfg.pg_url),
        ),
    ]


# -- the big tables (built once per bench run) -------------------------------------------------

_built: dict[str, str] = {}


def _big_db(cfg: Config, kind: str) -> str:
    if kind not in _built:
        folder = cfg.workdir / f"big-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        db = str(folder / "queue.db")
        if kind == "big":
            result = run_task("build_db", db=db, pending=cfg.big)
        else:
            result = run_task("build_db", db=db, pending=1000, succeeded=cfg.big)
        print(
            f"  (built {kind} table of {cfg.big:,} jobs in {result['seconds']:.1f}s)",
            file=sys.stderr,
        )
        _built[kind] = db
    return _built[kind]


def _claim_big(cfg: Config) -> Callable[[Path, int], Sample]:
    def run(workdir: Path, index: int) -> Sample:
        return run_task("claim", db=_big_db(cfg, "big"), claims=300, batch=4)

    return run


def _status(cfg: Config, kind: str) -> Callable[[Path, int], Sample]:
    def run(workdir: Path, index: int) -> Sample:
        db = _big_db(cfg, kind)
        began = time.perf_counter()
        subprocess.run(
            graphiti_cmd("--db", db, "status", "--json"),
            env=child_env(),
            stdout=subprocess.DEVNULL,
            check=True,
        )
        wall = time.perf_counter() - began
        inproc = run_task("status_inproc", db=db, runs=3)["median_ms"]
        return {"wall_ms": wall * 1000, "inproc_ms": inproc}

    return run


# -- running and reporting -------------------------------------------------------------------


def run_metric(metric: Metric, cfg: Config) -> None:
    runs = cfg.runs or metric.runs
    for index in range(runs):
        shift = index % len(metric.contenders)
        order = metric.contenders[shift:] + metric.contenders[:shift]
        for contender in order:
            began = time.monotonic()
            try:
                sample = contender.run(cfg.workdir, index)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # One failed run (a peer's consumer dying, say) costs that sample, not the
                # whole report; it is listed with the metric.
                why = str(exc).strip().splitlines()[-1][:300]
                metric.failures.append(f"{contender.label} run {index + 1}: {why}")
                print(
                    f"  [{metric.key} {index + 1}/{runs}] {contender.label}: FAILED: {why}",
                    file=sys.stderr,
                )
                continue
            for key, value in sample.items():
                metric.results.setdefault((contender.label, key), []).append(float(value))
            shown = ", ".join(f"{k}={v:,.4g}" for k, v in sample.items())
            print(
                f"  [{metric.key} {index + 1}/{runs}] {contender.label}: {shown}"
                f" ({time.monotonic() - began:.1f}s)",
                file=sys.stderr,
            )


def fmt(value: float, unit: str) -> str:
    if value != value:
        return "n/a"
    if unit == "jobs/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def rows_of(metric: Metric) -> list[dict[str, Any]]:
    rows = []
    for measure in metric.measures:
        subject = metric.results.get((metric.subject, measure.key))
        for contender in metric.contenders:
            samples = metric.results.get((contender.label, measure.key))
            if not samples:
                continue
            stats = summary(samples)
            ratio = None
            if subject and contender.label != metric.subject and stats["median"]:
                ratio = summary(subject)["median"] / stats["median"]
            rows.append(
                {
                    "contender": contender.label,
                    "measure": measure.key,
                    "unit": measure.unit,
                    "higher_is_better": measure.higher_is_better,
                    "samples": samples,
                    **stats,
                    "ratio": ratio,
                }
            )
    return rows


def targets_of(metric: Metric) -> list[dict[str, Any]]:
    out = []
    for target in metric.targets:
        try:
            value = target.value(metric.median)
        except (KeyError, ZeroDivisionError, ValueError):
            out.append({"target": target.text, "value": None, "ok": None})
            continue
        out.append({"target": target.text, "value": value, "ok": target.ok(value)})
    return out


def render_table(report: dict[str, Any], markdown: bool) -> str:
    header = ["contender", "measure", "median", "min", "max", "unit", "subject / this"]
    lines: list[str] = []
    for metric in report["metrics"]:
        table = [header]
        for row in metric["rows"]:
            table.append(
                [
                    row["contender"],
                    row["measure"],
                    fmt(row["median"], row["unit"]),
                    fmt(row["min"], row["unit"]),
                    fmt(row["max"], row["unit"]),
                    row["unit"],
                    "" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                ]
            )
        lines.append(f"\n### {metric['title']}" if markdown else f"\n== {metric['title']}")
        if metric["note"]:
            lines.append(f"({metric['note']})")
        for failure in metric.get("failures", []):
            lines.append(f"failed run, left out: {failure}")
        if metric.get("skipped"):
            lines.append(f"skipped: {metric['skipped']}")
            continue
        if markdown:
            lines.append("")
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines.extend("| " + " | ".join(r) + " |" for r in table[1:])
            lines.append("")
        else:
            widths = [max(len(r[i]) for r in table) for i in range(len(header))]
            for r in table:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        for t in metric["targets"]:
            mark = {True: "PASS", False: "MISS", None: "n/a"}[t["ok"]]
            value = "n/a" if t["value"] is None else fmt(t["value"], "")
            lines.append(f"{'- ' if markdown else '  '}target {t['target']}: {value} -> {mark}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for name in ("graphiti-mpq", "huey", "litequeue"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "packages": versions,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def byte_compile_package() -> None:
    """Compile graphiti_mpq's modules to ``__pycache__``, as pip does when it installs a package.

    The bench venv installs graphiti_mpq editable, and where ``PYTHONDONTWRITEBYTECODE`` is
    set (this machine sets it) every process would compile our modules from source while the
    peers load the bytecode pip wrote: about 15 ms more for each process the bench starts.
    A stale file is never used: the interpreter checks each source's mtime and size.
    """
    compileall.compile_dir(str(REPO / "graphiti_mpq"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="graphiti_mpq benchmarks, side by side with its peers."
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--only", help="comma-separated metric keys (default: all)")
    parser.add_argument("--runs", type=int, help="runs of every metric (default: per metric)")
    parser.add_argument("--workdir", type=Path, help="keep the databases here")
    parser.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        metavar="URL",
        help="PostgreSQL database of the pg_* metrics, a fresh schema a measurement "
        f"[env BENCH_PG_URL; default {DEFAULT_PG_URL}]",
    )
    parser.add_argument(
        "--profile", type=int, metavar="JOBS", help="only profile a drain of JOBS no-op jobs"
    )
    parser.add_argument(
        "--gil", action="store_true", help="with --profile: only samples holding the GIL"
    )
    parser.add_argument(
        "--replay", action="store_true", help="with --profile: replay jobs running /bin/true"
    )
    parser.add_argument(
        "--profile-loop",
        type=int,
        metavar="JOBS",
        help="only cProfile the serving loop of an in-process drain of JOBS no-op jobs",
    )
    args = parser.parse_args(argv)
    if args.profile:
        from bench.profile import run_profile

        print(run_profile(args.profile, gil=args.gil, replay=args.replay))
        return 0
    if args.profile_loop:
        from bench.profile import run_loop_profile

        print(run_loop_profile(args.profile_loop))
        return 0
    byte_compile_package()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="graphiti-mpq-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = make_config(args.quick, workdir, args.runs, args.pg)
    chosen = metrics(cfg)
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {m.key for m in chosen}
        if unknown:
            parser.error(f"unknown metrics: {', '.join(sorted(unknown))}")
        chosen = [m for m in chosen if m.key in keys]
    began = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        for metric in chosen:
            print(f"{metric.key}: {metric.title}", file=sys.stderr)
            metric.skipped = metric.requires() if metric.requires else None
            if metric.skipped:
                print(f"  skipped: {metric.skipped}", file=sys.stderr)
                continue
            run_metric(metric, cfg)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "command": shlex.join(
            [Path(sys.argv[0]).name if argv is None else "bench.py", *(argv or sys.argv[1:])]
        ),
        "machine": {
            **machine(),
            "loadavg_before": load_before,
            "postgresql": _pg_state.get("version"),
        },
        "seconds": round(time.monotonic() - began, 1),
        "metrics": [
            {
                "key": m.key,
                "title": m.title,
                "note": m.note,
                "skipped": m.skipped,
                "subject": m.subject,
                "rows": rows_of(m),
                "targets": targets_of(m),
                "failures": m.failures,
            }
            for m in chosen
        ],
    }
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mach = report["machine"]
    print(
        f"machine: {mach['nproc']} x {mach['cpu']}; Python {mach['python']}; SQLite "
        f"{mach['sqlite']}; Linux {mach['kernel']}; graphiti_mpq {mach['commit']}; "
        f"huey {mach['packages']['huey']}; litequeue {mach['packages']['litequeue']}"
    )
    print(f"command: {report['command']}  ({report['seconds']}s, {mach['date']})")
    if mach["postgresql"]:
        where = urlsplit(args.pg)
        print(f"PostgreSQL {mach['postgresql']} at {where.hostname}:{where.port or 5432}")
    print(f"load average (1, 5, 15 min): {mach['loadavg_before']} before, {mach['loadavg']} after")
    print(render_table(report, args.markdown))
    return 0
