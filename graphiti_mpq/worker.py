"""The in-process worker of the Python API: the supervisor loop on a background thread.

An MCP server (or any long-lived host) calls ``start_worker()``; the loop runs its own pool of
child processes, so job code never runs inside the host process.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from .config import Settings, load_settings
from .logs import ensure_configured, get_logger
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .storage.base import QueueStore

    # Supervisor is typed against JobQueue until it switches to QueueStore: cast at the call.


def _settings_for(queue: QueueStore) -> Settings:
    return load_settings(queue.location)


class BackgroundWorker:
    """Serves the queue from a thread of this process until ``stop()``.

    The thread does not keep the host process alive: when the host exits without calling
    ``stop()``, an exit hook stops the worker like ``stop()`` does (running jobs get the grace
    period, then go back to the queue).
    """

    def __init__(self, job_queue: QueueStore, settings: Settings | None = None) -> None:
        self._queue = job_queue
        self._settings = settings
        self._thread: threading.Thread | None = None
        self._supervisor: Supervisor | None = None
        self._lock = threading.Lock()
        self._exit_hook = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            ensure_configured()
            settings = self._settings or _settings_for(self._queue)
            self._supervisor = Supervisor(self._queue, settings, kind="worker")
            self._thread = threading.Thread(
                target=self._supervisor.run, name="graphiti_mpq-worker", daemon=True
            )
            self._thread.start()
            if not self._exit_hook:
                # Runs before multiprocessing's own exit hook (registered earlier: LIFO).
                atexit.register(self._stop_at_exit)
                self._exit_hook = True
        get_logger().info("background_worker_started", queue=self._queue.location)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Wait until the worker serves the queue (registered, pool started)."""
        supervisor = self._supervisor
        return supervisor is not None and supervisor.ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, let running jobs finish within ``timeout``, then hand the rest back."""
        with self._lock:
            thread, supervisor = self._thread, self._supervisor
        if thread is None or supervisor is None:
            return
        supervisor.settings = replace(supervisor.settings, grace=timeout)
        supervisor.request_stop()
        thread.join(timeout + 5.0)
        if thread.is_alive():
            get_logger().warning("background_worker_timeout", timeout=timeout)
            supervisor.request_stop()  # second request: hand running jobs back now
            thread.join(30.0)
        with self._lock:
            self._thread = None
        get_logger().info("background_worker_stopped")

    def _stop_at_exit(self) -> None:
        supervisor = self._supervisor
        if self.is_running() and supervisor is not None:
            self.stop(supervisor.settings.grace)

    def is_running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()


def drain_once(job_queue: QueueStore, settings: Settings | None = None) -> tuple[int, int]:
    """Work every job eligible now; returns (attempts succeeded, attempts failed)."""
    ensure_configured()
    settings = settings or _settings_for(job_queue)
    supervisor = Supervisor(job_queue, settings, kind="drain", mode="drain")
    summary = supervisor.run()
    return summary.succeeded, summary.failed
