"""Retry policy, pure: which delay follows a failed attempt, or None for the dead-letter table."""

from __future__ import annotations


def retry_delay(attempt: int, max_retries: int, base: float) -> float | None:
    """Delay before the next attempt after failed attempt ``attempt`` (1, 2, ...).

    Attempt k with k <= max_retries is retried after ``base * 2**(k-1)`` seconds (10, 20, 40 s
    by default); the failure after the last retry returns None: the job is dead.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if attempt > max_retries:
        return None
    return base * float(2 ** (attempt - 1))
