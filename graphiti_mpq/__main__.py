"""``python -m graphiti_mpq``: the same CLI as the ``graphiti_mpq`` console script."""

from __future__ import annotations

from graphiti_mpq.entry import main

if __name__ == "__main__":
    main()
