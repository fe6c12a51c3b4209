"""The drivers' side of the crypto: worker pools, threads for the handshake, host defaults.

The handshake state machine (`pqfed.pqc.handshake`) owns no thread and reads nothing from the
host; what it may run concurrently it hands to a `CryptoRunner`, and this module provides the
threaded one (`ThreadedCrypto`), the key shares generated ahead of use (`KeySharePool`) and the
host-dependent defaults (`default_suites`, `parallel_default`).

A crypto worker pool for many peers at once (`CryptoPool`): sequential, threads or processes.

pyca/cryptography releases the GIL inside ML-DSA sign/verify and one-shot AEAD calls, but
holds it for ML-KEM, X25519 and HKDF. Threads therefore overlap the signature-heavy part of a
handshake only; processes overlap everything at the price of pickling arguments. The
benchmark `make bench-pqc` measures all three (docs/BENCHMARKS.md); `auto` picks processes
when more than one CPU is usable.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pqfed.pqc.backends import Backend
from pqfed.pqc.handshake import SUITE_AEAD, Group, KeyShare, Suite

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


def cpu_has_aes(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AES instructions (x86 'aes' flag, ARMv8 'aes' feature). The Raspberry Pi 4's
    Cortex-A72 lacks them, where ChaCha20-Poly1305 is several times faster."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return "aes" in value.split()
    return True


def default_suites() -> tuple[Suite, ...]:
    """This host's suite preference: PQFED_AEAD if set, else AES-GCM first where the CPU has
    AES instructions and ChaCha20-Poly1305 first where it has not."""
    forced = os.environ.get("PQFED_AEAD")
    if forced:
        return tuple(s for s in Suite if SUITE_AEAD[s] == forced.upper()) or tuple(Suite)
    if cpu_has_aes():
        return (Suite.AES_256_GCM_SHA384, Suite.CHACHA20_POLY1305_SHA384)
    return (Suite.CHACHA20_POLY1305_SHA384, Suite.AES_256_GCM_SHA384)


def parallel_default() -> bool:
    """Whether a handshake's two peer checks should run on two threads here.

    Measured (docs/BENCHMARKS.md): on 2 CPUs shared by both ends, the extra threads cost
    more than the overlap saves; with 4+ CPUs (Raspberry Pi 4) they pay off."""
    return usable_cpus() >= 4


class ThreadedCrypto:
    """The handshake's `CryptoRunner` on threads: ML-DSA signing and verification release the
    GIL, so the peer's two checks overlap, and the client's early signature overlaps the wait
    for the server's flight."""

    def __init__(self, workers: int = 2) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="pqfed-auth")

    def run_all(self, jobs: Sequence[Callable[[], object]]) -> list[object]:
        """jobs[1:] on pool threads while jobs[0] runs here; every job runs to its end, then
        the first failure in job order is raised."""
        futures = [self._executor.submit(job) for job in jobs[1:]]
        results: list[object] = []
        errors: list[BaseException | None] = []
        for i, job in enumerate(jobs):
            try:
                results.append(job() if i == 0 else futures[i - 1].result())
                errors.append(None)
            except Exception as exc:
                results.append(None)
                errors.append(exc)
        for err in errors:
            if err is not None:
                raise err
        return results

    def start(self, job: Callable[[], bytes]) -> Callable[[], bytes]:
        return self._executor.submit(job).result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_SHARED: ThreadedCrypto | None = None
_SHARED_LOCK = threading.Lock()


def shared_crypto() -> ThreadedCrypto:
    """One process-wide ThreadedCrypto, created on first use (the channel driver's default)."""
    global _SHARED  # noqa: PLW0603  (one lazily created pool per process)
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = ThreadedCrypto()
        return _SHARED


class KeySharePool:
    """Ephemeral key shares generated ahead of use (off the connection's critical path).

    Each share is used for exactly one handshake and then discarded, so forward secrecy is
    unchanged; the next one is generated on a background thread after a share is taken.
    """

    def __init__(self) -> None:
        self._ready: dict[Group, KeyShare] = {}
        self._lock = threading.Lock()
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="pqfed-keyshare")

    def take(self, group: Group, backend: Backend) -> KeyShare:
        with self._lock:
            share = self._ready.pop(group, None)
        if share is None:
            share = KeyShare.generate(group, backend)
        self._filler.submit(self._fill, group, backend)
        return share

    def _fill(self, group: Group, backend: Backend) -> None:
        share = KeyShare.generate(group, backend)
        with self._lock:
            self._ready.setdefault(group, share)


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
            from multiprocessing import get_context  # not needed by the sidecar's import

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
