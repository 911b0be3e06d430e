"""How much an `--async` call costs a hook, against the same click CLI's `--help`.

Runs examples/graphiti_cli.py (a small click CLI using graphiti_mpq.async_option) as a hook
would (GRAPHITI_HOOK=1, a throwaway queue), interleaving `--help`, `add --async ...` and
`python -c "import sqlite3"`, and prints the medians. Target (issue 4): the `--async` call at
most 15 ms more than `--help`.

    .venv/bin/python scripts/bench_async.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "graphiti_cli.py"


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - began) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "GRAPHITI_QUEUE_PATH": f"{folder}/q.db", "GRAPHITI_HOOK": "1"}
        cli = [sys.executable, str(EXAMPLE)]
        _wall_ms([*cli, "add", "--async", "warm-up: creates the queue"], env)
        times: dict[str, list[float]] = {"--help": [], "--async": [], "import sqlite3": []}
        for _ in range(runs):
            times["--help"].append(_wall_ms([*cli, "--help"], env))
            times["--async"].append(_wall_ms([*cli, "add", "--async", "a note", "--tag", "x"], env))
            times["import sqlite3"].append(_wall_ms([sys.executable, "-c", "import sqlite3"], env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        low, high = min(times[name]), max(times[name])
        print(f"{name:16} median {value:7.1f} ms  (min {low:.1f}, max {high:.1f})")
    extra = medians["--async"] - medians["--help"]
    verdict = "PASS" if extra <= 15 else "MISS"
    print(f"--async costs {extra:.1f} ms more than --help (target <= 15 ms): {verdict}")
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
