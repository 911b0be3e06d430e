"""Is this process running inside a hook (an editor or agent hook, a script, a pipe)?

Stdlib only and cheap to import: ``graphiti add --async`` asks it on every call to decide
whether it may print anything.
"""

from __future__ import annotations

import os
import sys

__all__ = ["HOOK_ENV", "is_hook_context"]

#: ``GRAPHITI_HOOK=1`` (anything but ``0``) forces a hook context; ``GRAPHITI_HOOK=0`` forces a
#: terminal one. An empty value counts as unset.
HOOK_ENV = "GRAPHITI_HOOK"


def is_hook_context() -> bool:
    """True when output must stay silent: ``GRAPHITI_HOOK`` says so, or stdout is no terminal.

    - ``GRAPHITI_HOOK`` set to anything but ``"0"``: true.
    - ``GRAPHITI_HOOK=0``: false.
    - unset or empty: true when stdout is not a terminal (a pipe, a file, closed or missing).
    """
    value = os.environ.get(HOOK_ENV, "")
    if value:
        return value != "0"
    stdout = sys.stdout
    if stdout is None:
        return True
    try:
        return not stdout.isatty()
    except (AttributeError, ValueError, OSError):
        # No isatty, or a closed stream: nobody is watching.
        return True
