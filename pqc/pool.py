"""A crypto worker pool for many peers at once: sequential, threads or processes.

pyca/cryptography releases the GIL inside ML-DSA sign/verify and one-shot AEAD calls, but
holds it for ML-KEM, X25519 and HKDF. Threads therefore overlap the signature-heavy part of a
handshake only; processes overlap everything at the price of pickling arguments. The
benchmark `make bench-pqc` measures all three (docs/BENCHMARKS.md); `auto` picks processes
when more than one CPU is usable.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class PoolMode(enum.StrEnum):
    SEQUENTIAL = "sequential"
    THREADS = "threads"
    PROCESSES = "processes"
    AUTO = "auto"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class CryptoPool:
    """Runs a module-level function over many inputs in the configured mode.

    The pool is long-lived (as in the sidecar): start-up cost is paid once, not per round.
    `initializer` runs in every worker (load identities there instead of pickling keys).
    """

    def __init__(
        self, mode: PoolMode | str = PoolMode.AUTO, workers: int | None = None,
        initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
    ) -> None:
        mode = PoolMode(mode)
        self.workers = workers or usable_cpus()
        if mode is PoolMode.AUTO:
            mode = PoolMode.PROCESSES if self.workers > 1 else PoolMode.SEQUENTIAL
        self.mode = mode
        self._executor: Executor | None = None
        if mode is PoolMode.THREADS:
            self._executor = ThreadPoolExecutor(self.workers, "pqfed-crypto",
                                                initializer, initargs)
        elif mode is PoolMode.PROCESSES:
            # forkserver: no inherited locks/threads from the parent (uvicorn, asyncio).
            self._executor = ProcessPoolExecutor(self.workers, get_context("forkserver"),
                                                 initializer, initargs)
        elif initializer is not None:
            initializer(*initargs)

    @property
    def executor(self) -> Executor | None:
        return self._executor

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        if self._executor is None:
            return [fn(x) for x in items]
        batch = list(items)
        chunk = 1 if self.mode is PoolMode.THREADS else max(1, len(batch) // (self.workers * 4))
        return list(self._executor.map(fn, batch, chunksize=chunk))

    def warm_up(self) -> None:
        """Starts every worker now, so the first round does not pay for it."""
        self.map(_noop, range(self.workers * 2))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CryptoPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _noop(x: int) -> int:
    return x
