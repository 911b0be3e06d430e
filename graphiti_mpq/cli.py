"""The operator CLI: ``graphiti_mpq [--db LOCATION] [--log-format F] [-v|-q] COMMAND``.

Commands are thin: they parse, call the storage layer (or ``status.build_status``) and print.
Every error becomes one line on stderr with the contract's exit code (``cli_common``).
``supervise`` and ``drain`` live in ``cli_serve``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Any

import click

from . import __version__
from .cli_common import (
    DURATION,
    PROG,
    AnyParamType,
    CliState,
    QueueGroup,
    confirm_destructive,
    json_out,
    open_queue_for,
    pass_state,
    shorten,
    table,
)
from .config import queue_location
from .fastpath import cli_kwargs
from .models import Attempt, QueuedJob
from .status import build_status
from .storage import Waiting
from .timefmt import ago, iso

STATES = ("pending", "running", "succeeded", "dead", "cancelled")


@click.group(
    name=PROG,
    cls=QueueGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--db",
    metavar="LOCATION",
    help="Queue: a SQLite path or a postgresql:// URL [env GRAPHITI_QUEUE_PATH; default "
    "$XDG_STATE_HOME/graphiti_mpq/queue.db].",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="Logs on stderr: readable on a terminal (auto), or JSON lines.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logs, and tracebacks with errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the logs.")
@click.version_option(__version__, "--version", prog_name=PROG)
@click.pass_context
def main(ctx: click.Context, db: str | None, log_format: str, verbose: bool, quiet: bool) -> None:
    """A durable job queue: record jobs now, run them later under a supervisor.

    Global options go before the command; everything else after it.

    \b
    Example:
        graphiti_mpq enqueue --kw scope=project add "remember this"
        graphiti_mpq status
        graphiti_mpq --db /tmp/q.db jobs --state dead
    """
    if verbose and quiet:
        raise click.UsageError("-v and -q cannot be combined")
    state = CliState(queue_location(db), log_format, 1 if verbose else -1 if quiet else 0)
    ctx.obj = state
    # Logging is configured by the commands that log (CliState.configure_logging): importing
    # structlog would cost every reading command, such as ``status``, tens of milliseconds.


# -- enqueue ------------------------------------------------------------------------------


class JsonValue(AnyParamType):
    """A JSON document given on the command line."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            self.fail(f"not valid JSON: {exc}", param, ctx)


def _kwargs(kw: tuple[str, ...], flags: tuple[str, ...]) -> dict[str, Any]:
    """``--kw KEY=VALUE`` (strings) and ``--flag KEY`` (True); a repeated key makes a list."""
    try:
        return cli_kwargs(kw, flags)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kw") from None


def _build_job(
    job_type: str | None,
    payload: Any,
    command: str | None,
    args: tuple[str, ...],
    kwargs: dict[str, Any],
    cwd: str | None,
) -> tuple[str, Any]:
    """The (job type, payload) of an ``enqueue``; validation proper is the storage layer's."""
    if payload is not None:
        if command is not None:
            raise click.UsageError("give either COMMAND [ARGS...] or --payload, not both")
        return _payload_job(job_type, payload, kwargs, cwd)
    if command is None:
        raise click.UsageError("missing COMMAND (or --type T --payload JSON)")
    if args[:1] == ("--",):
        args = args[1:]
    else:
        _refuse_misplaced_options(args)
    body: dict[str, Any] = {
        "command": command.split(" ") if " " in command else command,
        "args": list(args),
        "kwargs": kwargs,
    }
    if cwd is not None:
        body["cwd"] = cwd
    return command if job_type is None else job_type, body


def _refuse_misplaced_options(args: tuple[str, ...]) -> None:
    """An option of enqueue written after COMMAND would silently become content: refuse it."""
    ctx = click.get_current_context()
    names = set(ctx.help_option_names)
    for param in ctx.command.params:
        names.update(opt for opt in [*param.opts, *param.secondary_opts] if opt.startswith("-"))
    for arg in args:
        if arg.split("=", 1)[0] in names:
            raise click.UsageError(
                f"{arg!r} comes after COMMAND, where it would be recorded as an argument of the"
                " command; put enqueue's options before COMMAND, or write COMMAND -- ARGS to"
                " record it as it is"
            )


def _payload_job(
    job_type: str | None, payload: Any, kwargs: dict[str, Any], cwd: str | None
) -> tuple[str, Any]:
    if kwargs or cwd:
        if not (isinstance(payload, dict) and "command" in payload):
            raise click.UsageError("--kw, --flag and --cwd need a payload with a command")
        payload = _merge_kwargs(payload, kwargs, cwd)
    if job_type is None:
        name = payload.get("command") if isinstance(payload, dict) else None
        if isinstance(name, list) and all(isinstance(part, str) for part in name):
            name = " ".join(name)
        if not isinstance(name, str):
            raise click.UsageError("--payload needs --type (the payload has no command)")
        job_type = name
    return job_type, payload


def _merge_kwargs(
    payload: dict[str, Any], kwargs: dict[str, Any], cwd: str | None
) -> dict[str, Any]:
    merged = dict(payload)
    if kwargs:
        given = merged.get("kwargs", {})
        if not isinstance(given, dict):
            raise click.BadParameter("payload.kwargs must be an object", param_hint="--payload")
        clash = sorted(set(given) & set(kwargs))
        if clash:
            raise click.UsageError(f"kwarg {clash[0]!r} is given by both --payload and --kw/--flag")
        merged["kwargs"] = {**given, **kwargs}
    if cwd is not None:
        merged["cwd"] = cwd
    return merged


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--type", "job_type", metavar="T", help="Job type [default: the command].")
@click.option(
    "--payload", type=JsonValue(), metavar="JSON", help="The whole payload, as a JSON object."
)
@click.option("--parallel", is_flag=True, help="May run beside other parallel jobs.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--delay", type=DURATION, help="Not before this long from now (90, 30s, 15m).")
@click.option("--dedupe-key", metavar="K", help="Not added while a job with this key is live.")
@click.option("--max-retries", type=click.IntRange(min=0), help="Retries after the first failure.")
@click.option("--timeout", type=DURATION, help="Time limit of each attempt.")
@click.option(
    "--kw", multiple=True, metavar="KEY=VALUE", help="A string option (repeat a key: a list)."
)
@click.option("--flag", "flags", multiple=True, metavar="KEY", help="A boolean option set to true.")
@click.option("--cwd", metavar="DIR", help="Run the command in DIR (made absolute).")
@click.argument("command", required=False)
@click.argument("args", nargs=-1)
@pass_state
def enqueue(
    state: CliState,
    job_type: str | None,
    payload: Any,
    parallel: bool,
    priority: int,
    delay: float | None,
    dedupe_key: str | None,
    max_retries: int | None,
    timeout: float | None,
    kw: tuple[str, ...],
    flags: tuple[str, ...],
    cwd: str | None,
    command: str | None,
    args: tuple[str, ...],
) -> None:
    """Record a job and print its id; nothing runs now.

    A replay job: COMMAND [ARGS...] runs later as `graphiti COMMAND --KEY VALUE... -- ARGS...`
    (--kw KEY=VALUE and --flag KEY give its options). Options of enqueue go before COMMAND;
    what follows COMMAND is recorded as ARGS, verbatim, even when it starts with "-". Write
    COMMAND -- ARGS... to record ARGS that look like enqueue's own options (that "--" is not
    recorded). A COMMAND with spaces names a nested command ("memory add"). Any other job:
    --type T --payload JSON.

    \b
    Example:
        graphiti_mpq enqueue --kw scope=project --flag force add "some text"
        graphiti_mpq enqueue --priority 5 --delay 30s add -- "-starts with a dash"
        graphiti_mpq enqueue --type reindex --payload '{"collection": "notes"}'
    """
    cwd = os.path.abspath(cwd) if cwd is not None else None
    job_type, body = _build_job(job_type, payload, command, args, _kwargs(kw, flags), cwd)
    queue = open_queue_for(state)
    job_id = queue.enqueue(
        job_type,
        body,
        parallel,
        priority=priority,
        delay=delay or 0,
        dedupe_key=dedupe_key,
        max_retries=max_retries,
        timeout=timeout,
    )
    if state.verbose:
        from .logs import get_logger

        state.configure_logging()
        get_logger().debug("job_enqueued", job_id=job_id, job_type=job_type, parallel=parallel)
    click.echo(job_id)


# -- status -------------------------------------------------------------------------------


def _render_status(location: str, st: dict[str, Any]) -> str:
    now = time.time()
    age = st["oldest_pending_age"]
    pending = f"{st['pending']}  ({st['retrying']} retrying"
    pending += f", oldest queued {ago(now - age, now)})" if age is not None else ")"
    counts = [
        ["queue", location],
        ["health", f"{st['health']}  ({st['pending']} pending of capacity {st['capacity']})"],
        ["pending", pending],
        ["running", str(st["running"])],
        ["succeeded", str(st["succeeded"])],
        ["cancelled", str(st["cancelled"])],
        ["dead letter", str(st["dead_letter"])],
    ]
    lines = [table(None, counts), "", *_render_serving(st["supervisors"], now)]
    return "\n".join(lines + _render_dead(st["dead_letter_jobs"], st["dead_letter"], now))


def _render_serving(procs: list[dict[str, Any]], now: float) -> list[str]:
    if not procs:
        return [f"serving: none (run `{PROG} supervise`, or `{PROG} drain` from cron)"]
    rows = [
        [p["host"], str(p["pid"]), p["kind"], _ago_iso(p["started_at"], now),
         str(p["jobs_done"]), "yes" if p["alive"] else "no"]
        for p in procs
    ]  # fmt: skip
    return ["serving:", table(["HOST", "PID", "KIND", "SINCE", "JOBS DONE", "ALIVE"], rows, "  ")]


def _render_dead(entries: list[dict[str, Any]], total: int, now: float) -> list[str]:
    if not entries:
        return []
    rows = [
        [d["id"], shorten(d["job_type"], 24), _ago_iso(d["failed_at"], now),
         shorten(d["last_error"], 50)]
        for d in entries
    ]  # fmt: skip
    more = f" (newest {len(entries)} of {total})" if total > len(entries) else ""
    return ["", f"dead letters{more}:", table(["ID", "TYPE", "FAILED", "ERROR"], rows, "  ")]


def _ago_iso(text: str | None, now: float) -> str:
    """A short age for an ISO time stamp of the JSON shapes."""
    return ago(datetime.fromisoformat(text).timestamp(), now) if text else "-"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_state
def status(state: CliState, as_json: bool) -> None:
    """Counts by state, health, serving processes and the latest dead letters.

    \b
    Example:
        graphiti_mpq status
        graphiti_mpq status --json | jq .pending
    """
    settings = state.settings()
    queue = open_queue_for(state, settings)
    if as_json:
        json_out(build_status(queue, settings.capacity))
        return
    report = build_status(queue, settings.capacity, dead_letter_limit=5)
    click.echo(_render_status(queue.display_location, report))


# -- jobs and show -------------------------------------------------------------------------


def _note(job: QueuedJob, now: float) -> str:
    state = job.public_state
    if state == "pending" and job.run_at > now:
        return f"{'retry' if job.attempts else 'due'} {ago(job.run_at, now)}"
    if state == "running":
        return f"started {ago(job.started_at, now)}"
    if state in ("dead", "pending") and job.last_error:
        return shorten(job.last_error, 50)
    if state in ("succeeded", "cancelled"):
        return f"finished {ago(job.finished_at, now)}"
    return ""


@main.command()
@click.option("--state", "only", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a list of job objects.")
@pass_state
def jobs(state: CliState, only: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first.

    \b
    Example:
        graphiti_mpq jobs --state pending --limit 10
        graphiti_mpq jobs --json | jq '.[].id'
    """
    found = open_queue_for(state).list_jobs(only, limit)
    if as_json:
        json_out([job.to_json() for job in found])
        return
    if not found:
        click.echo(f"no {only + ' ' if only else ''}jobs")
        return
    now = time.time()
    rows = [
        [
            job.id,
            job.public_state,
            shorten(job.job_type, 24),
            str(job.priority),
            str(job.attempts),
            ago(job.created_at, now),
            _note(job, now),
        ]
        for job in found
    ]
    click.echo(table(["ID", "STATE", "TYPE", "PRI", "TRIES", "CREATED", "NOTE"], rows))


def _why(job: QueuedJob, waiting: Waiting, serving: bool) -> str:
    """One sentence: why this pending job has not started."""
    ahead = f"{waiting.ahead} job{'s' if waiting.ahead != 1 else ''}"
    if waiting.reason in ("retry", "delay"):
        what = "its retry" if waiting.reason == "retry" else "the end of its delay"
        text = f"waiting for {what} at {iso(waiting.until)} ({ago(waiting.until)})"
    elif waiting.reason == "barrier":
        text = "held back by the barrier (a sequential job runs alone)"
        text += f"; {ahead} ahead of it" if waiting.ahead else ""
    else:
        text = f"queued behind {ahead}" if waiting.ahead else "next in line"
    if not serving:
        text += f"; nothing serves this queue now (`{PROG} supervise` or `{PROG} drain`)"
    return text


def _when(ts: float | None) -> str:
    return f"{iso(ts)} ({ago(ts)})" if ts is not None else "-"


def _render_job(job: QueuedJob, attempts: list[Attempt], why: str | None) -> str:
    payload = json.dumps(job.payload, separators=(",", ":"), ensure_ascii=False)
    fields = [
        ["id", job.id],
        ["type", job.job_type],
        ["state", job.public_state],
        ["payload", shorten(payload, 400)],
        ["parallel", "yes" if job.parallel else "no (sequential: runs alone)"],
        ["priority", str(job.priority)],
        ["attempts", str(job.attempts)],
        ["max retries", "default" if job.max_retries is None else str(job.max_retries)],
        ["timeout", "default" if job.timeout is None else f"{job.timeout:g}s"],
        ["dedupe key", job.dedupe_key or "-"],
        ["run at", _when(job.run_at)],
        ["created", _when(job.created_at)],
        ["started", _when(job.started_at)],
        ["finished", _when(job.finished_at)],
        ["last error", shorten(job.last_error, 200)],
    ]
    if job.result is not None:
        fields.append(["result", shorten(json.dumps(job.result, ensure_ascii=False), 200)])
    if why is not None:
        fields.append(["waiting", why])
    lines = [table(None, fields), ""]
    if not attempts:
        lines.append("no attempts yet")
        return "\n".join(lines)
    rows = [
        [
            str(a.attempt),
            a.outcome or "running",
            _when(a.started_at),
            "-" if a.exit_code is None else str(a.exit_code),
            shorten(a.error or a.signal, 60),
        ]
        for a in attempts
    ]
    lines.append(table(["#", "OUTCOME", "STARTED", "EXIT", "ERROR"], rows))
    return "\n".join(lines)


@main.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The job object with its attempts.")
@pass_state
def show(state: CliState, job_id: str, as_json: bool) -> None:
    """One job: its fields, its attempts, and why it has not started if it is pending.

    \b
    Example:
        graphiti_mpq show 019ae8c4f1d23f2a9c0d1e4b5a69
        graphiti_mpq show 019ae8c4f1d23f2a9c0d1e4b5a69 --json | jq .waiting_for
    """
    queue = open_queue_for(state)
    job = queue.get_job(job_id)
    attempts = queue.get_attempts(job_id)
    waiting = queue.waiting_for(job)
    if as_json:
        data = job.to_json()
        data["attempt_history"] = [a.to_json() for a in attempts]
        data["waiting_for"] = waiting.to_json() if waiting is not None else None
        json_out(data)
        return
    serving = waiting is None or any(p.alive and p.kind != "api" for p in queue.list_processes())
    click.echo(_render_job(job, attempts, _why(job, waiting, serving) if waiting else None))


# -- operator actions ---------------------------------------------------------------------


@main.command()
@click.argument("job_id", metavar="ID")
@pass_state
def cancel(state: CliState, job_id: str) -> None:
    """Cancel a pending job (exit 3: unknown id; 4: the job is not pending).

    \b
    Example:
        graphiti_mpq cancel 019ae8c4f1d23f2a9c0d1e4b5a69
    """
    job = open_queue_for(state).cancel(job_id)
    click.echo(f"cancelled {job.id}")


@main.group("dead-letter")
def dead_letter() -> None:
    """Jobs whose every attempt failed: list them, retry them, or delete them.

    \b
    Example:
        graphiti_mpq dead-letter list
        graphiti_mpq dead-letter retry --all
    """


@dead_letter.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a list of dead-letter entries.")
@pass_state
def dead_letter_list(state: CliState, as_json: bool) -> None:
    """List dead jobs, most recently failed first, with their last error.

    \b
    Example:
        graphiti_mpq dead-letter list
        graphiti_mpq dead-letter list --json | jq '.[].errors'
    """
    dead = open_queue_for(state).get_dead_letter_jobs()
    if as_json:
        json_out([entry.to_json() for entry in dead])
        return
    if not dead:
        click.echo("no dead-letter jobs")
        return
    now = time.time()
    rows = [
        [
            d.id,
            shorten(d.job.job_type, 24),
            ago(d.failed_at, now),
            str(d.job.attempts),
            shorten(d.job.last_error, 60),
        ]
        for d in dead
    ]
    click.echo(table(["ID", "TYPE", "FAILED", "TRIES", "LAST ERROR"], rows))


@dead_letter.command("retry")
@click.argument("job_ids", metavar="ID...", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead job.")
@pass_state
def dead_letter_retry(state: CliState, job_ids: tuple[str, ...], retry_all: bool) -> None:
    """Put dead jobs back in the queue: same id, 0 attempts, due now.

    All or nothing: an unknown id (exit 3) or a job that is not dead (exit 4) retries none.

    \b
    Example:
        graphiti_mpq dead-letter retry 019ae8c4f1d23f2a9c0d1e4b5a69 019ae8c4f2070b1c2d3e4f5a6978
        graphiti_mpq dead-letter retry --all
    """
    if bool(job_ids) == retry_all:
        raise click.UsageError("give the IDs of dead jobs, or --all (not both)")
    retried = open_queue_for(state).retry_dead(None if retry_all else job_ids)
    for job_id in retried:
        click.echo(f"requeued {job_id}")
    if not retried:
        click.echo("no dead-letter jobs to retry")


@dead_letter.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask (required without a terminal).")
@pass_state
def dead_letter_purge(state: CliState, yes: bool) -> None:
    """Delete every dead job and its history, for good.

    \b
    Example:
        graphiti_mpq dead-letter purge --yes
    """
    queue = open_queue_for(state)
    count = queue.get_stats().dead_letter
    confirm_destructive(
        yes,
        f"Delete {count} dead-letter job{'s' if count != 1 else ''} for good?",
        action="purge the dead-letter jobs",
        ask=count > 0,
    )
    deleted = queue.purge_dead()
    click.echo(f"deleted {deleted} dead-letter job{'s' if deleted != 1 else ''}")


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@main.command()
@click.option("--older-than", type=DURATION, required=True, help="Age: 90, 30s, 15m, 2h or 7d.")
@click.option("--yes", is_flag=True, help="Do not ask (required without a terminal).")
@pass_state
def purge(state: CliState, older_than: float, yes: bool) -> None:
    """Delete succeeded, dead-lettered and cancelled jobs that finished before then.

    Pending and running jobs are never touched.

    \b
    Example:
        graphiti_mpq purge --older-than 7d --yes
    """
    age = _duration_text(older_than)
    confirm_destructive(
        yes,
        f"Delete every succeeded, dead and cancelled job that finished more than {age} ago?",
        action="purge finished jobs",
    )
    deleted = open_queue_for(state).purge(older_than)
    click.echo(f"deleted {deleted} finished job{'s' if deleted != 1 else ''} older than {age}")


from .cli_serve import drain, supervise  # noqa: E402  (the serving commands)

main.add_command(supervise)
main.add_command(drain)
