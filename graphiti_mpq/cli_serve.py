"""The serving commands: ``supervise`` (until a signal) and ``drain`` (until nothing is due).

The CLI imports this module for every command, so the supervisor (structlog, multiprocessing,
filelock) is imported inside the commands that serve: ``status`` and the other reading
commands never pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from . import stopsignals
from .cli_common import DURATION, CliState, json_out, open_queue_for, pass_state
from .config import START_METHODS, Settings

if TYPE_CHECKING:
    from .supervisor import RunSummary


def _serving_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the serving commands (None when not given: environment, then default)."""
    options = [
        click.option("--program", help="Program the replay handler runs [GRAPHITI_BIN]."),
        click.option(
            "--max-retries", type=click.IntRange(min=0), help="Retries after the first failure."
        ),
        click.option("--backoff-base", type=DURATION, help="First retry delay; doubles each time."),
        click.option("--capacity", type=click.IntRange(min=1), help="Soft capacity (health)."),
        click.option("--workers", type=click.IntRange(min=1), help="Pool size (default 4)."),
        click.option("--job-timeout", type=DURATION, help="Per-job time limit (default 600s)."),
        click.option(
            "--import",
            "imports",
            multiple=True,
            help="Module registering Python handlers (repeat).",
        ),
        click.option(
            "--grace", type=DURATION, help="Grace period on SIGTERM/SIGINT (default 30s)."
        ),
        click.option("--lease", type=DURATION, help="Lease of a claimed job (default 60s)."),
        click.option("--host-id", help="Host identity recorded with claims (default: host name)."),
        click.option("--start-method", type=click.Choice(START_METHODS), help="Pool start method."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(state: CliState, options: dict[str, Any]) -> Settings:
    options["imports"] = tuple(options.get("imports") or ()) or None
    return state.settings(**options)


@click.command()
@_serving_options
@click.option("--idle-exit", type=DURATION, help="Exit after this long with nothing to do.")
@pass_state
def supervise(state: CliState, /, idle_exit: float | None, **options: Any) -> None:
    """Serve the queue until SIGTERM/SIGINT.

    A first signal stops claiming and lets running jobs finish within the grace period; a
    second signal (or the end of the grace period) hands them back to the queue.

    \b
    Example:
        graphiti_mpq supervise --workers 8 --import myapp.jobs
    """
    stopsignals.catch_early()
    from .autostart import adopt_lock as adopt_autostart_lock
    from .supervisor import Supervisor

    state.configure_logging()
    adopt_autostart_lock()  # started by an enqueue: hold its lock for our whole life
    settings = _settings(state, options)
    queue = open_queue_for(state, settings)
    supervisor = Supervisor(queue, settings, kind="supervise", idle_exit=idle_exit)
    supervisor.install_signal_handlers()
    supervisor.run()


@click.command()
@_serving_options
@click.option("--wait-retries", is_flag=True, help="Also wait out scheduled retries.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_state
def drain(state: CliState, /, wait_retries: bool, as_json: bool, **options: Any) -> None:
    """Process every job eligible now, then exit (for cron where no supervisor runs).

    Exit status 0 when every attempt of the run succeeded (with --wait-retries: when no job
    ended dead), else 1.

    \b
    Example:
        */5 * * * * graphiti_mpq drain --wait-retries
    """
    stopsignals.catch_early()
    from .supervisor import Supervisor

    state.configure_logging()
    settings = _settings(state, options)
    queue = open_queue_for(state, settings)
    progress = _Progress() if sys.stderr.isatty() and not as_json else None
    supervisor = Supervisor(
        queue,
        settings,
        kind="drain",
        mode="drain",
        wait_retries=wait_retries,
        on_progress=progress,
    )
    supervisor.install_signal_handlers()
    summary = supervisor.run()
    if progress is not None:
        progress.finish()
    _report(summary, as_json)
    failed = summary.dead > 0 if wait_retries else summary.failed > 0
    if failed:
        raise click.exceptions.Exit(1)


class _Progress:
    """A one-line counter on the terminal (stderr), rewritten as outcomes arrive."""

    def __init__(self) -> None:
        self.done = 0

    def __call__(self, count: int) -> None:
        self.done += count
        click.echo(f"\rdrain: {self.done} attempts done", nl=False, err=True)

    def finish(self) -> None:
        if self.done:
            click.echo("", err=True)


def _report(summary: RunSummary, as_json: bool) -> None:
    if as_json:
        json_out(summary.to_json())
        return
    click.echo(
        f"drained: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.dead} dead-lettered in {summary.seconds:.1f}s"
    )
