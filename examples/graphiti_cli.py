#!/usr/bin/env python3
"""A minimal ``graphiti`` CLI using graphiti_mpq's ``--async`` option (a reference example).

    graphiti add "We chose SQLite for the queue" --scope project --tag decision
    graphiti add --async "We chose SQLite for the queue" --tag decision   # returns at once
    graphiti memory add style "tabs, not spaces" --kind preference

Instead of calling an LLM, each command appends one JSON line describing exactly what it
received (its parameters and working directory) to the file named by ``GRAPHITI_EXAMPLE_LOG``,
or prints it when that is unset. The tests compare these lines between a direct call and the
replay of a call recorded with ``--async``.

Install it as ``graphiti`` (a console script pointing at ``cli``), or point the worker at it:
``GRAPHITI_BIN=/path/to/a/wrapper/running/this/file``.
"""

from __future__ import annotations

import json
import os

import click

from graphiti_mpq import async_option


def _report(command: str, **received: object) -> None:
    line = json.dumps(
        {"command": command, "received": received, "cwd": os.getcwd()},
        ensure_ascii=False,
        sort_keys=True,
    )
    path = os.environ.get("GRAPHITI_EXAMPLE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(line + "\n")
    else:
        click.echo(line)


@click.group()
def cli() -> None:
    """graphiti: remember things in a knowledge graph (example)."""


@cli.command()
@click.argument("content", nargs=-1, required=True)
@click.option(
    "--scope", type=click.Choice(["project", "global"]), default="project", show_default=True
)
@click.option("--force", is_flag=True, help="Add even when a similar memory exists.")
@click.option("--summarize/--no-summarize", default=True, show_default=True)
@click.option("--tag", multiple=True, help="A tag (repeatable).")
@click.option("--max-facts", type=int, default=10, show_default=True)
@click.option("-v", "--verbose", count=True, help="More detail (repeatable).")
@async_option
def add(
    content: tuple[str, ...],
    scope: str,
    force: bool,
    summarize: bool,
    tag: tuple[str, ...],
    max_facts: int,
    verbose: int,
) -> None:
    """Add CONTENT to the knowledge graph."""
    _report(
        "add",
        content=list(content),
        scope=scope,
        force=force,
        summarize=summarize,
        tag=list(tag),
        max_facts=max_facts,
        verbose=verbose,
    )


@cli.group()
def memory() -> None:
    """Named memories."""


@memory.command("add")
@click.argument("name")
@click.argument("text", nargs=-1)
@click.option("--kind", type=click.Choice(["fact", "note", "preference"]), default="note")
@click.option("--weight", type=float, default=1.0, show_default=True)
@async_option
def memory_add(name: str, text: tuple[str, ...], kind: str, weight: float) -> None:
    """Remember TEXT under NAME."""
    _report("memory add", name=name, text=list(text), kind=kind, weight=weight)


if __name__ == "__main__":
    cli()
