"""How the serving loop learns what a chunk's child did, from the chunk's shared-memory slot
(``slots.py``, ``inflight.py``): a child and a parent in one process, on real shared memory."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphiti_mpq import JobQueue
from graphiti_mpq.child import Task
from graphiti_mpq.inflight import InFlight
from graphiti_mpq.models import AttemptResult, Outcome, QueuedJob
from graphiti_mpq.slots import Slots, SlotWriter


def _jobs(tmp_path: Path, count: int) -> list[QueuedJob]:
    queue = JobQueue(str(tmp_path / "q.db")).open()
    for i in range(count):
        queue.enqueue("replay", {"command": "ok", "args": [str(i)]}, parallel=True)
    owner = queue.register_process("test", "host", 60.0)
    jobs = queue.claim(owner, count, 60.0)
    queue.close()
    return jobs


@pytest.fixture
def inflight() -> Iterator[InFlight]:
    slots = Slots(multiprocessing.get_context("fork"), 2)
    yield InFlight(slots)
    slots.close()


def _chunk(inflight: InFlight, jobs: list[QueuedJob]) -> tuple[int, int]:
    entries = [(Task(j.id, j.job_type, j.payload, 1, None, "prog"), j, 10.0) for j in jobs]
    chunk_id, chunk = inflight.add(entries, 0.0)
    return chunk_id, chunk.slot


@pytest.mark.parametrize("read_every_step", [True, False])
def test_each_job_gets_the_group_its_command_ran_in(
    tmp_path: Path, inflight: InFlight, read_every_step: bool
) -> None:
    """Read at every step or only at the end, each job is paired with its own command's group,
    learnt once, and the outcome of each job comes back with it."""
    jobs = _jobs(tmp_path, 3)
    chunk_id, slot = _chunk(inflight, jobs)
    chunk = inflight.chunks[chunk_id]
    writer = SlotWriter(inflight.slots, slot, os.getpid())
    outcomes = []
    for index, pgid in enumerate((101, 202, 303)):
        assert writer.start(index)
        writer.spawned(index, pgid)
        if read_every_step:
            outcomes += inflight.read(chunk)[0]
        assert writer.finish(index, 0.01, AttemptResult(Outcome.SUCCEEDED, exit_code=0))
        if read_every_step:
            outcomes += inflight.read(chunk)[0]
    outcomes += inflight.read(chunk)[0]
    assert [r.job.id for r, _, _ in outcomes] == [j.id for j in jobs]
    assert [r.pgid for r, _, _ in outcomes] == [101, 202, 303]
    assert sorted(r.job.id for r in inflight.spawned) == sorted(j.id for j in jobs)


def test_a_group_reported_after_its_attempt_was_settled_is_not_recorded(
    tmp_path: Path, inflight: InFlight
) -> None:
    """A late report (the attempt was killed for time, say) must not be written over the row
    of a later attempt of the same job."""
    (job,) = _jobs(tmp_path, 1)
    chunk_id, slot = _chunk(inflight, [job])
    chunk = inflight.chunks[chunk_id]
    writer = SlotWriter(inflight.slots, slot, os.getpid())
    assert writer.start(0)
    inflight.read(chunk)
    del inflight.running[job.id]  # settled: the loop gave up on it
    writer.spawned(0, 404)
    inflight.read(chunk)
    assert inflight.spawned == []
    assert chunk.jobs[0].pgid is None


def test_a_chunks_start_marks_stay_until_its_awaited_outcomes_are_settled(tmp_path: Path) -> None:
    """A closed chunk's mark file is let go with its outcomes; but while an outcome too large
    for the slot is still on its way, a crash would hand that job back without counting its
    attempt: the file stays until the last such job is settled."""
    jobs = _jobs(tmp_path, 3)
    slots = Slots(multiprocessing.get_context("fork"), 2)
    try:
        inflight = InFlight(slots, marks_dir=str(tmp_path / "marks"))
        _, done_slot = _chunk(inflight, jobs[:1])
        chunk_id, _ = _chunk(inflight, jobs[1:])
        done = next(c for c in inflight.chunks.values() if c.slot == done_slot)
        inflight.close(done)
        assert len(inflight.closed_marks) == 1  # nothing awaited: let go at once
        chunk = inflight.chunks[chunk_id]
        first, second = chunk.jobs
        inflight.close(chunk, [first, second])
        assert len(inflight.closed_marks) == 1
        inflight.settled(first)
        assert len(inflight.closed_marks) == 1  # the second still needs it
        inflight.settled(second)
        assert len(inflight.closed_marks) == 2
        assert inflight.closed_marks[1] != inflight.closed_marks[0]
        inflight.settled(second)  # settled twice (a late event): nothing more
        assert len(inflight.closed_marks) == 2
    finally:
        slots.close()
