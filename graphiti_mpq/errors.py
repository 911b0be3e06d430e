"""The one exception family of graphiti_mpq.

Every error a user can meet derives from :class:`QueueError` and carries the exit code the CLI
uses for it, so the mapping to ``sys.exit`` lives with the error, not in each command.
Kept free of heavy imports: the enqueue fast path raises these.
"""

from __future__ import annotations

#: Exit codes of the CLI (see the contract).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_JOB = 3
EXIT_WRONG_STATE = 4


class QueueError(Exception):
    """The queue operation failed."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidJobError(QueueError, ValueError):
    """The job is invalid."""

    exit_code = EXIT_USAGE

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"invalid job: {field}: {problem}")


class ConfigError(QueueError, ValueError):
    """A setting is invalid."""

    exit_code = EXIT_USAGE


class UnknownJobError(QueueError, LookupError):
    """No job has that id."""

    exit_code = EXIT_UNKNOWN_JOB

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"unknown job id: {job_id}")


class WrongStateError(QueueError):
    """The job is not in a state that allows this operation."""

    exit_code = EXIT_WRONG_STATE


class DatabaseError(QueueError):
    """The queue database cannot be used."""


class DatabaseBusyError(DatabaseError):
    """The queue database is busy: another process holds its write lock."""


class SchemaTooNewError(DatabaseError):
    """The queue database was written by a newer version of graphiti_mpq."""


class BackendMissingError(QueueError):
    """The backend for this queue location is not installed."""


class HandlerError(QueueError):
    """A job could not be run by its handler."""
