#!/usr/bin/env python3
"""Benchmarks of issue 5: graphiti_mpq side by side with Huey and litequeue.

Set up the bench environment first (the peers are never dependencies of graphiti_mpq):

    scripts/bench-env
    .bench-venv/bin/python scripts/bench.py            # every metric, several runs each
    .bench-venv/bin/python scripts/bench.py --quick    # a short run
    .bench-venv/bin/python scripts/bench.py --json     # for machines
    .bench-venv/bin/python scripts/bench.py --profile 10000   # where a drain's time goes

The measurements live in the ``bench`` package beside this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.main import main

if __name__ == "__main__":
    sys.exit(main())
