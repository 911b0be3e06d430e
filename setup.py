"""The one compiled part: ``graphiti_mpq._spawn`` (see its source for why).

Optional: where it cannot be built (no C compiler, not Linux), the install goes on without it
and replays start through the exec wrappers instead (slower, equally safe).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension("graphiti_mpq._spawn", ["graphiti_mpq/_spawn.c"], optional=True)
    )

setup(ext_modules=ext_modules)
