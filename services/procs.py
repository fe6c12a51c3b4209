"""Supervision of local OS processes: start one in its own session with its log file, wait
for it to serve, stop it with everything it started. Neutral (no Flower): the Flower runtime
(services/flower/), `pqfed run` and the benchmarks build on it."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class ProcessExited(RuntimeError):
    """A supervised process ended while something still needed it; the message carries the
    tail of its log."""

    def __init__(self, name: str, returncode: int | None, log_path: Path, tail: str) -> None:
        super().__init__(f"{name} exited with {returncode}; log {log_path}:\n{tail}")
        self.name = name
        self.returncode = returncode
        self.log_path = log_path


def terminate_process_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, its process group and all descendants; SIGKILL what survives."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=2.0)


@dataclass
class ManagedProcess:
    """One OS process in its own session, stdout+stderr appended to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            logf.write(f"# {time.strftime('%H:%M:%S')} $ {shlex.join(self.argv)}\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        log.debug("started %s pid=%d", self.name, self.popen.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            terminate_process_tree(self.popen.pid, timeout)
        else:  # leader gone: still sweep its session's group (e.g. orphaned app processes)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise `ProcessExited` (with the log's tail) unless the process still runs."""
        if not self.running:
            raise ProcessExited(self.name, self.returncode, self.log_path, self.tail())


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """``url`` answers 2xx (no proxy: every caller asks a loopback server)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def wait_http_ok(url: str, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if proc is not None:
            proc.check_alive()
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def wait_unix_socket(path: Path, timeout: float, proc: ManagedProcess) -> None:
    """Poll the unix socket ``path`` until it accepts; fail fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
        proc.check_alive()
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name}: {path} not accepting after {timeout:.0f}s")
