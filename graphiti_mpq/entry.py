"""The console script ``graphiti_mpq``.

Kept free of heavy imports at module level: a fast path for ``enqueue`` (no click, no
structlog) can be added here without slowing anything else down.
"""

from __future__ import annotations


def main() -> None:
    """Run the CLI; always ends the process with the command's exit status."""
    from .cli import main as cli

    cli.main(prog_name="graphiti_mpq")
