"""What every backend provides: the store, its barrier and its wake-up listener, as protocols.

``JobQueue`` (SQLite) and ``PostgresQueue`` both satisfy :class:`QueueStore`; the serving loop
and the CLI are typed against these protocols, so the backend is chosen once, at open
(``storage.open_queue``). The value types the store returns beside the models live here too.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import WrongStateError
from ..models import (
    CLAIMED,
    Attempt,
    AttemptResult,
    DeadLetterJob,
    Outcome,
    QueuedJob,
    QueueStats,
    SupervisorInfo,
)

#: Given the job types of the parallel jobs a claim could take, how many it takes (>= 1).
Take = Callable[[list[str]], int]


def parallel_run(head: list[tuple[Any, Any, str]]) -> list[tuple[Any, Any, str]]:
    """The leading (seq, parallel, job_type) rows up to the first sequential job."""
    run = []
    for row in head:
        if not row[1]:
            break
        run.append(row)
    return run


def taken(take: Take | None, job_types: list[str]) -> int:
    """How many of a claim's parallel jobs to take: all, or what ``take`` says (at least one)."""
    if take is None or not job_types:
        return len(job_types)
    return max(1, min(len(job_types), take(job_types)))


@dataclass(frozen=True)
class Finished:
    """What recording an attempt's outcome did to its job."""

    job: QueuedJob
    outcome: Outcome
    #: 'succeeded', 'retry', 'dead' or 'handed_back'
    disposition: str
    delay: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Recovered:
    """A job taken back from a dead or silent owner."""

    job: QueuedJob
    was_running: bool
    finished: Finished | None


@dataclass(frozen=True)
class Waiting:
    """Why a pending job has not started."""

    reason: str  # delay, retry, barrier, queue
    until: float | None
    ahead: int

    def to_json(self) -> dict[str, Any]:
        from ..timefmt import iso

        return {"reason": self.reason, "until": iso(self.until), "ahead": self.ahead}


def supervisor_info(row: Mapping[str, Any], host: str, now: float) -> SupervisorInfo:
    """A ``processes`` row as users see it: alive means a heartbeat younger than its lease and,
    on this host, a live pid with the same start time (both backends decide it alike)."""
    from ..procinfo import is_alive

    fresh = now - row["last_heartbeat"] < (row["lease"] or 60.0)
    alive = fresh and (row["host"] != host or is_alive(row["pid"], row["pid_start"]))
    return SupervisorInfo(
        id=row["id"],
        host=row["host"],
        pid=row["pid"],
        kind=row["kind"],
        started_at=row["started_at"],
        last_heartbeat=row["last_heartbeat"],
        jobs_done=row["jobs_done"],
        stopped_at=row["stopped_at"],
        alive=alive,
    )


class _ClaimsAndFinishes(Protocol):
    """What ``ConsumerApi`` needs of a store."""

    _api_owner: int | None

    def register_process(self, kind: str, host: str, lease: float) -> int: ...

    def claim(
        self,
        owner: int,
        max_items: int,
        lease: float,
        *,
        start: bool = True,
        take: Take | None = None,
    ) -> list[QueuedJob]: ...

    def start_claimed(self, owner: int, jobs: list[QueuedJob], lease: float) -> list[QueuedJob]: ...

    def finish(
        self,
        results: Iterable[tuple[QueuedJob, AttemptResult]],
        *,
        max_retries: int | None = None,
        backoff_base: float | None = None,
        owner: int | None = None,
        force_dead: bool = False,
    ) -> list[Finished]: ...


class ConsumerApi:
    """The seed's consumer calls (``get_batch``/``ack``/``nack``/``move_to_dead_letter``), built
    on ``claim`` and ``finish`` alone, so every backend shares them. The caller is registered
    as a process of kind ``api`` on first use."""

    _api_owner: int | None = None

    def _api_owner_id(self: _ClaimsAndFinishes) -> int:
        if self._api_owner is None:
            self._api_owner = self.register_process("api", socket.gethostname(), 3600.0)
        return self._api_owner

    def get_batch(self: _ClaimsAndFinishes, max_items: int = 1) -> list[QueuedJob]:
        """Claim and start the next jobs: one sequential job, or consecutive parallel ones."""
        owner = ConsumerApi._api_owner_id(self)
        jobs = self.claim(owner, max_items, 3600.0, start=True)
        if jobs and jobs[0].state == CLAIMED:
            jobs = self.start_claimed(owner, jobs, 3600.0)
        return jobs

    def ack(self: _ClaimsAndFinishes, job: QueuedJob, result: Any = None) -> None:
        _finish_one(self, job, AttemptResult(Outcome.SUCCEEDED, result=result))

    def nack(self: _ClaimsAndFinishes, job: QueuedJob, error: str) -> None:
        """Fail the attempt: a retry after the backoff, or the dead-letter table."""
        _finish_one(self, job, AttemptResult(Outcome.FAILED, error=error))

    def move_to_dead_letter(self: _ClaimsAndFinishes, job: QueuedJob, error: str) -> None:
        """Fail the attempt and dead-letter the job now, whatever retries it has left."""
        _finish_one(self, job, AttemptResult(Outcome.FAILED, error=error), force_dead=True)


def _finish_one(
    store: _ClaimsAndFinishes, job: QueuedJob, result: AttemptResult, force_dead: bool = False
) -> None:
    # Only the owner that claimed it may finish it: after a recovery another process may run
    # the job again, and a late ack must not record that process's attempt.
    if not store.finish([(job, result)], force_dead=force_dead, owner=job.owner):
        raise WrongStateError(f"job {job.id} is not running")


class QueueBarrier(Protocol):
    """The barrier of a queue across every process that serves it.

    Held *shared* while parallel jobs run and *exclusive* while a sequential job runs. On
    SQLite a file lock (this host); on PostgreSQL a session advisory lock (every host), which
    the server drops when the holding connection goes: ``healthy()`` then turns False and the
    holder must stop the jobs running under it before it takes the barrier again.
    """

    #: None, "shared" or "exclusive"
    mode: str | None

    def try_shared(self) -> bool:
        """Hold shared without waiting; False while another process holds it exclusive."""
        ...

    def acquire_exclusive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the exclusive hold; False if not granted."""
        ...

    def release(self) -> None:
        """Give up the hold (a no-op when nothing is held)."""
        ...

    def healthy(self) -> bool:
        """False once a hold was lost (its connection died); True again after ``release``."""
        ...

    def close(self) -> None: ...


class QueueListener(Protocol):
    """Where an idle serving process waits for enqueues."""

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds; True when poked (or when a poke may have been
        missed). Raises ``ValueError`` or ``OSError`` once closed."""
        ...

    def close(self) -> None: ...


class QueueStore(Protocol):
    """The job store of one queue; every method is one transaction."""

    backend: str
    location: str
    capacity: int
    max_retries: int
    backoff_base: float

    @property
    def display_location(self) -> str:
        """The location for messages and logs (a URL's password masked)."""
        ...

    def open(self) -> QueueStore: ...

    def close(self) -> None: ...

    def barrier(self) -> QueueBarrier: ...

    def wake_listener(self) -> QueueListener: ...

    def start_marks_dir(self, owner: int) -> str | None:
        """Where ``owner``'s children mark the jobs they start (``startlog``); None: no marks."""
        ...

    # -- enqueue
    def enqueue(
        self, job_type: str, payload: dict[str, Any], parallel: bool = False, **options: Any
    ) -> str: ...

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]: ...

    def ingest_spool(self) -> int: ...

    # -- serving processes
    def register_process(self, kind: str, host: str, lease: float) -> int: ...

    def heartbeat(self, owner: int, lease: float) -> None: ...

    def unregister_process(self, owner: int) -> None: ...

    def list_processes(self, host: str | None = None) -> list[SupervisorInfo]: ...

    # -- claiming and outcomes
    def claim(
        self,
        owner: int,
        max_items: int,
        lease: float,
        *,
        start: bool = True,
        take: Take | None = None,
    ) -> list[QueuedJob]: ...

    def start_claimed(self, owner: int, jobs: list[QueuedJob], lease: float) -> list[QueuedJob]: ...

    def record_processes(self, items: list[tuple[QueuedJob, int, int | None]]) -> None: ...

    def release_claimed(self, owner: int, jobs: list[QueuedJob]) -> None: ...

    def finish(
        self,
        results: Iterable[tuple[QueuedJob, AttemptResult]],
        *,
        max_retries: int | None = None,
        backoff_base: float | None = None,
        owner: int | None = None,
        force_dead: bool = False,
    ) -> list[Finished]: ...

    def recover(
        self,
        host: str,
        *,
        kill: Callable[[dict[str, Any]], None],
        exclude_owner: int | None = None,
        max_retries: int | None = None,
        backoff_base: float | None = None,
    ) -> list[Recovered]: ...

    # -- the public consumer API
    def get_batch(self, max_items: int = 1) -> list[QueuedJob]: ...

    def ack(self, job: QueuedJob, result: Any = None) -> None: ...

    def nack(self, job: QueuedJob, error: str) -> None: ...

    def move_to_dead_letter(self, job: QueuedJob, error: str) -> None: ...

    # -- reads
    def get_job(self, job_id: str) -> QueuedJob: ...

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[QueuedJob]: ...

    def get_attempts(self, job_id: str) -> list[Attempt]: ...

    def get_stats(self) -> QueueStats: ...

    def get_pending_count(self) -> int: ...

    def count_eligible(self, include_owned: bool = False) -> int: ...

    def next_run_at(self, retries_only: bool = False) -> float | None: ...

    def get_dead_letter_jobs(self, limit: int | None = None) -> list[DeadLetterJob]: ...

    def waiting_for(self, job: QueuedJob) -> Waiting | None: ...

    # -- operator actions
    def cancel(self, job_id: str) -> QueuedJob: ...

    def retry_dead(self, job_ids: Iterable[str] | None = None) -> list[str]: ...

    def purge_dead(self) -> int: ...

    def purge(self, older_than: float) -> int: ...
