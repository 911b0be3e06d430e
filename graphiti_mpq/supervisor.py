"""The serving loop shared by ``supervise``, ``drain`` and the API's background worker.

One pass: take the next jobs the store allows (under the barrier, many in one transaction),
hand them to the pool in chunks, read what children report, catch crashed or overdue children,
record outcomes in one transaction, heartbeat and recover jobs of dead processes. The loop
itself never runs job code, and it alone touches the database and the barrier.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import procinfo, startlog, stopsignals
from .child import Task
from .config import Settings
from .errors import DatabaseBusyError
from .inflight import CHUNK_MAX, ChunkPlanner, InFlight, InFlightChunk, Running
from .logs import get_logger, held_lines
from .models import CLAIMED, AttemptResult, Outcome, QueuedJob
from .pool import Event, WorkerPool
from .storage.base import Finished, QueueBarrier, QueueListener, QueueStore

_DB_BUSY_PAUSE = 0.2  # after the database stayed busy past its timeout
_CHILD_CHECK = 0.05  # children are checked for crashes and time limits this often (busy)
_BUSY_TICK = 0.1  # how often running children are checked for crashes and time limits
_IDLE_POLL = 2.0  # slow fallback poll when no wake-up arrives
_BLOCKED_POLL = 0.1  # due jobs held back by another process (its barrier, its jobs)
_CRASH_CONFIRM = 0.5  # a dead child's result may still be in flight this long
_CRASH_DETAIL = 5.0  # how long we wait for the pool to collect a dead child's exit status
_STALL = 10.0  # a dispatched job no child has taken this long means a wedged pool
_MOVE_AFTER = 0.1  # a job running this long no longer holds up the jobs of its chunk
_REPLAY_BACKSTOP = 2.0  # a replay enforces its own limit; the loop steps in after this margin


@dataclass
class RunSummary:
    """What a run did: attempts that succeeded or failed, jobs that ended dead."""

    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    seconds: float = 0.0
    handed_back: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "dead": self.dead,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Stop:
    requested: int = 0  # signals (or stop calls) received
    grace_deadline: float | None = None


@dataclass
class Supervisor:
    """Serves one queue until stopped (``serve``) or until nothing is eligible (``drain``)."""

    queue: QueueStore
    settings: Settings
    kind: str = "supervise"
    mode: str = "serve"
    wait_retries: bool = False
    idle_exit: float | None = None
    on_progress: Any = None
    summary: RunSummary = field(default_factory=RunSummary)

    def __post_init__(self) -> None:
        self.log = get_logger(kind=self.kind)
        self._events: queue_mod.SimpleQueue[Event] = queue_mod.SimpleQueue()
        self._inflight: InFlight | None = None
        self._running: dict[str, Running] = {}
        self._planner = ChunkPlanner()
        self._results: list[tuple[Running, AttemptResult]] = []
        #: Replayed commands' processes, recorded for crash recovery with the next flush.
        self._spawns: list[tuple[QueuedJob, int, int | None]] = []
        self._seq_waiting: QueuedJob | None = None
        self._stop = _Stop()
        self._owner = 0
        self._pool: WorkerPool | None = None
        self._barrier: QueueBarrier | None = None
        self._next_heartbeat = 0.0
        self._next_child_check = 0.0
        self._last_activity = time.monotonic()
        self._barrier_logged = False
        self._pool_suspect = False  # a child died without a job: the pool may be wedged
        self._ended_in_job: set[int] = set()  # children that died (or we killed) in a job
        self._awaited: list[Running] = []  # outcomes on their way as events (see _check_awaited)
        self.ready = threading.Event()

    # -- control ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: graceful stop; second: hard stop. Safe from a signal handler."""
        self._stop.requested += 1
        self._events.put(("stop",))

    def install_signal_handlers(self) -> None:
        def handle(signum: int, frame: object) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        for _ in range(stopsignals.take()):  # asked to stop while the command was starting
            self.request_stop()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> RunSummary:
        began = time.monotonic()
        settings = self.settings
        self._owner = self.queue.register_process(self.kind, settings.host_id, settings.lease)
        listener = self.queue.wake_listener()
        waker = threading.Thread(target=self._listen, args=(listener,), daemon=True)
        self._pool = WorkerPool(
            settings.workers, settings.start_method, settings.imports, self._events
        )
        self._inflight = InFlight(self._pool.slots, self._prepare_start_marks())
        self._running = self._inflight.running
        self._barrier = self.queue.barrier()
        self.log.info(
            "supervisor_started",
            pid=os.getpid(),
            workers=settings.workers,
            queue=self.queue.display_location,
            start_method=settings.start_method,
            mode=self.mode,
        )
        waker.start()
        try:
            self._heartbeat(force=True)
            self.ready.set()
            self._loop()
        finally:
            self._shutdown(listener)
            self.summary.seconds = time.monotonic() - began
            self.log.info("supervisor_stopped", **self.summary.to_json())
        return self.summary

    def _prepare_start_marks(self) -> str | None:
        """The folder where children mark each start, so that if we are killed, recovery
        charges an attempt only to jobs that started (``startlog``)."""
        directory = self.queue.start_marks_dir(self._owner)
        if directory is None:
            return None
        try:
            startlog.prepare(directory)
        except OSError as exc:
            self.log.warning("start_marks_unavailable", error=str(exc))
            return None
        return directory

    def _loop(self) -> None:
        while True:
            try:
                if self._pass():
                    return
            except DatabaseBusyError as exc:
                # Another process held the write lock past the busy timeout: every step of a
                # pass can be retried, so wait a moment and go on serving.
                self.log.warning("database_busy", error=exc.message)
                time.sleep(_DB_BUSY_PAUSE)

    def _pass(self) -> bool:
        """One turn of the loop; True when the loop is done."""
        now = time.monotonic()
        self._check_barrier()
        if self._stop.requested and self._stop.grace_deadline is None:
            self._begin_stop(now)
        if self._stop.grace_deadline is not None:
            if not self._running and not self._results:
                return True
            if self._stop.requested > 1 or now >= self._stop.grace_deadline:
                self._hard_stop()
                return True
        else:
            self._fill()
            if self._finished_serving(now):
                return True
        self._collect(self._wait_time())
        self._read_slots()
        if time.monotonic() >= self._next_child_check:
            self._next_child_check = time.monotonic() + _CHILD_CHECK
            self._check_children()
        self._flush()
        self._heartbeat()
        return False

    def _wait_time(self) -> float:
        if self._running or self._seq_waiting is not None or self._results:
            return _BUSY_TICK
        wait = min(_IDLE_POLL, max(0.0, self._next_heartbeat - time.monotonic()))
        due = self.queue.next_run_at()
        if due is not None:
            # Due already and still not claimed: another process holds the barrier or runs the
            # jobs ahead. Its release pokes nobody, so poll, but gently.
            ahead = due - time.time()
            wait = min(wait, _BLOCKED_POLL if ahead <= 0 else max(0.005, ahead))
        return wait

    def _listen(self, listener: QueueListener) -> None:
        while self._pool is not None or not self.ready.is_set():
            try:
                if listener.wait(1.0):
                    self._events.put(("wake",))
            except (OSError, ValueError):
                return

    # -- claiming and dispatch -------------------------------------------------------------

    def _fill(self) -> None:
        assert self._barrier is not None and self._inflight is not None
        if self._seq_waiting is not None:
            self._start_sequential()
            return
        free = self._inflight.free_slots()
        if free < (self.settings.workers if self._running else 1):
            return  # claim in batches: one transaction for many jobs, not one per job
        if any(not r.job.parallel for r in self._running.values()):
            return
        if self._barrier.mode == "exclusive":
            return  # a sequential job's outcome is not recorded yet (the database was busy)
        if not self._barrier.try_shared():
            return  # another process runs a sequential job
        planner = self._planner
        jobs = self.queue.claim(
            self._owner,
            free * CHUNK_MAX,
            self.settings.lease,
            start=True,
            take=lambda job_types: sum(planner.plan(job_types, free)),
        )
        if not jobs:
            self._release_barrier_if_idle()
            return
        self._last_activity = time.monotonic()
        self.log.info("jobs_claimed", count=len(jobs), first_job_id=jobs[0].id)
        if jobs[0].state == CLAIMED:
            self._barrier.release()  # claim() gives a sequential job only when nothing runs
            self._seq_waiting = jobs[0]
            self._start_sequential()
            return
        self._dispatch(jobs)

    def _start_sequential(self) -> None:
        assert self._barrier is not None and self._seq_waiting is not None
        job = self._seq_waiting
        if not self._barrier.acquire_exclusive(timeout=0.05):
            if not self._barrier_logged:
                self.log.info("barrier_wait", job_id=job.id, job_type=job.job_type)
                self._barrier_logged = True
            return
        self._barrier_logged = False
        started = self.queue.start_claimed(self._owner, [job], self.settings.lease)
        self._seq_waiting = None
        if started:
            self._dispatch(started)
        else:
            self._barrier.release()

    def _check_barrier(self) -> None:
        """A barrier hold lost with its connection (PostgreSQL) no longer keeps other hosts
        out: stop every job running under it and hand it back (not counted) before the
        barrier is taken again (contract, Crash safety)."""
        barrier = self._barrier
        if barrier is None or barrier.mode is None or barrier.healthy():
            return
        assert self._pool is not None
        victims = list(self._running.values())
        self.log.warning("barrier_lost", mode=barrier.mode, running=len(victims))
        if victims:
            self._take_back_all(self._pool.restart, "barrier connection lost")
            self._flush()
        barrier.release()

    def _dispatch(self, jobs: list[QueuedJob]) -> None:
        """Hand claimed jobs to the pool in chunks, as the planner sized them for the claim."""
        assert self._inflight is not None
        sizes = self._planner.plan([job.job_type for job in jobs], self._inflight.free_slots())
        sizes[-1] += len(jobs) - sum(sizes)  # (the claim took exactly these; never leave any)
        start = 0
        for size in sizes:
            self._submit(jobs[start : start + size])
            start += size

    def _submit(self, jobs: list[QueuedJob]) -> None:
        assert self._pool is not None and self._inflight is not None
        entries = []
        for job in jobs:
            limit = job.timeout if job.timeout is not None else self.settings.job_timeout
            self.log.debug("job_dispatched", parallel=job.parallel, **job.log_context())
            task = Task(
                job.id, job.job_type, job.payload, job.attempts, limit, self.settings.program
            )
            entries.append((task, job, limit))
        chunk_id, chunk = self._inflight.add(entries, time.monotonic())
        self._pool.submit(chunk_id, chunk)

    def _move_waiting_jobs(self, now: float) -> None:
        """A free child takes the next parallel job at once (contract): jobs waiting in a chunk
        behind a long job are moved to a chunk of their own when a child has nothing to do."""
        assert self._inflight is not None
        chunks = list(self._inflight.chunks.values())
        if not self._inflight.free_slots() or any(c.pid is None for c in chunks):
            return  # no slot for them, or a chunk is already waiting for the free child
        busy = [c for c in chunks if self._inflight.current(c) is not None]
        if len(busy) >= self.settings.workers:
            return
        for chunk in busy:
            running = self._inflight.current(chunk)
            if running is None or running.started is None or now - running.started < _MOVE_AFTER:
                continue
            tail = self._inflight.take_tail(chunk)
            if tail:
                self.log.debug("jobs_moved", count=len(tail), behind=running.job.id)
                self._submit([r.job for r in tail])
                return  # one chunk per check: it takes the free child

    def _release_barrier_if_idle(self) -> None:
        if not self._running and self._seq_waiting is None and self._barrier is not None:
            self._barrier.release()

    # -- events from children and the pool -------------------------------------------------

    def _collect(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout)
        except queue_mod.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self._events.get_nowait()
            except queue_mod.Empty:
                return

    def _handle(self, event: Event) -> None:
        kind = event[0]
        if kind == "wake":
            self.queue.ingest_spool()  # a busy enqueue may have spooled, then poked
            return
        if kind == "stop":
            return
        assert self._inflight is not None
        if kind in ("chunk", "chunk_error"):
            chunk = self._inflight.chunks.get(event[1])
            if chunk is not None:  # else settled already (its child died, the pool restarted)
                self._chunk_returned(chunk, event[2] if kind == "chunk" else None, event[2])
            return
        running = self._running.get(event[2])
        if running is None or running.chunk.chunk_id != event[1]:
            return  # a late report of an attempt already settled (timed out, crashed)
        if kind == "result":
            if event[4] is not None:
                self._inflight.learn_group(running, event[4])
            self._settle(running, event[3])

    def _read_slots(self) -> None:
        assert self._inflight is not None
        for chunk in list(self._inflight.chunks.values()):
            self._read_chunk(chunk)

    def _read_chunk(self, chunk: InFlightChunk) -> None:
        """Settle the outcomes a chunk's child committed; learn which job it runs now."""
        assert self._inflight is not None
        outcomes, new_child = self._inflight.read(chunk)
        if new_child and self._pool is not None:
            self._pool.refresh()  # know this child's Process now: its exit status if it dies
        for running, seconds, result in outcomes:
            self._planner.observe(running.job.job_type, seconds)
            if self._running.get(running.job.id) is running:
                self._settle(running, result)

    def _chunk_returned(self, chunk: InFlightChunk, started: int | None, error: str) -> None:
        """The pool task ended: jobs it did not start (a stop began) go back untouched."""
        assert self._inflight is not None
        self._read_chunk(chunk)
        awaited: list[Running] = []
        for running in self._inflight.pending_in(chunk):
            if started is None:  # the task raised instead of returning: nothing to retry on
                self._settle(running, AttemptResult(Outcome.FAILED, error=error))
            elif running.index >= started:
                self._settle(
                    running,
                    AttemptResult(
                        Outcome.HANDED_BACK, error="not started: the supervisor is stopping"
                    ),
                )
            else:  # its outcome did not fit the slot and is on its way as a "result" event
                running.awaited_since = time.monotonic()
                self._awaited.append(running)
                awaited.append(running)
        self._inflight.close(chunk, awaited)

    def _settle(self, running: Running, result: AttemptResult) -> None:
        self._running.pop(running.job.id, None)
        self._results.append((running, result))
        if running.awaited_since is not None and self._inflight is not None:
            self._inflight.settled(running)

    def _check_children(self) -> None:
        assert self._pool is not None and self._inflight is not None
        now = time.monotonic()
        ended = self._ended_in_job
        chunks = self._inflight.chunks
        for chunk in list(chunks.values()):
            if chunk.pid is None:
                continue  # no child has taken it yet
            crashed = self._pool.exit_of(chunk.pid)
            if crashed is not None:
                known = crashed.signal is not None or crashed.exit_code is not None
                if chunk.dead_since is None:
                    chunk.dead_since = now
                elif now - chunk.dead_since >= (_CRASH_CONFIRM if known else _CRASH_DETAIL):
                    self._end_dead_chunk(chunk, crashed)
                    ended.add(chunk.pid)
                continue
            running = self._inflight.current(chunk)
            if running is None or running.started is None:
                continue
            margin = _REPLAY_BACKSTOP if running.pgid is not None else 0.0
            if now - running.started > running.limit + margin:
                self._read_chunk(chunk)  # it may have finished and moved on since the pass began
                if self._inflight.current(chunk) is not running:
                    continue
                self._kill_group(running)
                self._pool.kill_child(chunk.pid)
                chunk.killed_for_time = True
                ended.add(chunk.pid)
                self._settle(
                    running,
                    AttemptResult(Outcome.TIMEOUT, error=f"timed out after {running.limit:g}s"),
                )
        self._check_awaited(now)
        self._move_waiting_jobs(now)
        dropped = self._pool.forget_dead({c.pid for c in chunks.values() if c.pid is not None})
        unexpected = set(dropped) - ended
        ended.difference_update(dropped)
        if unexpected:
            # Died without a job we know of (killed while idle, or before it reported a
            # start): it may have taken the pool's task lock with it.
            self.log.warning("pool_child_died", pids=sorted(unexpected))
            self._pool_suspect = True
        self._check_stall(now)

    def _check_awaited(self, now: float) -> None:
        """An outcome sent as an event (too large for its slot) can be lost with a child
        killed while sending it: give up on it after a while (the attempt counts, it retries)."""
        if not self._awaited:
            return
        waiting = []
        for running in self._awaited:
            if self._running.get(running.job.id) is not running:
                continue  # it arrived
            assert running.awaited_since is not None
            if now - running.awaited_since < _CRASH_DETAIL:
                waiting.append(running)
                continue
            self._settle(
                running,
                AttemptResult(Outcome.LOST, error="lost: its outcome never reached the supervisor"),
            )
        self._awaited = waiting

    def _end_dead_chunk(self, chunk: InFlightChunk, crashed: AttemptResult) -> None:
        """A chunk's child died: what it committed stands, the job it ran crashed, the jobs
        after it never started (they go back without using an attempt)."""
        assert self._inflight is not None
        self._read_chunk(chunk)
        for running in self._inflight.pending_in(chunk):
            if running.index < chunk.started:
                self._kill_group(running)
                if running.pgid is None:  # a command it spawned but had not reported yet
                    for pgid in procinfo.job_process_groups(running.job.id):
                        procinfo.kill_process_group(pgid)
                if chunk.killed_for_time:
                    # It had just moved on when we killed it for the job before: not its fault.
                    self._settle(
                        running,
                        AttemptResult(
                            Outcome.HANDED_BACK,
                            error="not finished: its worker was stopped for another job's limit",
                        ),
                    )
                    continue
                self._settle(running, crashed)
            else:
                self._settle(
                    running,
                    AttemptResult(
                        Outcome.HANDED_BACK, error="not started: its worker process died"
                    ),
                )
        self._inflight.close(chunk)

    def _check_stall(self, now: float) -> None:
        """A child killed while idle can wedge ``Pool`` (it held the task lock): restart it.

        After such a death, at once if no job runs in a child (nothing is lost: jobs the pool
        still holds go back to the queue untouched); otherwise once dispatched chunks have
        waited for a child for ``_STALL`` seconds although a child should be free.
        """
        assert self._pool is not None and self._inflight is not None
        chunks = list(self._inflight.chunks.values())
        waiting = [c for c in chunks if c.pid is None]
        # A chunk whose jobs are all settled is not work: its child may be stuck returning it
        # (a child killed while sending its result holds the pool's result lock for good).
        busy = sum(1 for c in chunks if c.pid is not None and self._inflight.pending_in(c))
        if not (self._pool_suspect and busy == 0):
            if not waiting or busy >= self.settings.workers:
                return
            if now - min(c.jobs[0].dispatched for c in waiting) < _STALL:
                return
        self.log.warning("pool_restarted", waiting=len(waiting), busy=busy)
        self._pool_suspect = False
        self._ended_in_job.clear()
        self._take_back_all(self._pool.restart, "pool restarted")

    def _take_back_all(self, kill: Callable[[], None], error: str) -> None:
        """Record what children finished, ``kill`` every child, hand the other jobs back.

        Outcomes are read before the kill: a job the kill itself ends must not count."""
        assert self._inflight is not None
        self._read_slots()
        kill()
        for running in list(self._running.values()):
            self._kill_group(running)
            self._settle(running, AttemptResult(Outcome.HANDED_BACK, error=error))
        self._inflight.reset()

    @staticmethod
    def _kill_group(running: Running) -> None:
        """Kill what the attempt started: the replayed command's group, the child's group."""
        if running.pgid is not None:
            procinfo.kill_process_group(running.pgid)
        if running.pid is not None:
            procinfo.kill_process_group(running.pid)

    # -- recording outcomes ----------------------------------------------------------------

    def _flush(self) -> None:
        assert self._inflight is not None
        if self._inflight.spawned:
            self._spawns += [
                (r.job, r.chunk.pid, r.pgid) for r in self._inflight.spawned if r.chunk.pid
            ]
            self._inflight.spawned.clear()
        if self._spawns:
            spawns, self._spawns = self._spawns, []
            try:
                self.queue.record_processes(spawns)
            except BaseException:
                self._spawns = spawns + self._spawns
                raise
        if not self._results:
            self._discard_start_marks()
            return
        results, self._results = self._results, []
        by_id = {r.job.id: (r, res) for r, res in results}
        try:
            finished = self.queue.finish(
                [(r.job, res) for r, res in results],
                max_retries=self.settings.max_retries,
                backoff_base=self.settings.backoff_base,
                owner=self._owner,
            )
        except BaseException:
            self._results = results + self._results  # nothing was recorded: try again
            raise
        self._last_activity = time.monotonic()
        self._discard_start_marks()
        with held_lines():  # one write for the batch's lines, not a flushed write each
            for item in finished:
                running, result = by_id[item.job.id]
                self._log_outcome(item, result, running)
        if self._barrier is not None and self._barrier.mode == "exclusive":
            # A sequential job ended: let others in at once. A shared hold is kept until a
            # claim finds nothing, so a busy queue does not retake it for every batch.
            self._release_barrier_if_idle()
        if self.on_progress is not None:
            self.on_progress(len(finished))

    def _discard_start_marks(self) -> None:
        """Closed chunks' outcomes are committed: their start marks are no longer needed."""
        if self._inflight is not None and self._inflight.closed_marks:
            for path in self._inflight.closed_marks:
                startlog.discard(path)
            self._inflight.closed_marks.clear()

    def _log_outcome(self, item: Finished, result: AttemptResult, running: Running | None) -> None:
        context = item.job.log_context()
        summary = self.summary
        if running is not None and running.pgid is not None:
            self.log.info(
                "command_replayed",
                exit_code=result.exit_code,
                outcome=result.outcome.value,
                **context,
            )
        if item.disposition == "succeeded":
            summary.succeeded += 1
            self.log.info("job_completed", **context)
        elif item.disposition == "handed_back":
            summary.handed_back += 1
            self.log.info("job_handed_back", **context)
        elif item.disposition == "retry":
            summary.failed += 1
            self.log.warning(
                "job_failed_retrying",
                outcome=item.outcome.value,
                error=item.error,
                retry_in=item.delay,
                **context,
            )
        else:
            summary.failed += 1
            summary.dead += 1
            self.log.error(
                "job_exhausted_dead_letter", outcome=item.outcome.value, error=item.error, **context
            )

    # -- liveness and recovery -------------------------------------------------------------

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + max(0.05, min(self.settings.lease / 3, 10.0))
        self.queue.heartbeat(self._owner, self.settings.lease)
        self.queue.ingest_spool()
        recovered = self.queue.recover(
            self.settings.host_id,
            kill=self._kill_recorded,
            exclude_owner=self._owner,
            max_retries=self.settings.max_retries,
            backoff_base=self.settings.backoff_base,
        )
        for item in recovered:
            self.log.warning(
                "job_recovered", was_running=item.was_running, **item.job.log_context()
            )
            if item.finished is not None:
                self._log_outcome(item.finished, AttemptResult(item.finished.outcome), None)

    def _kill_recorded(self, row: dict[str, Any]) -> None:
        """Before a job is taken back, no code of its interrupted attempt may still run.

        Only what provably belongs to the attempt is killed: the pool child must still be the
        same process (pid and start time); the command's process group must still run this job
        (a member's environment names it), since its number may since have been reused by an
        unrelated group (long after, or after a reboot).
        """
        if row.get("owner_host") != self.settings.host_id:
            return
        # The command's group as recorded, or found by its environment if it was never recorded.
        for pgid in procinfo.job_process_groups(str(row["id"])):
            procinfo.kill_process_group(pgid)
        worker = row.get("worker_pid")
        if worker and procinfo.is_alive(int(worker), row.get("worker_start")):
            procinfo.kill_process_group(int(worker))  # it leads a group: what its handler started
            try:
                os.kill(int(worker), signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- stopping --------------------------------------------------------------------------

    def _finished_serving(self, now: float) -> bool:
        if self._running or self._seq_waiting is not None or self._results:
            return False
        if self.mode == "drain":
            due = self.queue.next_run_at()
            if due is not None and due <= time.time():
                return False  # held back by the barrier of another process: wait for it
            return not (self.wait_retries and self.queue.next_run_at(retries_only=True))
        return self.idle_exit is not None and now - self._last_activity > self.idle_exit

    def _begin_stop(self, now: float) -> None:
        if self._pool is not None:
            self._pool.stop_starting()
        if self._seq_waiting is not None:
            self.queue.release_claimed(self._owner, [self._seq_waiting])
            self._seq_waiting = None
        self._stop.grace_deadline = now + self.settings.grace  # last: the above may be retried
        self.log.info("supervisor_stopping", running=len(self._running), grace=self.settings.grace)

    def _hard_stop(self) -> None:
        assert self._pool is not None
        pgids = [r.pgid for r in self._running.values() if r.pgid is not None]
        pool = self._pool
        self._take_back_all(lambda: pool.kill_all(pgids), "stopped by a supervisor stop")
        self._flush()

    def _shutdown(self, listener: QueueListener) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            if self._running or self._results:
                self._hard_stop_pool(pool)
            pool.shutdown()
        if self._barrier is not None:
            self._barrier.close()
        listener.close()
        try:
            self.queue.unregister_process(self._owner)
        except Exception as exc:  # the stop must finish even if the database is gone
            self.log.warning("unregister_failed", error=str(exc))
        else:
            if self._inflight is not None and self._inflight.marks_dir is not None:
                startlog.remove_owner(self._inflight.marks_dir)

    def _hard_stop_pool(self, pool: WorkerPool) -> None:
        pgids = [r.pgid for r in self._running.values() if r.pgid is not None]
        self._take_back_all(lambda: pool.kill_all(pgids), "supervisor stopped")
        for tries_left in (2, 1, 0):
            try:
                self._flush()
                return
            except DatabaseBusyError as exc:
                if not tries_left:
                    self.log.warning("hand_back_failed", error=exc.message)
                    return
                time.sleep(_DB_BUSY_PAUSE)
            except Exception as exc:
                self.log.warning("hand_back_failed", error=str(exc))
                return
