"""The console script ``graphiti_mpq``.

``enqueue`` is what hooks run, so it first goes through ``fastpath`` (no click, no structlog);
every other command, and any ``enqueue`` the fast path declines, goes to the click CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the CLI; always ends the process with the command's exit status."""
    argv = sys.argv[1:]
    if "enqueue" in argv:
        from .fastpath import try_enqueue

        status = try_enqueue(argv)
        if status is not None:
            sys.exit(status)
    from .cli import main as cli

    cli.main(args=argv, prog_name="graphiti_mpq")
