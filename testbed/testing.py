"""Helpers for tests that run against the local control plane and emulated Pi nodes
(shared by tests/testbed and tests/e2e, like kopf.testing for operators)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from typing import Any


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError, so pytest reports it as a
    failure with the message)."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
             diagnose: Callable[[], str] | None = None) -> Any:
    """Polls `cond` until it returns something truthy; raises WaitTimeout naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def free_subnet(first: int, last: int) -> str | None:
    """A 10.X.0.0/16 with first <= X < last that no route on this host overlaps, or None.
    Callers pick disjoint ranges so concurrently running suites never collide."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=False).stdout
    used = {int(m.group(1)) for m in re.finditer(r"\b10\.(\d+)\.", routes)}
    return next((f"10.{x}.0.0/16" for x in range(first, last) if x not in used), None)
