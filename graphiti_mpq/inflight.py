"""Jobs handed to the pool, by chunk, and what their children have reported so far.

The serving loop hands parallel jobs to the pool in chunks (one pool task runs several short
jobs in a row), sized so that a chunk holds about ``CHUNK_SECONDS`` of work by what jobs of the
same type took before; a job type not seen yet goes alone. Each chunk reports through its own
slot of shared memory (``slots.py``); this module turns those reports into per-job state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from . import startlog
from .child import Chunk, Task
from .models import AttemptResult, QueuedJob
from .slots import Slots

#: About this much work (seconds, by past runs of the same job type) goes into one chunk.
CHUNK_SECONDS = 0.02
#: At most this many jobs in one chunk (and a claim takes at most this many per free slot):
#: only jobs of a few microseconds reach it. 128 made the no-op drain about 7 % faster (fewer
#: claims, pool tasks and outcome transactions) but the supervisor's RSS after 100,000 jobs
#: 1.24x its RSS after 1,000 instead of 1.17x (twice the jobs in flight, and Python's
#: allocator keeps the arenas a larger burst spread over): kept at 64.
CHUNK_MAX = 64
_SMOOTHING = 0.2  # weight of the newest run in a job type's running average


@dataclass
class Running:
    """A job handed to the pool, and what its child has told us."""

    job: QueuedJob
    dispatched: float
    limit: float
    chunk: InFlightChunk
    index: int
    pid: int | None = None
    pgid: int | None = None
    started: float | None = None
    awaited_since: float | None = None  # its chunk returned; its outcome comes as an event


@dataclass
class InFlightChunk:
    """One pool task: its slot, its jobs, and how far its child has got."""

    chunk_id: int
    slot: int
    jobs: list[Running] = field(default_factory=list)
    pid: int | None = None
    started: int = 0  # jobs of the chunk started so far
    offset: int = 0  # slot bytes read so far
    dead_since: float | None = None
    killed_for_time: bool = False  # we killed its child: a job over its time limit


class ChunkPlanner:
    """How many jobs go into each chunk, by how long jobs of each type took before."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def observe(self, job_type: str, seconds: float) -> None:
        old = self._seconds.get(job_type)
        self._seconds[job_type] = seconds if old is None else old + _SMOOTHING * (seconds - old)

    def plan(self, job_types: list[str], chunks: int) -> list[int]:
        """Sizes of at most ``chunks`` chunks for jobs of these types, in order."""
        sizes: list[int] = []
        size, spent = 0, 0.0
        for job_type in job_types:
            cost = self._seconds.get(job_type, CHUNK_SECONDS)
            if size and (spent + cost > CHUNK_SECONDS or size >= CHUNK_MAX):
                sizes.append(size)
                if len(sizes) == chunks:
                    return sizes
                size, spent = 0, 0.0
            size += 1
            spent += cost
        if size:
            sizes.append(size)
        return sizes[:chunks]


class InFlight:
    """Every job in the pool (``running``, by id) and the chunks they went in."""

    def __init__(self, slots: Slots, marks_dir: str | None = None) -> None:
        self.slots = slots
        self.running: dict[str, Running] = {}
        self.chunks: dict[int, InFlightChunk] = {}
        self._free = list(range(slots.count))
        self._ids = itertools.count(1)
        #: Where children mark the jobs they start (``startlog``); None: not kept.
        self.marks_dir = marks_dir
        #: Mark files of closed chunks, to remove once their outcomes are committed.
        self.closed_marks: list[str] = []
        #: Job id -> mark file of a closed chunk kept for that job, whose outcome is still on
        #: its way (as an event): without its mark, a crash now would hand it back uncounted.
        self._held_marks: dict[str, str] = {}
        #: Jobs whose command's process group was learnt since the last look, to record.
        self.spawned: list[Running] = []

    def free_slots(self) -> int:
        return len(self._free)

    def add(self, jobs: list[tuple[Task, QueuedJob, float]], now: float) -> tuple[int, Chunk]:
        """Record a chunk of (task, job, limit) about to be handed out; returns its id, task."""
        slot = self._free.pop()
        self.slots.reset(slot, len(jobs))
        chunk = InFlightChunk(next(self._ids), slot)
        for index, (_, job, limit) in enumerate(jobs):
            running = Running(job, now, limit, chunk, index)
            chunk.jobs.append(running)
            self.running[job.id] = running
        self.chunks[chunk.chunk_id] = chunk
        tasks = tuple(task for task, _, _ in jobs)
        return chunk.chunk_id, Chunk(chunk.chunk_id, slot, tasks, self._marks_file(chunk))

    def pending_in(self, chunk: InFlightChunk) -> list[Running]:
        """The chunk's jobs not settled yet."""
        return [r for r in chunk.jobs if self.running.get(r.job.id) is r]

    def read(self, chunk: InFlightChunk) -> tuple[list[tuple[Running, float, AttemptResult]], bool]:
        """New outcomes the chunk's child committed, and whether its child is new to us.

        Marks the job it runs now as started (with the child's own start time), and learns the
        process group of each command its jobs spawned (``spawned``).
        """
        slots = self.slots
        pid, started, started_at, committed = slots.progress(chunk.slot)
        new_child = bool(pid) and chunk.pid != pid
        if new_child:
            chunk.pid = pid
        if started > chunk.started:
            chunk.started = started
            current = chunk.jobs[started - 1]
            current.pid, current.started = pid, started_at
        spawn = slots.spawned(chunk.slot)
        if spawn is not None:
            self.learn_group(chunk.jobs[spawn[0]], spawn[1])
        records, chunk.offset = slots.records(chunk.slot, chunk.offset, committed)
        outcomes = []
        for index, seconds, pgid, result in records:
            running = chunk.jobs[index]
            if pgid is not None:
                self.learn_group(running, pgid)
            outcomes.append((running, seconds, result))
        return outcomes, new_child

    def learn_group(self, running: Running, pgid: int) -> None:
        """The process group of the command ``running`` spawned, if its attempt is not settled
        (a late word must not be recorded over a later attempt's row)."""
        if running.pgid is None and self.running.get(running.job.id) is running:
            running.pgid = pgid
            self.spawned.append(running)

    def current(self, chunk: InFlightChunk) -> Running | None:
        """The job the chunk's child runs now (started, not settled), if any."""
        if not chunk.started:
            return None
        running = chunk.jobs[chunk.started - 1]
        return running if self.running.get(running.job.id) is running else None

    def take_tail(self, chunk: InFlightChunk) -> list[Running]:
        """Take the jobs the chunk's child has not started away from it, so that a free child
        can run them now; [] when there are none, or the child is deciding its next start."""
        slots = self.slots
        if not slots.can_move_jobs() or not slots.lock(chunk.slot, wait=False):
            return []
        try:
            started = slots.progress(chunk.slot)[1]
            tail = [r for r in self.pending_in(chunk) if r.index >= started]
            if tail:
                slots.set_limit(chunk.slot, started)  # the child stops before them
        finally:
            slots.unlock(chunk.slot)
        return tail

    def close(self, chunk: InFlightChunk, awaited: list[Running] | None = None) -> None:
        """Its child no longer writes to its slot (the task returned, or the child is dead).

        ``awaited``: its jobs whose outcomes are still to come; its mark file stays until they
        are settled (``settled``)."""
        if self.chunks.pop(chunk.chunk_id, None) is not None:
            self._free.append(chunk.slot)
            path = self._marks_file(chunk)
            if path is not None and awaited:
                self._held_marks.update((running.job.id, path) for running in awaited)
            else:
                self._forget_marks(chunk)

    def settled(self, running: Running) -> None:
        """``running``'s outcome is about to be recorded: a mark file held for it goes once no
        other awaited job needs it."""
        path = self._held_marks.pop(running.job.id, None)
        if path is not None and path not in self._held_marks.values():
            self.closed_marks.append(path)

    def reset(self) -> None:
        """After the pool was replaced: every slot is free (settle the jobs first)."""
        for chunk in self.chunks.values():
            self._forget_marks(chunk)
        self.chunks.clear()
        self._free = list(range(self.slots.count))

    def _marks_file(self, chunk: InFlightChunk) -> str | None:
        if self.marks_dir is None:
            return None
        return startlog.chunk_file(self.marks_dir, chunk.chunk_id)

    def _forget_marks(self, chunk: InFlightChunk) -> None:
        path = self._marks_file(chunk)
        if path is not None:
            self.closed_marks.append(path)
