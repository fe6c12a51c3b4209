"""Follows the benchmark's processes or pods through their logs, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pqfed.testbed.bench.common import LogState, parse_log


class BenchError(RuntimeError):
    """A node or the aggregator failed; the message carries its log tail."""


class Watched(Protocol):
    name: str

    def log(self) -> str: ...

    def state(self) -> str | None:
        """None while running, "ok" once exited cleanly, else a failure reason."""


@dataclass
class Outcome:
    name: str
    log: str
    parsed: LogState


def watch(items: Sequence[Watched], progress: Any, timeout: float,
          until: Callable[[Watched, LogState], bool] | None = None,
          interval: float = 1.0) -> dict[str, Outcome]:
    """Polls every item until all finished (or `until` holds for each); fails fast on the
    first failure or at the deadline. `progress` is a rich Progress (tasks per item)."""
    tasks = {it.name: progress.add_task(f"{it.name}: starting", total=1) for it in items}
    deadline = time.monotonic() + timeout
    pending = {it.name for it in items}
    outcomes: dict[str, Outcome] = {}
    while pending:
        for it in items:
            if it.name not in pending:
                continue
            text = it.log()
            st = parse_log(text)
            p = st.progress or {}
            if p:
                progress.update(tasks[it.name], description=f"{it.name}: {p.get('step', '')}",
                                completed=p.get("done", 0), total=max(1, p.get("total", 1)))
            state = it.state()
            reached = until is not None and until(it, st)
            if state is not None and state != "ok":
                tail = "\n".join(text.splitlines()[-40:])
                raise BenchError(f"{it.name} failed ({state}); last log lines:\n{tail}")
            if state == "ok" or reached:
                if state == "ok" and until is None and st.result is None:
                    tail = "\n".join(text.splitlines()[-40:])
                    raise BenchError(f"{it.name} exited without a result; log:\n{tail}")
                pending.discard(it.name)
                outcomes[it.name] = Outcome(it.name, text, st)
                if until is None:
                    progress.update(tasks[it.name], description=f"{it.name}: done",
                                    completed=1, total=1)
                else:
                    progress.remove_task(tasks[it.name])
        if pending:
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for "
                                 f"{', '.join(sorted(pending))}")
            time.sleep(interval)
    return outcomes
