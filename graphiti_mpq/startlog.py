"""Durable marks of the jobs a pool child started, so recovery charges only those an attempt.

A serving process claims a chunk of jobs as running before any child starts them. If it is
SIGKILLed, recovery used to count a ``lost`` attempt for all of them, and jobs that never ran
could end in the dead letters. Now a child appends ``job_id attempt`` to its chunk's file
before it starts each job (one small ``O_APPEND`` write: it survives any process crash, as the
WAL commit does), and recovery of a provably dead owner hands back, without using an attempt,
every job that has no mark. A job with a mark counts as before, so a job that kills its
supervisor every time still ends dead. Absent marks prove a job never started only because the
mark is written first; files are removed once their chunk's outcomes are committed.

SQLite only: a PostgreSQL queue has no directory, and a supervisor on another host could not
read it; there every interrupted claim counts, as the contract's lease recovery always did.
Stdlib only.
"""

from __future__ import annotations

import os
import shutil


def owner_dir(location: str, owner: int) -> str:
    """The folder of one serving process's marks, beside the database."""
    return f"{location}.started{os.sep}{owner}"


def chunk_file(directory: str, chunk_id: int) -> str:
    return os.path.join(directory, str(chunk_id))


def prepare(directory: str) -> None:
    """Create the owner's folder (private, like the database) before any chunk is sent."""
    os.makedirs(directory, mode=0o700, exist_ok=True)


class StartMarks:
    """A child's writer for one chunk's file; opened on the first mark."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._fd = -1

    def mark(self, job_id: str, attempt: int) -> None:
        """Record that this attempt is about to start; raises if it cannot (the job then must
        not start: unmarked, recovery would not count it)."""
        if self._path is None:
            return
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, f"{job_id} {attempt}\n".encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def started(directory: str) -> set[tuple[str, int]] | None:
    """(job id, attempt) of every mark in an owner's folder; None when there is no folder
    (an owner that kept none: then nothing is known and every claim counts)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    marks: set[tuple[str, int]] = set()
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="ascii", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            job_id, _, attempt = line.partition(" ")
            if attempt.isdigit():
                marks.add((job_id, int(attempt)))
    return marks


def discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_owner(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
