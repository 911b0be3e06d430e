"""The benchmark of issue 5: graphiti_mpq side by side with its peers (``scripts/bench.py``).

Run it from the bench environment (``scripts/bench-env``), never from the project's own: the
peers are not dependencies of graphiti_mpq.
"""
