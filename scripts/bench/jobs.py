"""Python handlers the benchmark runs (imported by pool children with ``--import bench.jobs``)."""

from __future__ import annotations

import os
import time
from typing import Any

import graphiti_mpq


@graphiti_mpq.handler("bench.noop")
def noop(payload: dict[str, Any]) -> None:
    return None


def record_pickup(token: Any, enqueued_at: float) -> None:
    """Append ``token latency`` to $BENCH_PICKUP_FILE (one short O_APPEND write: atomic)."""
    latency = time.time() - enqueued_at
    fd = os.open(os.environ["BENCH_PICKUP_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{token} {latency:.6f}\n".encode())
    finally:
        os.close(fd)


@graphiti_mpq.handler("bench.pickup")
def pickup(payload: dict[str, Any]) -> None:
    record_pickup(payload["token"], payload["t0"])
