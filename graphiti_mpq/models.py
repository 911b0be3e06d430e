"""Value types of the queue: jobs, attempts, dead letters and counts. No I/O here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .timefmt import iso


class JobStatus(StrEnum):
    """The state of a job as users see it."""

    #: waiting to start (due, delayed, waiting for a retry or for the barrier)
    PENDING = "pending"
    #: an attempt is under way
    RUNNING = "running"
    #: an attempt succeeded
    SUCCEEDED = "succeeded"
    #: every attempt failed; the job sits in the dead-letter table
    DEAD = "dead"
    #: cancelled before it started (or recorded as a duplicate at spool ingest)
    CANCELLED = "cancelled"


#: Internal state: claimed by a process that waits for the barrier; shown as pending.
CLAIMED = "claimed"
#: Internal states in which a job holds an owner and a lease.
OWNED_STATES = (CLAIMED, JobStatus.RUNNING.value)
#: States in which a job blocks a new job with the same dedupe key.
LIVE_STATES = ("pending", CLAIMED, "running")
#: States a job can finish in.
FINAL_STATES = ("succeeded", "dead", "cancelled")


class Outcome(StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"
    #: the handler raised or the command exited non-zero
    FAILED = "failed"
    #: the process running the job died before reporting
    CRASHED = "crashed"
    #: the job exceeded its time limit
    TIMEOUT = "timeout"
    #: the process that owned it died; found by pid check or lease expiry
    LOST = "lost"
    #: stopped by a stop of its supervisor; does not count as an attempt
    HANDED_BACK = "handed_back"

    @property
    def counts(self) -> bool:
        return self is not Outcome.HANDED_BACK

    @property
    def is_failure(self) -> bool:
        return self not in (Outcome.SUCCEEDED, Outcome.HANDED_BACK)


#: The columns of a job row that ``QueuedJob.from_values`` reads, in the order it reads them.
JOB_COLUMNS = (
    "id", "job_type", "payload", "parallel", "priority", "state", "attempts", "max_retries",
    "timeout", "dedupe_key", "run_at", "created_at", "started_at", "finished_at", "last_error",
    "result", "seq", "owner", "duplicate_of",
)  # fmt: skip
_JOB_COLUMN_COUNT = len(JOB_COLUMNS)
_OPTIONAL_COLUMNS = frozenset({"result", "owner", "duplicate_of"})  # absent from some reads


@dataclass(frozen=True)
class QueuedJob:
    """A job as stored; ``get_batch`` returns these for ``ack``/``nack``."""

    id: str
    job_type: str
    payload: dict[str, Any]
    parallel: bool = False
    priority: int = 0
    state: str = "pending"
    attempts: int = 0
    max_retries: int | None = None
    timeout: float | None = None
    dedupe_key: str | None = None
    run_at: float = 0.0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    result: Any = None
    seq: int = 0
    owner: int | None = None
    duplicate_of: str | None = None

    @property
    def public_state(self) -> str:
        return "pending" if self.state == CLAIMED else self.state

    def log_context(self) -> dict[str, Any]:
        return {"job_id": self.id, "job_type": self.job_type, "attempt": self.attempts}

    def to_json(self) -> dict[str, Any]:
        """The job object of the contract's JSON shapes."""
        return {
            "id": self.id,
            "job_type": self.job_type,
            "state": self.public_state,
            "payload": self.payload,
            "parallel": self.parallel,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            "dedupe_key": self.dedupe_key,
            "run_at": iso(self.run_at),
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "last_error": self.last_error,
            "result": self.result,
        }

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> QueuedJob:
        """A job from a row of ``JOB_COLUMNS``, in that order: the claim path builds many of
        these, and a tuple spares it a dict per row."""
        (
            job_id, job_type, payload, parallel, priority, state, attempts, max_retries,
            timeout, dedupe_key, run_at, created_at, started_at, finished_at, last_error,
            result, seq, owner, duplicate_of,
        ) = values[:_JOB_COLUMN_COUNT]  # fmt: skip
        return cls(
            job_id, job_type, json.loads(payload), bool(parallel), priority, state, attempts,
            max_retries, timeout, dedupe_key, run_at, created_at, started_at, finished_at,
            last_error, json.loads(result) if result is not None else None, seq, owner,
            duplicate_of,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QueuedJob:
        """A job from a row read by column name (``result``, ``owner`` and ``duplicate_of`` may
        be absent); decoded by ``from_values``, so both readings agree."""
        return cls.from_values(
            [row.get(c) if c in _OPTIONAL_COLUMNS else row[c] for c in JOB_COLUMNS]
        )


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job, as recorded in the attempt history."""

    attempt: int
    started_at: float | None
    finished_at: float | None
    outcome: str | None
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    output_tail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "output_tail": self.output_tail,
        }


@dataclass(frozen=True)
class AttemptResult:
    """What a handler reports for one attempt; the storage layer records it."""

    outcome: Outcome
    error: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    output_tail: str | None = None
    result: Any = None
    finished_at: float | None = None


@dataclass(frozen=True)
class DeadLetterJob:
    """A dead job: the job itself, when it died and its error history."""

    job: QueuedJob
    failed_at: float
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.job.id

    def to_json(self) -> dict[str, Any]:
        data = self.job.to_json()
        data["failed_at"] = iso(self.failed_at)
        data["errors"] = list(self.errors)
        return data


@dataclass(frozen=True)
class QueueStats:
    """Counts by state and what status needs beside them."""

    pending: int = 0
    retrying: int = 0
    running: int = 0
    succeeded: int = 0
    cancelled: int = 0
    dead_letter: int = 0
    oldest_pending_at: float | None = None


@dataclass(frozen=True)
class SupervisorInfo:
    """A process serving the queue, from its heartbeat row."""

    id: int
    host: str
    pid: int
    kind: str
    started_at: float
    last_heartbeat: float
    jobs_done: int
    stopped_at: float | None
    alive: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "kind": self.kind,
            "started_at": iso(self.started_at),
            "last_heartbeat": iso(self.last_heartbeat),
            "jobs_done": self.jobs_done,
            "alive": self.alive,
        }
