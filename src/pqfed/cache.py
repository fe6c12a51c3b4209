"""The one place pqfed keeps what it builds or downloads outside the repository.

``$PQFED_CACHE``, by default ``~/.cache/pqfed``: liboqs (``liboqs/``), datasets (``data/``),
the test clusters (``cluster/``), image layers (``images/``) and benchmark base trees
(``regress/``). The Makefile and the shell scripts under pqc/native and testbed/cluster read the
same variable with the same default.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PQFED_CACHE"


def cache_dir() -> Path:
    """``$PQFED_CACHE`` when set and not empty, else ``~/.cache/pqfed``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pqfed").expanduser()
