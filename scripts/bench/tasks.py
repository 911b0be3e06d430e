"""One measurement per fresh interpreter: ``python -m bench.tasks NAME JSON_PARAMS``.

Each task prints one JSON object on its last stdout line. Every contender (graphiti_mpq and
its peers) is measured by the same kind of task, in its own process, so imports and caches of
one never help or hurt another.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    child_env,
    cpu_seconds,
    descendants,
    drain_window,
    graphiti_cmd,
    log_events,
    percentile,
    rss_kib,
    wait_until,
)

TASKS: dict[str, Callable[..., dict[str, Any]]] = {}
FORK = multiprocessing.get_context("fork")


def task(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    TASKS[fn.__name__] = fn
    return fn


def noop_jobs(n: int, job_type: str = "bench.noop") -> list[dict[str, Any]]:
    return [{"job_type": job_type, "payload": {"i": i}, "parallel": True} for i in range(n)]


def replay_jobs(n: int) -> list[dict[str, Any]]:
    return [
        {"job_type": "bench.replay", "payload": {"command": "x"}, "parallel": True}
        for _ in range(n)
    ]


# -- peers ----------------------------------------------------------------------------------


def make_huey(db: str) -> tuple[Any, dict[str, Any]]:
    """A SqliteHuey with its default settings and the bench's tasks."""
    from huey import SqliteHuey

    from bench.jobs import record_pickup

    huey = SqliteHuey(filename=db)

    @huey.task(name="noop")
    def noop(i: int) -> None:
        return None

    @huey.task(name="replay")
    def replay() -> None:
        subprocess.run(["/bin/true", "x"], check=True)

    @huey.task(name="pickup")
    def pickup(token: int, t0: float) -> None:
        record_pickup(token, t0)

    return huey, {"noop": noop, "replay": replay, "pickup": pickup}


class HueyConsumer:
    """A Huey consumer (process workers) in a forked process, with shared progress counters:
    first task start, last task end, tasks completed (updated from Huey's signals)."""

    def __init__(self, huey: Any, workers: int) -> None:
        from huey.signals import SIGNAL_COMPLETE, SIGNAL_EXECUTING

        self.huey = huey
        self.workers = workers
        self.shared = FORK.RawArray("d", 3)
        self.lock = FORK.Lock()
        shared, lock = self.shared, self.lock

        @huey.signal(SIGNAL_EXECUTING)
        def started(sig: Any, task: Any, *args: Any) -> None:
            now = time.time()
            with lock:
                if shared[0] == 0 or now < shared[0]:
                    shared[0] = now

        @huey.signal(SIGNAL_COMPLETE)
        def completed(sig: Any, task: Any, *args: Any) -> None:
            now = time.time()
            with lock:
                shared[1] = max(shared[1], now)
                shared[2] += 1

        self.process: Any = None

    def start(self) -> float:
        launched = time.time()
        self.process = FORK.Process(target=self._run, daemon=False)
        self.process.start()
        return launched

    def _run(self) -> None:
        from huey.consumer import Consumer

        Consumer(self.huey, workers=self.workers, worker_type="process").run()

    def done(self) -> int:
        with self.lock:
            return int(self.shared[2])

    def window(self) -> tuple[float, float]:
        with self.lock:
            return self.shared[0], self.shared[1]

    def stop(self) -> None:
        pid = self.process.pid
        kids = descendants(pid)
        os.kill(pid, signal.SIGTERM)
        self.process.join(15)
        for p in [pid, *kids]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.join(5)


class Supervisor:
    """``graphiti_mpq supervise`` in a child process, JSON logs to a file."""

    def __init__(self, db: str, workers: int, *extra: str, env: dict[str, str] | None = None):
        self.log = Path(db + ".supervise.log")
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            graphiti_cmd(
                "--log-format", "json", "--db", db, "supervise", "--workers", str(workers), *extra
            ),
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=env or child_env(),
        )
        wait_until(
            lambda: b'"supervisor_started"' in self.log.read_bytes() or self._died(),
            60,
            "supervisor_started",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited: {self.log.read_text()[-2000:]}")

    def _died(self) -> bool:
        return self.proc.poll() is not None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


# -- enqueue --------------------------------------------------------------------------------


@task
def enqueue_one(impl: str, db: str, n: int) -> dict[str, Any]:
    """``n`` enqueues of one job each, every one its own durable commit."""
    put: Callable[[int], Any]
    if impl.startswith("graphiti_mpq"):
        if impl.endswith("full"):
            os.environ["GRAPHITI_QUEUE_SYNCHRONOUS"] = "full"
        import graphiti_mpq

        graphiti_mpq.get_queue(db)

        def put(i: int) -> Any:
            return graphiti_mpq.enqueue("bench.noop", {"i": i}, parallel=True, silent=True)

    elif impl == "litequeue":
        from litequeue import LiteQueue

        q = LiteQueue(db)

        def put(i: int) -> Any:
            return q.put(json.dumps({"i": i}))

    elif impl == "huey":
        _, tasks = make_huey(db)
        put = tasks["noop"]
    else:
        raise ValueError(impl)
    put(-1)  # creates the database: not timed
    began = time.perf_counter()
    for i in range(n):
        put(i)
    seconds = time.perf_counter() - began
    return {"rate": n / seconds, "seconds": seconds}


@task
def enqueue_many(impl: str, db: str, n: int) -> dict[str, Any]:
    """One batch of ``n`` jobs in one transaction: ``enqueue_many`` vs a plain ``executemany``
    of the very rows ``enqueue_many`` would write, into the same (migrated) table."""
    from graphiti_mpq import JobQueue
    from graphiti_mpq.storage import insert

    jobs = noop_jobs(n)
    queue = JobQueue(db).open()
    if impl == "graphiti_mpq":
        began = time.perf_counter()
        queue.enqueue_many(jobs)
        seconds = time.perf_counter() - began
    elif impl == "executemany":
        rows = insert.prepare_many(jobs)
        queue.close()
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA synchronous = NORMAL")
        began = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert.INSERT_SQL, rows)
        conn.execute("COMMIT")
        seconds = time.perf_counter() - began
        conn.close()
    else:
        raise ValueError(impl)
    return {"rate": n / seconds, "seconds": seconds}


# -- drains ---------------------------------------------------------------------------------


def _graphiti_drain(db: str, n: int, workers: int, *extra: str) -> dict[str, Any]:
    log = Path(db + ".drain.log")
    with log.open("wb") as err:
        launched = time.time()
        proc = subprocess.run(
            [
                *graphiti_cmd("--log-format", "json", "--db", db, "drain", "--json"),
                *("--workers", str(workers), *extra),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(),
            check=False,
        )
        exited = time.time()
    outcome = json.loads(proc.stdout)
    if outcome["succeeded"] != n:
        raise RuntimeError(f"drain did {outcome}, expected {n}: {log.read_text()[-2000:]}")
    first, last, done = drain_window(log_events(log))
    return {
        "rate": done / (last - first),
        "startup": first - launched,
        "wall": exited - launched,
        "drain_seconds": outcome["seconds"],
    }


def _huey_drain(db: str, n: int, workers: int, kind: str) -> dict[str, Any]:
    huey, tasks = make_huey(db)
    fn = tasks[kind]
    for i in range(n):
        fn(i) if kind == "noop" else fn()
    consumer = HueyConsumer(huey, workers)
    launched = consumer.start()
    try:
        wait_until(lambda: consumer.done() >= n, 600, "huey to finish", interval=0.05)
    finally:
        first, last = consumer.window()
        consumer.stop()
    return {"rate": n / (last - first), "startup": first - launched}


def _reports(pipes: list[Any], procs: list[Any], who: str) -> list[Any]:
    """Each forked process's report; a process that died or failed fails the run, not hangs it."""
    for _, send in pipes:
        send.close()  # our copy: a process that dies unreported then reads as EOF
    try:
        reports = [recv.recv() for recv, _ in pipes]
    except EOFError:
        raise RuntimeError(f"a {who} died without reporting") from None
    finally:
        for proc in procs:
            proc.join()
    errors = [r[1] for r in reports if r[0] == "error"]
    if errors:
        raise RuntimeError(f"a {who} failed: {errors[0]}")
    return reports


T = TypeVar("T")


def _retry_locked(call: Callable[[], T]) -> T:
    """What a user of litequeue would write: its connection gives up on a locked database at
    once (two consumers collide now and then), so try again, for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _litequeue_consumer(db: str, kind: str, out: Any) -> None:
    from litequeue import LiteQueue

    queue = LiteQueue(db)
    first = last = None
    count = 0
    try:
        while True:
            message = _retry_locked(queue.pop)
            if message is None:
                break
            if first is None:
                first = time.time()
            payload = json.loads(message.data)
            if kind == "replay":
                subprocess.run(["/bin/true", *payload["command"]], check=True)
            _retry_locked(functools.partial(queue.done, message.message_id))
            last = time.time()
            count += 1
    except Exception as exc:  # reported, so the run fails with the reason instead of hanging
        out.send(("error", f"{type(exc).__name__}: {exc}", count))
        return
    out.send((first, last, count))


def _litequeue_drain(db: str, n: int, workers: int, kind: str) -> dict[str, Any]:
    from litequeue import LiteQueue

    queue = LiteQueue(db)
    payload = json.dumps({"command": ["x"]} if kind == "replay" else {"i": 0})
    with queue.transaction():
        for _ in range(n):
            queue.put(payload)
    queue.conn.close()
    pipes = [FORK.Pipe(duplex=False) for _ in range(workers)]
    launched = time.time()
    procs = [FORK.Process(target=_litequeue_consumer, args=(db, kind, send)) for _, send in pipes]
    for proc in procs:
        proc.start()
    reports = _reports(pipes, procs, "litequeue consumer")
    done = sum(r[2] for r in reports)
    if done != n:
        raise RuntimeError(f"litequeue consumers did {done} of {n}")
    first = min(r[0] for r in reports if r[0] is not None)
    last = max(r[1] for r in reports if r[1] is not None)
    return {"rate": n / (last - first), "startup": first - launched}


def _plain_loop_worker(count: int, out: Any) -> None:
    first = time.time()
    for _ in range(count):
        subprocess.run(["/bin/true", "x"], check=True)
    out.send((first, time.time()))


def _plain_loop(n: int, workers: int) -> dict[str, Any]:
    pipes = [FORK.Pipe(duplex=False) for _ in range(workers)]
    shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    procs = [
        FORK.Process(target=_plain_loop_worker, args=(share, send))
        for share, (_, send) in zip(shares, pipes, strict=True)
    ]
    launched = time.time()
    for proc in procs:
        proc.start()
    reports = _reports(pipes, procs, "plain loop worker")
    first = min(r[0] for r in reports)
    return {"rate": n / (max(r[1] for r in reports) - first), "startup": first - launched}


@task
def drain_noop(impl: str, db: str, n: int, workers: int) -> dict[str, Any]:
    if impl == "graphiti_mpq":
        from graphiti_mpq import JobQueue

        JobQueue(db).enqueue_many(noop_jobs(n))
        return _graphiti_drain(db, n, workers, "--import", "bench.jobs")
    if impl == "huey":
        return _huey_drain(db, n, workers, "noop")
    if impl == "litequeue":
        return _litequeue_drain(db, n, workers, "noop")
    raise ValueError(impl)


@task
def drain_replay(impl: str, db: str, n: int, workers: int) -> dict[str, Any]:
    if impl == "graphiti_mpq":
        from graphiti_mpq import JobQueue

        JobQueue(db).enqueue_many(replay_jobs(n))
        return _graphiti_drain(db, n, workers, "--program", "/bin/true")
    if impl == "plain-loop":
        return _plain_loop(n, workers)
    if impl == "huey":
        return _huey_drain(db, n, workers, "replay")
    if impl == "litequeue":
        return _litequeue_drain(db, n, workers, "replay")
    raise ValueError(impl)


# -- a serving process: latency, idle CPU, memory --------------------------------------------


class _Tokens:
    """Reads the pickup file as it grows: token -> latency."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: dict[str, float] = {}
        self._partial = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            token, latency = line.decode().split()
            self.seen[token] = float(latency)

    def wait(self, token: str, timeout: float = 30.0) -> float:
        def found() -> bool:
            self.poll()
            return token in self.seen

        wait_until(found, timeout, f"pickup of job {token}", interval=0.001)
        return self.seen[token]


@task
def pickup(impl: str, db: str, samples: int, gap: float) -> dict[str, Any]:
    """Enqueue -> handler start, one job at a time with ``gap`` seconds of idleness between."""
    path = Path(db + ".pickup")
    os.environ["BENCH_PICKUP_FILE"] = str(path)
    tokens = _Tokens(path)
    if impl == "graphiti_mpq":
        import graphiti_mpq

        graphiti_mpq.get_queue(db)
        server: Any = Supervisor(db, 2, "--import", "bench.jobs", env=child_env())

        def put(token: str) -> None:
            payload = {"token": token, "t0": time.time()}
            graphiti_mpq.enqueue("bench.pickup", payload, parallel=True, silent=True)

    elif impl == "huey":
        huey, tasks = make_huey(db)
        server = HueyConsumer(huey, 2)
        server.start()

        def put(token: str) -> None:
            tasks["pickup"](token, time.time())

    else:
        raise ValueError(impl)
    latencies = []
    try:
        for i in range(-3, samples):  # three warm-up jobs
            time.sleep(gap)
            put(str(i))
            latency = tokens.wait(str(i))
            if i >= 0:
                latencies.append(latency * 1000)
    finally:
        server.stop()
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies),
    }


def _tree_cpu(root: int) -> dict[int, float]:
    return cpu_seconds([root, *descendants(root)])


@task
def idle_cpu(impl: str, db: str, seconds: float, settle: float) -> dict[str, Any]:
    """CPU of an idle serving process and all its descendants, in % of one core."""
    if impl == "graphiti_mpq":
        server: Any = Supervisor(db, 2)
        root = server.pid
    elif impl == "huey":
        huey, _ = make_huey(db)
        server = HueyConsumer(huey, 2)
        server.start()
        root = server.process.pid
    else:
        raise ValueError(impl)
    try:
        time.sleep(settle)
        before = _tree_cpu(root)
        began = time.monotonic()
        time.sleep(seconds)
        after = _tree_cpu(root)
        elapsed = time.monotonic() - began
    finally:
        server.stop()
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    return {"cpu_pct": 100 * used / elapsed, "processes": len(after)}


@task
def rss(db: str, small: int, big: int, chunk: int) -> dict[str, Any]:
    """Supervisor RSS after ``small`` jobs and after ``big`` jobs (same process)."""
    from graphiti_mpq import JobQueue

    queue = JobQueue(db).open()
    server = Supervisor(db, 2, "--import", "bench.jobs")

    def drained() -> bool:
        stats = queue.get_stats()
        return stats.pending == 0 and stats.running == 0

    def run(count: int) -> None:
        done = 0
        while done < count:
            size = min(chunk, count - done)
            queue.enqueue_many(noop_jobs(size))
            wait_until(drained, 900, "the supervisor to drain", interval=0.05)
            done += size

    try:
        run(small)
        time.sleep(0.5)
        rss_small = rss_kib(server.pid)
        kids_small = sum(rss_kib(p) or 0 for p in descendants(server.pid))
        run(big - small)
        time.sleep(0.5)
        rss_big = rss_kib(server.pid)
        kids_big = sum(rss_kib(p) or 0 for p in descendants(server.pid))
        succeeded = queue.get_stats().succeeded
    finally:
        server.stop()
    assert rss_small and rss_big
    return {
        "rss_small_mib": rss_small / 1024,
        "rss_big_mib": rss_big / 1024,
        "ratio": rss_big / rss_small,
        "children_small_mib": kids_small / 1024,
        "children_big_mib": kids_big / 1024,
        "succeeded": succeeded,
    }


# -- a big table: claim cost and status ----------------------------------------------------


@task
def build_db(db: str, pending: int, succeeded: int = 0) -> dict[str, Any]:
    """A queue with ``pending`` due parallel jobs (and ``succeeded`` finished ones), fast."""
    from graphiti_mpq import JobQueue
    from graphiti_mpq.storage import insert

    JobQueue(db).open().close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    began = time.perf_counter()
    now = time.time() - 10
    block = 100_000
    for state, total in (("succeeded", succeeded), ("pending", pending)):
        sql = insert.INSERT_SQL.replace("'pending'", f"'{state}'")
        for start in range(0, total, block):
            rows = [
                (insert.new_job_id(), "bench.noop", '{"i":0}', 1, 0, None, None, None, now, now)
                for _ in range(min(block, total - start))
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
    if succeeded:
        conn.execute("UPDATE jobs SET finished_at = created_at + 1 WHERE state = 'succeeded'")
    conn.execute("ANALYZE")
    conn.close()
    seconds = time.perf_counter() - began
    # The kernel writes a fresh table's hundreds of MB back for a while after: flush it now, or
    # the first measurements on it compete with that writeback (1,000,000-job claims varied
    # 160-400 us from run to run without this).
    os.sync()
    return {"seconds": seconds}


@task
def claim(db: str, claims: int, batch: int, warmup: int = 20) -> dict[str, Any]:
    """Median time of ``JobQueue.claim`` (each claim's jobs then finished, not timed)."""
    from graphiti_mpq import JobQueue
    from graphiti_mpq.models import AttemptResult, Outcome

    queue = JobQueue(db).open()
    owner = queue.register_process("bench", socket.gethostname(), 60.0)
    pending = queue.get_pending_count()
    times = []
    for i in range(warmup + claims):
        began = time.perf_counter()
        jobs = queue.claim(owner, batch, 60.0)
        spent = time.perf_counter() - began
        if not jobs:
            raise RuntimeError("nothing to claim")
        if i >= warmup:
            times.append(spent)
        queue.finish([(job, AttemptResult(Outcome.SUCCEEDED)) for job in jobs], owner=owner)
        queue.enqueue_many(noop_jobs(len(jobs)))  # keeps the pending count where it was
    return {
        "median_us": percentile(times, 50) * 1e6,
        "p95_us": percentile(times, 95) * 1e6,
        "pending": pending,
    }


@task
def claim_small(db: str, claims: int, batch: int) -> dict[str, Any]:
    build_db(db=db, pending=1000)
    return claim(db=db, claims=claims, batch=batch)


@task
def status_inproc(db: str, runs: int) -> dict[str, Any]:
    """``build_status`` inside one process (no interpreter start-up): where status time goes."""
    from graphiti_mpq import JobQueue
    from graphiti_mpq.status import build_status

    queue = JobQueue(db).open()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        build_status(queue)
        times.append(time.perf_counter() - began)
    return {"median_ms": percentile(times, 50) * 1000}


# -- PostgreSQL: several supervisors on one queue, enqueue rates -----------------------------


def _pg_queue(url: str) -> Any:
    from graphiti_mpq.storage import open_queue

    return open_queue(url)


@task
def pg_drain(url: str, logdir: str, n: int, supervisors: int, workers: int) -> dict[str, Any]:
    """``n`` no-op jobs pre-enqueued, then ``supervisors`` supervisors (distinct host ids)
    started together; the rate is n / (first jobs_claimed -> last job_completed) over all their
    logs."""
    queue = _pg_queue(url)
    queue.enqueue_many(noop_jobs(n))
    logs = [Path(logdir) / f"supervise-h{i}.log" for i in range(supervisors)]
    files = [log.open("wb") for log in logs]
    launched = time.time()
    procs = [
        subprocess.Popen(
            graphiti_cmd(
                *("--db", url, "--log-format", "json", "supervise"),
                *("--workers", str(workers), "--host-id", f"h{i}", "--import", "bench.jobs"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=child_env(),
        )
        for i, f in enumerate(files)
    ]

    def finished() -> bool:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a supervisor exited: {logs[0].read_text()[-2000:]}")
        stats = queue.get_stats()
        return stats.succeeded >= n or stats.pending + stats.running == 0

    try:
        wait_until(finished, 900, "the supervisors to drain", interval=0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    succeeded = queue.get_stats().succeeded
    queue.close()
    windows = [drain_window(log_events(log)) for log in logs]
    first = min(w[0] for w in windows)
    last = max(w[1] for w in windows)
    done = sum(w[2] for w in windows)
    if succeeded != n or done != n:
        raise RuntimeError(f"{succeeded} succeeded, {done} completions logged, expected {n}")
    return {
        "rate": n / (last - first),
        "startup": first - launched,
        "busiest_share": max(w[2] for w in windows) / n,
    }


@task
def pg_enqueue_one(url: str, n: int) -> dict[str, Any]:
    """``graphiti_mpq.enqueue`` with GRAPHITI_QUEUE_PATH=url, ``n`` times, each its own commit."""
    os.environ["GRAPHITI_QUEUE_PATH"] = url
    import graphiti_mpq

    def put(i: int) -> Any:
        return graphiti_mpq.enqueue("bench.noop", {"i": i}, parallel=True, silent=True)

    put(-1)  # creates the schema and opens the connection: not timed
    began = time.perf_counter()
    for i in range(n):
        put(i)
    seconds = time.perf_counter() - began
    return {"rate": n / seconds, "seconds": seconds}


@task
def pg_enqueue_many(url: str, n: int) -> dict[str, Any]:
    """One ``enqueue_many`` call of ``n`` jobs (one transaction) on a PostgreSQL queue."""
    queue = _pg_queue(url)
    jobs = noop_jobs(n)
    began = time.perf_counter()
    queue.enqueue_many(jobs)
    seconds = time.perf_counter() - began
    queue.close()
    return {"rate": n / seconds, "seconds": seconds}


def main() -> None:
    name, params = sys.argv[1], json.loads(sys.argv[2])
    result = TASKS[name](**params)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
