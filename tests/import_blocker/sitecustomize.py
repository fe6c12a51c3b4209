"""Loaded by Python at start-up when this folder is on PYTHONPATH: makes the top-level modules
named in PQFED_BLOCK_IMPORTS (comma list) unimportable, as they are in an image that does not
ship them (tests/test_cli_imports.py)."""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_BLOCKED = frozenset(x for x in os.environ.get("PQFED_BLOCK_IMPORTS", "").split(",") if x)


class _Blocker:
    def find_spec(self, name: str, path: Any = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)",
                                      name=name)
        return None


sys.meta_path.insert(0, _Blocker())
