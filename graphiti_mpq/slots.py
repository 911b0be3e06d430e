"""Shared memory through which pool children report the progress of a chunk of jobs.

Each chunk in flight owns one slot: a header of integers (the child's pid, how many of the
chunk's jobs it has started, when the current one started in ``time.monotonic_ns``, how many
bytes of outcomes it has committed, how many jobs are still the chunk's, and the process group
of the command the current job spawned, with that job's index in the same word so that the
parent never pins it on another job) and a data area of records, each a length, a CRC and a
pickled tuple of plain values (index, seconds, process group, then the ``AttemptResult``
fields: a tuple of primitives pickles several times faster than the dataclass and its enum).
The child writes a record before the length that commits it; the parent reads committed
records only, and a record whose CRC does not match yet (a CPU that made the length visible
first) is read again on the next look. No lock is involved, so a child killed at any instant
leaves nothing held, and every outcome it committed survives it: a crash in one job of a chunk
never loses the outcomes of the jobs before it.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import struct
import tempfile
import time
import zlib
from typing import Any

from .models import AttemptResult, Outcome

_PID, _STARTED, _STARTED_NS, _COMMITTED, _LIMIT, _SPAWNED = range(6)
_FIELDS = 6
_PGID_BITS = 32  # a pid is below 2**22 on Linux
_RECORD_HEAD = struct.Struct("<II")  # body length, CRC-32 of the body

#: Bytes of outcomes one slot holds; an outcome that does not fit goes by the event queue.
SLOT_BYTES = 64 * 1024

#: (index in the chunk, seconds it ran, process group of its command or None, outcome)
Record = tuple[int, float, int | None, AttemptResult]
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


class Slots:
    """``count`` slots in shared memory made by ``context`` (passed to children at start)."""

    def __init__(self, context: Any, count: int, size: int = SLOT_BYTES) -> None:
        self.count = count
        self.size = size
        self.header: Any = context.RawArray("q", count * _FIELDS)
        self.data: Any = context.RawArray("B", count * size)
        #: A file whose byte ``slot`` is locked (fcntl) while a chunk's next start is decided:
        #: the kernel drops a killed child's lock, so it can never be left held. Reopened by
        #: children through /proc; None where there is no /proc (no jobs are ever moved).
        self._lock_file: Any = None
        self.lock_source: str | None = None
        if os.path.isdir("/proc/self/fd"):
            self._lock_file = tempfile.TemporaryFile()
            self.lock_source = f"/proc/{os.getpid()}/fd/{self._lock_file.fileno()}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock_file"] = None  # children open lock_source instead
        return state

    def _lock_fd(self) -> int:
        if self._lock_file is None:
            assert self.lock_source is not None
            self._lock_file = open(self.lock_source, "r+b")  # kept open: closing it drops the locks
        return int(self._lock_file.fileno())

    def lock(self, slot: int, wait: bool = True) -> bool:
        """Take the slot's decision lock; False if ``wait`` is off and it is held."""
        if self.lock_source is None:
            return True
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.lockf(self._lock_fd(), flags, 1, slot)
        except BlockingIOError:
            return False
        return True

    def unlock(self, slot: int) -> None:
        if self.lock_source is not None:
            fcntl.lockf(self._lock_fd(), fcntl.LOCK_UN, 1, slot)

    def close(self) -> None:
        """Once no child will use the slots again (the pool is shut down)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self.lock_source = None

    def can_move_jobs(self) -> bool:
        return self.lock_source is not None

    def limit(self, slot: int) -> int:
        return int(self.header[slot * _FIELDS + _LIMIT])

    def set_limit(self, slot: int, limit: int) -> None:
        """Jobs from index ``limit`` on are no longer this chunk's (call under ``lock``)."""
        self.header[slot * _FIELDS + _LIMIT] = limit

    def view(self, slot: int) -> memoryview:
        start = slot * self.size
        return memoryview(self.data).cast("B")[start : start + self.size]

    def reset(self, slot: int, jobs: int) -> None:
        """Before a chunk of ``jobs`` is handed out: no child, nothing started or committed."""
        base = slot * _FIELDS
        for offset in range(_FIELDS):
            self.header[base + offset] = 0
        self.header[base + _LIMIT] = jobs

    def progress(self, slot: int) -> tuple[int, int, float, int]:
        """(pid or 0, jobs started, monotonic start of the current one, bytes committed)."""
        base = slot * _FIELDS
        header = self.header
        return (
            header[base + _PID],
            header[base + _STARTED],
            header[base + _STARTED_NS] / 1e9,
            header[base + _COMMITTED],
        )

    def spawned(self, slot: int) -> tuple[int, int] | None:
        """(index of the job, process group) of the latest command a job of the chunk spawned."""
        index = slot * _FIELDS + _SPAWNED
        word = int(self.header[index])
        if not word or word != self.header[index]:
            return None  # none yet, or being written (read again next time)
        return (word >> _PGID_BITS) - 1, word & ((1 << _PGID_BITS) - 1)

    def records(self, slot: int, offset: int, committed: int) -> tuple[list[Record], int]:
        """The records between ``offset`` and ``committed``; returns them and the new offset."""
        if committed <= offset:
            return [], offset
        view = self.view(slot)
        records: list[Record] = []
        while offset + _RECORD_HEAD.size <= committed:
            length, crc = _RECORD_HEAD.unpack_from(view, offset)
            start = offset + _RECORD_HEAD.size
            body = bytes(view[start : start + length])
            if len(body) != length or zlib.crc32(body) != crc:
                break  # not all of it visible yet: read it next time
            index, seconds, pgid, outcome, *fields = pickle.loads(body)
            records.append((index, seconds, pgid, AttemptResult(_OUTCOMES[outcome], *fields)))
            offset = start + length
        return records, offset


class SlotWriter:
    """The child's side of one slot, for one chunk."""

    def __init__(self, slots: Slots, slot: int, pid: int) -> None:
        self._slots, self._slot = slots, slot
        self._header = slots.header
        self._base = slot * _FIELDS
        self._view = slots.view(slot)
        self._offset = 0
        self._spawned: tuple[int, int] | None = None
        self._header[self._base + _PID] = pid

    def start(self, index: int) -> bool:
        """Publish that job ``index`` starts now (its start time first, then the count);
        False, and nothing published, if the parent has moved it to another chunk."""
        slots, slot = self._slots, self._slot
        slots.lock(slot)
        try:
            if index >= slots.limit(slot):
                return False
            self._header[self._base + _STARTED_NS] = time.monotonic_ns()
            self._header[self._base + _STARTED] = index + 1
            return True
        finally:
            slots.unlock(slot)

    def pgid_of(self, index: int) -> int | None:
        """The process group of the command job ``index`` spawned, if it spawned one."""
        spawned = self._spawned
        return spawned[1] if spawned is not None and spawned[0] == index else None

    def spawned(self, index: int, pgid: int) -> None:
        """Publish the process group of the command job ``index`` runs (one aligned 64-bit
        store: a reader sees the whole word or the one before). The job's outcome record
        repeats it, for a parent that reads only after the next job spawned."""
        self._spawned = (index, pgid)
        self._header[self._base + _SPAWNED] = ((index + 1) << _PGID_BITS) | pgid

    def finish(self, index: int, seconds: float, result: AttemptResult) -> bool:
        """Commit job ``index``'s outcome; False when it does not fit (the caller sends it)."""
        r = result
        body = pickle.dumps(
            (
                index,
                seconds,
                self.pgid_of(index),
                r.outcome.value,
                r.error,
                r.exit_code,
                r.signal,
                r.output_tail,
                r.result,
                r.finished_at,
            ),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        start = self._offset + _RECORD_HEAD.size
        end = start + len(body)
        if end > len(self._view):
            return False
        _RECORD_HEAD.pack_into(self._view, self._offset, len(body), zlib.crc32(body))
        self._view[start:end] = body
        self._offset = end
        self._header[self._base + _COMMITTED] = end
        return True
