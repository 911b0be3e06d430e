#!/usr/bin/env python3
"""Fault-injection soak: nothing queued is lost, the barrier holds, reruns only after kills.

Several enqueuer processes add ``--jobs`` jobs (replay jobs running a small recorder program
and Python-handler jobs, parallel and sequential) through the Python API, ``enqueue_many`` and
the CLI, while ``graphiti_mpq supervise`` serves the queue and a cron-style ``drain`` runs
beside it now and then. At random moments the soak SIGKILLs the supervisor (``--kills`` times;
it is restarted at once) and random pool children (``--child-kills`` times). It waits for the
queue to empty with a deadline (``--timeout``, polling ``status --json``), stops the
supervisor, and checks, from the records the jobs themselves wrote:

- every job ended ``succeeded`` (a job may end dead only if every attempt was killed: those
  are counted apart), and each has a completed run;
- no sequential job overlapped any other job: every run takes a shared (parallel) or
  exclusive (sequential) ``flock`` on a file of the soak's own, without waiting, and records
  an overlap when it cannot; completed runs' intervals are checked too;
- a job ran more than once only if a kill (or a hand-back the engine logged) came between
  its runs;
- no process of a killed supervisor outlived it by more than a few seconds;
- no attempt failed for any reason but a kill, and no serving process exited on its own.

It prints the counts and exits 1 on any violation (2 on a usage error). Example:

    scripts/soak.py --jobs 10000 --kills 20 --seed 7
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The /proc helpers the benchmark uses too (scripts/ is on sys.path when this file runs).
from bench.common import descendants, parent_map, proc_stat

PY = sys.executable
ORPHAN_GRACE = 5.0  # seconds a killed supervisor's processes may take to die
DRAIN_WAIT = 10.0  # seconds for a drain to end once the queue is empty
STOP_WAIT = 15.0  # seconds for the final supervisor to exit after SIGTERM (grace is 5 s)
KILLED_OUTCOMES = {"crashed", "lost"}

RECORDER = '''
import fcntl
import os
import time


def soak_run(token, mode, sleep, kind, attempt):
    """Record this run (S at start, E at end) and check the barrier with our own flock."""
    lock = os.open(os.environ["SOAK_LOCK"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flag = fcntl.LOCK_EX if mode == "seq" else fcntl.LOCK_SH
        try:
            fcntl.flock(lock, flag | fcntl.LOCK_NB)
            overlap = False
        except BlockingIOError:
            overlap = True
        log = os.open(os.environ["SOAK_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        pid, ppid = os.getpid(), os.getppid()

        def put(tag):
            line = f"{tag} {token} {attempt} {time.time():.6f} {pid} {ppid} {kind} {mode}\\n"
            os.write(log, line.encode())

        if overlap:
            put("X")
        put("S")
        time.sleep(sleep)
        put("E")
        os.close(log)
    finally:
        os.close(lock)
'''

HANDLERS = (
    '"""Python-handler jobs of the soak (written by scripts/soak.py)."""\n'
    "import graphiti_mpq\n"
    + RECORDER
    + """

@graphiti_mpq.handler("soak.py")
def py_job(payload):
    soak_run(payload["token"], payload["mode"], payload["sleep"], "py", "-")
    return {"token": payload["token"]}
"""
)

RUNNER = (
    "#!{python} -IS\n"
    + RECORDER
    + """

import sys

token, mode, sleep = sys.argv[-3:]
soak_run(token, mode, float(sleep), "replay", os.environ.get("GRAPHITI_MPQ_ATTEMPT", "-"))
"""
)


# -- /proc ----------------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a process for good (pids are reused). None when gone or a zombie."""
    fields = proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return pid, fields[19]


def pool_children(supervisor: int) -> list[int]:
    """The supervisor's pool children: its direct children (fork, spawn), or the children of
    its fork server (forkserver); never the fork server or the resource tracker themselves."""
    parents = parent_map()
    result = []
    for kid in [p for p, pp in parents.items() if pp == supervisor]:
        cmd = cmdline(kid)
        if "resource_tracker" in cmd:
            continue
        if "forkserver" in cmd:
            result.extend(p for p, pp in parents.items() if pp == kid)
        else:
            result.append(kid)
    return result


# -- enqueuers (separate processes: soak.py --enqueuer JSON) --------------------------------


def run_enqueuer(spec: dict[str, Any]) -> int:
    """Enqueue ``count`` jobs one way or another; write ``token job_id kind mode`` lines."""
    import graphiti_mpq

    rng = random.Random(spec["seed"])
    graphiti_mpq.get_queue(spec["db"])
    pause = spec["spread"] / max(1, spec["count"])
    made = 0
    with open(spec["out"], "a") as out:
        while made < spec["count"]:
            way = rng.random()
            size = 1 if way < 0.85 else rng.randint(2, 10)
            jobs = [_job(spec, made + i, rng) for i in range(min(size, spec["count"] - made))]
            if len(jobs) > 1:
                ids = graphiti_mpq.enqueue_many(jobs)
            elif way < 0.75:
                job = jobs[0]
                ids = [
                    graphiti_mpq.enqueue(
                        job["job_type"], job["payload"], job["parallel"], silent=True
                    )
                ]
            else:
                ids = [_cli_enqueue(spec["db"], jobs[0])]
            for job, job_id in zip(jobs, ids, strict=True):
                kind = "replay" if "command" in job["payload"] else "py"
                mode = "par" if job["parallel"] else "seq"
                out.write(f"{_token(job)} {job_id} {kind} {mode}\n")
            out.flush()
            made += len(jobs)
            time.sleep(rng.expovariate(1 / pause) if pause > 0 else 0)
    return 0


def _token(job: dict[str, Any]) -> str:
    payload = job["payload"]
    return str(payload["args"][0] if "command" in payload else payload["token"])


def _job(spec: dict[str, Any], i: int, rng: random.Random) -> dict[str, Any]:
    token = f"e{spec['index']}-{i}"
    parallel = rng.random() >= spec["seq_ratio"]
    mode = "par" if parallel else "seq"
    sleep = round(rng.uniform(0, spec["max_sleep"]), 4)
    if rng.random() < 0.5:
        payload: dict[str, Any] = {"command": "soak-run", "args": [token, mode, str(sleep)]}
        return {"job_type": "soak-run", "payload": payload, "parallel": parallel}
    payload = {"token": token, "mode": mode, "sleep": sleep}
    return {"job_type": "soak.py", "payload": payload, "parallel": parallel}


def _cli_enqueue(db: str, job: dict[str, Any]) -> str:
    argv = [PY, "-m", "graphiti_mpq", "--db", db, "enqueue"]
    if job["parallel"]:
        argv.append("--parallel")
    payload = job["payload"]
    if "command" in payload:
        argv += [payload["command"], *payload["args"]]
    else:
        argv += ["--type", job["job_type"], "--payload", json.dumps(payload)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


# -- the soak ---------------------------------------------------------------------------------


@dataclass
class Run:
    token: str
    start: float
    pid: int
    ppid: int
    kind: str
    mode: str
    attempt: str
    end: float | None = None


@dataclass
class Kill:
    """A SIGKILL the soak sent: when, to what, and the processes it doomed."""

    time: float
    what: str  # supervisor or child
    pid: int
    family: set[int]  # the victim's descendants (supervisor) or the child and its command

    def interrupted(self, run: Run) -> bool:
        """Whether this kill ended (or doomed) ``run``: it ran in one of the killed processes.

        A pool child can still start a task it had already received a few milliseconds after
        its supervisor died (it dies with it right after), hence the window before the run.
        """
        if not run.start - ORPHAN_GRACE <= self.time:
            return False
        return run.pid in self.family or run.ppid in self.family


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def violate(self, text: str) -> None:
        self.violations.append(text)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = workdir
        self.db = str(workdir / "queue.db")
        self.runs_file = workdir / "runs.log"
        self.findings = Findings()
        self.kills: list[Kill] = []
        self.watch: list[tuple[float, int, list[tuple[int, str]]]] = []  # orphans to check
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.drains: list[dict[str, Any]] = []
        self.drain_proc: subprocess.Popen[bytes] | None = None
        self._stop_drains = threading.Event()
        self.drainer = threading.Thread(target=self.drain_loop, daemon=True)
        runner = workdir / "soak-runner"
        runner.write_text(RUNNER.replace("{python}", PY))
        runner.chmod(0o755)
        (workdir / "soak_jobs.py").write_text(HANDLERS)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHITI_")}
        self.env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")])),
            SOAK_RUNS=str(self.runs_file),
            SOAK_LOCK=str(workdir / "barrier-check.lock"),
        )
        self.serving = [
            "--workers",
            str(args.workers),
            "--import",
            "soak_jobs",
            "--program",
            str(runner),
            "--max-retries",
            "100",
            "--backoff-base",
            "0.1",
            "--lease",
            "5",
            "--grace",
            "5",
        ]

    def cli(self, *args: str) -> list[str]:
        return [PY, "-m", "graphiti_mpq", "--log-format", "json", "--db", self.db, *args]

    # -- supervisor -----------------------------------------------------------------------

    def start_supervisor(self) -> None:
        self.incarnation += 1
        log = (self.dir / f"supervise-{self.incarnation}.log").open("wb")
        self.supervisor = subprocess.Popen(
            self.cli("supervise", *self.serving),
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=self.env,
        )
        log.close()

    def check_supervisor(self) -> None:
        """A supervisor that exited without being killed is a violation; restart it."""
        assert self.supervisor is not None
        code = self.supervisor.poll()
        if code is not None:
            self.findings.violate(
                f"supervisor #{self.incarnation} (pid {self.supervisor.pid}) exited on its own "
                f"with {code}; see supervise-{self.incarnation}.log"
            )
            self.start_supervisor()

    def kill_supervisor(self) -> None:
        assert self.supervisor is not None
        victim = self.supervisor
        family = [i for i in map(identity, descendants(victim.pid)) if i is not None]
        os.kill(victim.pid, signal.SIGKILL)
        self.note_kill("supervisor", victim.pid, {pid for pid, _ in family})
        victim.wait()
        self.watch.append((time.monotonic() + ORPHAN_GRACE, victim.pid, family))
        time.sleep(self.rng.uniform(0, 0.3))  # fault injection: a random restart delay
        self.start_supervisor()

    def kill_child(self) -> bool:
        assert self.supervisor is not None
        children = pool_children(self.supervisor.pid)
        if not children:
            return False
        victim = self.rng.choice(children)
        family = {victim, *descendants(victim)}
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.note_kill("child", victim, family)
        return True

    def note_kill(self, what: str, pid: int, family: set[int]) -> None:
        now = time.time()
        self.kills.append(Kill(now, what, pid, family))
        with (self.dir / "kills.txt").open("a") as f:
            f.write(f"{now:.6f} {what} {pid} supervisor#{self.incarnation}\n")

    def dump_stacks(self, pid: int, label: str) -> None:
        """On a hang: the Python stacks of ``pid`` (py-spy, when installed) for the report."""
        candidates = [shutil.which("py-spy"), Path(PY).parent / "py-spy"]
        candidates.append(Path(__file__).resolve().parent.parent / ".bench-venv/bin/py-spy")
        spy = next((str(c) for c in candidates if c and os.path.exists(c)), None)
        if spy is None:
            return
        out = self.dir / f"stacks-{label}.txt"
        proc = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, check=False
        )
        out.write_text(proc.stdout + proc.stderr)
        self.findings.warnings.append(f"stacks of the hung {label} (pid {pid}) in {out}")

    def check_orphans(self, final: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, pid, family in self.watch:
            if now < due and not final:
                keep.append((due, pid, family))
                continue
            alive = [i for i in family if identity(i[0]) == i]
            for child, _ in alive:
                self.findings.violate(
                    f"process {child} ({cmdline(child)[:80]!r}) of killed supervisor {pid} is "
                    f"alive more than {ORPHAN_GRACE:g}s after the kill"
                )
        self.watch = keep

    # -- drains beside it ----------------------------------------------------------------

    def drain_loop(self) -> None:
        rng = random.Random(self.args.seed + 1)
        number = 0
        while not self._stop_drains.wait(rng.uniform(1.0, 3.0)):
            number += 1
            log_path = self.dir / f"drain-{number}.log"
            began = time.monotonic()
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [*self.cli("drain", *self.serving), "--json"],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=self.env,
                )
                self.drain_proc = proc
                out, _ = proc.communicate()
            self.drains.append(
                {"code": proc.returncode, "seconds": time.monotonic() - began, "out": out}
            )
            if proc.returncode not in (0, 1, -signal.SIGKILL):
                self.findings.violate(f"drain #{number} exited {proc.returncode}: {log_path}")

    def stop_drains(self) -> None:
        """No new drain; the one running must end by itself soon (nothing is left to do)."""
        self._stop_drains.set()
        self.drainer.join(timeout=DRAIN_WAIT)
        proc = self.drain_proc
        if self.drainer.is_alive() and proc is not None:
            self.findings.violate(
                f"drain #{len(self.drains) + 1} (pid {proc.pid}) still running {DRAIN_WAIT:g}s"
                " after the queue emptied (hang)"
            )
            self.dump_stacks(proc.pid, f"drain-{len(self.drains) + 1}")
            proc.kill()
            self.drainer.join()

    # -- phases -----------------------------------------------------------------------------

    def start_enqueuers(self) -> list[subprocess.Popen[bytes]]:
        args = self.args
        shares = [
            args.jobs // args.enqueuers + (i < args.jobs % args.enqueuers)
            for i in range(args.enqueuers)
        ]
        procs = []
        for index, count in enumerate(shares):
            spec = {
                "db": self.db,
                "out": str(self.dir / f"enqueued-{index}.txt"),
                "count": count,
                "seed": args.seed * 1000 + index,
                "index": index,
                "spread": args.spread,
                "seq_ratio": args.seq_ratio,
                "max_sleep": args.max_sleep,
            }
            procs.append(
                subprocess.Popen(
                    [PY, __file__, "--enqueuer", json.dumps(spec)],
                    env=self.env,
                )
            )
        return procs

    def inject_faults(self) -> None:
        events = ["supervisor"] * self.args.kills + ["child"] * self.args.child_kills
        self.rng.shuffle(events)
        gap = max(0.2, 2 * self.args.spread / max(1, len(events)))
        for what in events:
            time.sleep(self.rng.uniform(0.2, gap))  # fault injection: a random moment
            self.check_supervisor()
            self.check_orphans()
            if what == "supervisor":
                self.kill_supervisor()
                continue
            for _ in range(50):  # the pool may be restarting: try again shortly
                if self.kill_child():
                    break
                time.sleep(0.05)
            else:
                self.findings.warnings.append("no pool child found to kill")

    def status(self) -> dict[str, Any]:
        proc = subprocess.run(
            self.cli("status", "--json"), capture_output=True, text=True, env=self.env, check=False
        )
        if proc.returncode != 0:
            return {}
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def wait_done(self, deadline: float) -> dict[str, Any]:
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.check_supervisor()
            self.check_orphans()
            last = self.status() or last
            finished = last.get("succeeded", 0) + last.get("dead_letter", 0)
            if last and not last["pending"] and not last["running"] and finished >= self.args.jobs:
                return last
            time.sleep(0.5)
        self.findings.violate(
            f"the queue did not empty within {self.args.timeout:g}s of the start: last status"
            f" {last}"
        )
        if self.supervisor is not None:
            self.dump_stacks(self.supervisor.pid, f"supervisor-{self.incarnation}")
        return last

    def stop_supervisor(self) -> None:
        assert self.supervisor is not None
        # A supervisor restarted just before the queue emptied may still be importing: a
        # SIGTERM then meets Python's default action (exit by signal) before any handler
        # exists. Graceful stop is promised to a started supervisor, so wait for its start.
        log = self.dir / f"supervise-{self.incarnation}.log"
        started = time.monotonic() + STOP_WAIT
        while self.supervisor.poll() is None and time.monotonic() < started:
            if b'"supervisor_started"' in log.read_bytes():
                break
            time.sleep(0.02)
        self.supervisor.send_signal(signal.SIGTERM)
        try:
            code = self.supervisor.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.dump_stacks(self.supervisor.pid, f"supervisor-{self.incarnation}")
            self.supervisor.kill()
            code = self.supervisor.wait()
            self.findings.violate(
                f"supervisor #{self.incarnation} did not stop within {STOP_WAIT:g}s of SIGTERM"
                f" (its jobs had all finished); see supervise-{self.incarnation}.log"
            )
            return
        if code != 0:
            self.findings.violate(f"the final supervisor exited {code} after SIGTERM, not 0")

    def run(self) -> int:
        began = time.monotonic()
        self.start_supervisor()
        enqueuers = self.start_enqueuers()
        self.drainer.start()
        deadline = began + self.args.timeout
        self.inject_faults()
        for proc in enqueuers:
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                self.findings.violate(f"an enqueuer exited {code}")
        final = self.wait_done(deadline)
        self.stop_drains()
        self.stop_supervisor()
        self.check_orphans(final=True)
        self.findings.counts["seconds"] = round(time.monotonic() - began, 1)
        self.findings.counts["final status"] = {
            k: final.get(k) for k in ("pending", "running", "succeeded", "dead_letter")
        }
        Verifier(self).verify()
        return self.report()

    # -- report -----------------------------------------------------------------------------

    def report(self) -> int:
        f = self.findings
        print(f"soak: seed {self.args.seed}, workdir {self.dir}")
        for key, value in f.counts.items():
            print(f"  {key}: {value}")
        for text in f.warnings:
            print(f"warning: {text}")
        for text in f.violations[:50]:
            print(f"VIOLATION: {text}")
        if len(f.violations) > 50:
            print(f"... and {len(f.violations) - 50} more violations")
        print("soak: FAILED" if f.violations else "soak: OK")
        return 1 if f.violations else 0


class Verifier:
    """Checks the end state against the jobs' own records of their runs."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.f = soak.findings
        self.jobs: dict[str, tuple[str, str, str]] = {}  # token -> (job id, kind, mode)
        self.by_id: dict[str, str] = {}
        self.runs: dict[str, list[Run]] = defaultdict(list)
        self.overlaps: list[str] = []

    def verify(self) -> None:
        self.load_enqueued()
        self.load_runs()
        logs = self.load_logs()
        states = self.load_states()
        self.check_states(states)
        self.check_runs(logs)
        self.check_overlaps()
        self.check_failures(logs)

    def load_enqueued(self) -> None:
        for path in sorted(self.soak.dir.glob("enqueued-*.txt")):
            for line in path.read_text().splitlines():
                token, job_id, kind, mode = line.split()
                self.jobs[token] = (job_id, kind, mode)
                self.by_id[job_id] = token
        expected = self.soak.args.jobs
        if len(self.jobs) != expected:
            self.f.violate(f"{len(self.jobs)} jobs were enqueued, not {expected}")
        if len(self.by_id) != len(self.jobs):
            self.f.violate("two enqueues returned the same job id")
        mix = Counter(f"{kind} {mode}" for _, kind, mode in self.jobs.values())
        self.f.counts["jobs enqueued"] = f"{len(self.jobs)} ({dict(sorted(mix.items()))})"

    def load_runs(self) -> None:
        open_runs: dict[tuple[str, int], Run] = {}
        text = self.soak.runs_file.read_text() if self.soak.runs_file.exists() else ""
        for line in text.splitlines():
            tag, token, attempt, stamp, pid, ppid, kind, mode = line.split()
            if tag == "X":
                self.overlaps.append(f"{token} ({kind} {mode}) started at {stamp} beside another")
            elif tag == "S":
                run = Run(token, float(stamp), int(pid), int(ppid), kind, mode, attempt)
                self.runs[token].append(run)
                open_runs[(token, int(pid))] = run
            elif tag == "E":
                started = open_runs.pop((token, int(pid)), None)
                if started is None:
                    self.f.violate(f"an end record of {token} without its start")
                else:
                    started.end = float(stamp)
        all_runs = [r for runs in self.runs.values() for r in runs]
        self.f.counts["runs"] = (
            f"{len(all_runs)} ({sum(r.end is not None for r in all_runs)} completed, "
            f"{sum(r.end is None for r in all_runs)} interrupted)"
        )

    def load_logs(self) -> list[dict[str, Any]]:
        events = []
        tracebacks = 0
        for path in sorted(self.soak.dir.glob("*.log")):
            if path.name == "runs.log":
                continue
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the last line of a killed process
                    event["_log"] = path.name
                    events.append(event)
                elif "Traceback" in line:
                    tracebacks += 1
                    self.f.warnings.append(f"a traceback in {path.name}")
        kinds = Counter(e.get("event") for e in events)
        self.f.counts["log events"] = {
            k: kinds[k]
            for k in (
                "job_completed",
                "job_failed_retrying",
                "job_recovered",
                "job_handed_back",
                "pool_restarted",
                "job_exhausted_dead_letter",
            )
        }
        return events

    def load_states(self) -> dict[str, dict[str, Any]]:
        proc = subprocess.run(
            self.soak.cli("jobs", "--json", "--limit", str(len(self.jobs) + 1000)),
            capture_output=True,
            text=True,
            env=self.soak.env,
            check=True,
        )
        return {job["id"]: job for job in json.loads(proc.stdout)}

    def check_states(self, states: dict[str, dict[str, Any]]) -> None:
        counts: Counter[str] = Counter()
        for token, (job_id, _, _) in self.jobs.items():
            job = states.get(job_id)
            if job is None:
                self.f.violate(f"job {job_id} ({token}) is missing from the queue")
                continue
            counts[job["state"]] += 1
            completed = any(r.end is not None for r in self.runs.get(token, []))
            if job["state"] == "succeeded":
                if not completed:
                    self.f.violate(f"job {job_id} ({token}) succeeded without a completed run")
            elif job["state"] == "dead" and self.all_attempts_killed(job_id):
                counts["dead, every attempt killed"] += 1
            else:
                self.f.violate(
                    f"job {job_id} ({token}) ended {job['state']} (attempts {job['attempts']},"
                    f" last error {job.get('last_error')!r})"
                )
        self.f.counts["final states"] = dict(counts)

    def all_attempts_killed(self, job_id: str) -> bool:
        proc = subprocess.run(
            self.soak.cli("show", job_id, "--json"),
            capture_output=True,
            text=True,
            env=self.soak.env,
            check=True,
        )
        history = json.loads(proc.stdout)["attempt_history"]
        return all(a["outcome"] in KILLED_OUTCOMES for a in history)

    def check_runs(self, logs: list[dict[str, Any]]) -> None:
        handed_back: dict[str, list[float]] = defaultdict(list)
        for event in logs:
            if event.get("event") == "job_handed_back":
                handed_back[event["job_id"]].append(_stamp(event))
        reruns: Counter[str] = Counter()
        for token, runs in self.runs.items():
            if token not in self.jobs:
                self.f.violate(f"a run of unknown job {token}")
                continue
            job_id = self.jobs[token][0]
            runs.sort(key=lambda r: r.start)
            for before, after in itertools.pairwise(runs):
                reruns["reruns"] += 1
                if before.end is not None and before.end > after.start:
                    self.f.violate(f"job {job_id} ({token}) ran twice at once")
                kill = next(
                    (k for k in self.soak.kills if k.time <= after.start and k.interrupted(before)),
                    None,
                )
                if kill is not None:
                    reruns[f"after a {kill.what} kill"] += 1
                elif any(before.start <= t <= after.start for t in handed_back[job_id]):
                    reruns["after a hand-back (pool restart)"] += 1
                else:
                    self.f.violate(
                        f"job {job_id} ({token}) ran again at {after.start:.3f} though no kill "
                        f"interrupted its run at {before.start:.3f} (pid {before.pid})"
                    )
        self.f.counts["jobs run more than once"] = sum(len(r) > 1 for r in self.runs.values())
        self.f.counts["reruns"] = dict(reruns)
        self.f.counts["kills"] = dict(Counter(k.what for k in self.soak.kills))
        codes = Counter(d["code"] for d in self.soak.drains)
        self.f.counts["drains beside the supervisor"] = (
            f"{len(self.soak.drains)} (exit codes {dict(codes)})"
        )

    def check_overlaps(self) -> None:
        for text in self.overlaps:
            self.f.violate(f"barrier: {text} (flock check)")
        runs = sorted((r for rs in self.runs.values() for r in rs), key=lambda r: r.start)
        starts = [r.start for r in runs]
        reach = []  # the latest end among runs[:i]
        latest = float("-inf")
        for r in runs:
            reach.append(latest)
            latest = max(latest, r.end if r.end is not None else r.start)
        found = 0
        for i, r in enumerate(runs):
            if r.mode != "seq" or r.end is None:
                continue
            inside = bisect.bisect_left(starts, r.end) - (i + 1)
            if reach[i] > r.start or inside > 0:
                found += 1
                self.f.violate(
                    f"barrier: sequential {r.token} ran {r.start:.3f}-{r.end:.3f} beside"
                    f" another job (interval check)"
                )
        self.f.counts["sequential runs checked"] = sum(r.mode == "seq" for r in runs)

    def check_failures(self, logs: list[dict[str, Any]]) -> None:
        outcomes: Counter[str] = Counter()
        for event in logs:
            if event.get("event") in ("job_failed_retrying", "job_exhausted_dead_letter"):
                outcome = event.get("outcome", "?")
                outcomes[outcome] += 1
                if outcome not in KILLED_OUTCOMES:
                    self.f.violate(
                        f"attempt {event.get('attempt')} of {event.get('job_id')} failed "
                        f"({outcome}: {event.get('error')!r}) in {event['_log']}"
                    )
        self.f.counts["failed attempts by outcome"] = dict(outcomes)


def _stamp(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"]).timestamp()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to enqueue (1000)")
    parser.add_argument("--kills", type=int, default=5, help="supervisor SIGKILLs (5)")
    parser.add_argument("--child-kills", type=int, help="pool child SIGKILLs (default: --kills)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--workers", type=int, default=2, help="pool size (2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds from the start for the queue to empty (600)",
    )
    parser.add_argument("--enqueuers", type=int, default=3, help="enqueuing processes (3)")
    parser.add_argument(
        "--spread", type=float, help="seconds over which jobs are enqueued (default: jobs/100)"
    )
    parser.add_argument("--seq-ratio", type=float, default=0.1, help="share of sequential jobs")
    parser.add_argument("--max-sleep", type=float, default=0.02, help="longest job, seconds")
    parser.add_argument("--workdir", type=Path, help="keep logs and records here")
    parser.add_argument("--enqueuer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.child_kills is None:
        args.child_kills = args.kills
    if args.spread is None:
        args.spread = args.jobs / 100
    if args.jobs < 1 or args.enqueuers < 1 or args.workers < 1:
        parser.error("--jobs, --enqueuers and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.enqueuer:
        return run_enqueuer(json.loads(args.enqueuer))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="graphiti-mpq-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    try:
        code = soak.run()
    finally:
        if soak.supervisor is not None and soak.supervisor.poll() is None:
            soak.supervisor.kill()
            soak.supervisor.wait()
    if code == 0 and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
