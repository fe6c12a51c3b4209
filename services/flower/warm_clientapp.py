"""The warm ClientApp: a per-node fork server for ``flwr-clientapp`` tasks.

Flower 1.42 has no long-lived ClientApp: the SuperNode's SuperExec spawns one cold
``flwr-clientapp`` interpreter per message (~1.1 s CPU of imports, more with torch). Here a
per-node process (the "zygote") imports ``flwr-clientapp`` and the app once; the
``flwr-clientapp`` shim first on the SuperExec's PATH hands its argv, env, cwd and stdio to
the zygote over a unix socket, and the zygote forks one pristine child per task: the same
per-message isolation as a fresh process, without the imports. (flwr 1.42's "warm executor
pools" pre-start Kubernetes pods for the Kubernetes executor; each task there still starts a
cold interpreter, so they do not replace this.)

Memory: a forked child shares the zygote's pages until it writes to them, and CPython writes
to an object whenever the cyclic garbage collector traverses it, so a child's collections
would copy the pages holding the preloaded modules' objects. The zygote collects once after
its imports and warm-up and calls ``gc.freeze()`` before every fork (the `gc` module's recipe
for fork servers): the children's collections then skip everything inherited. (The recipe
also disables the collector while importing, against freed holes between long-lived objects;
measured here that kept the warm-up's cyclic garbage and cost 22 MiB of PSS per zygote,
docs/BENCHMARKS.md "Memory footprint".)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shlex
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The `flwr-clientapp` shim: stdlib only (runs with `python -I -S`), hands argv, env, cwd and
# its stdio fds to the zygote, then mirrors the forked task's exit code.
_ZYGOTE_SHIM = r"""
import json, os, socket, struct, sys, time
sock_path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
deadline = time.monotonic() + 60
while True:
    try:
        s.connect(sock_path)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.stderr.write("flwr-clientapp shim: zygote %s unreachable\n" % sock_path)
            os._exit(1)
        time.sleep(0.05)
body = json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(s, [struct.pack("!I", len(body))], [0, 1, 2])
s.sendall(body)
data = b""
while len(data) < 4:
    chunk = s.recv(4 - len(data))
    if not chunk:
        os._exit(1)
    data += chunk
os._exit(struct.unpack("!i", data)[0])
"""


def write_warm_clientapp_shim(bin_dir: Path, socket_path: Path) -> Path:
    """Write a ``flwr-clientapp`` into ``bin_dir`` that forks the task from a warm zygote."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "flwr-clientapp"
    argv = [sys.executable, "-I", "-S", "-c", _ZYGOTE_SHIM, str(socket_path)]
    script.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return bin_dir


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("shim closed the connection")
        buf += chunk
    return buf


def _run_task(fn: Callable[[], Any], script: str, req: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the shim's process (stdio, cwd, env, argv), run the task."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [script, *req["argv"]]
    try:
        result = fn()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the task must never fall back into the zygote loop
        import traceback

        traceback.print_exc()
        return 1
    return result if isinstance(result, int) else 0


def run_zygote(
    socket_path: Path, script: str, preload: Sequence[str], poll_cap: float | None = None
) -> None:
    """Import ``script``'s entry point and ``preload`` once, then fork one child per request
    (each child is a pristine copy of the warm interpreter, like a fresh process)."""
    import importlib

    from pqfed.services.flower.environment import console_script
    from pqfed.services.flower.patches import install_fast_poll

    fn = console_script(script)
    if poll_cap is not None:
        install_fast_poll(poll_cap)
    for module in preload:
        importlib.import_module(module)
    gc.collect()  # the warm-up's cyclic garbage, before it is frozen for good
    gc.freeze()  # everything imported so far: outside every later collection
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(socket_path))
    srv.listen(64)
    print(f"zygote for {script} ready on {socket_path} (preloaded {list(preload)})", flush=True)

    def reap(pid: int, conn: socket.socket) -> None:
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
        conn.close()

    while True:
        conn, _ = srv.accept()
        fds: list[int] = []
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 4, 3)
            if not msg:  # readiness probe
                conn.close()
                continue
            req = json.loads(_recv_exact(conn, struct.unpack("!I", msg)[0]))
        except (OSError, ValueError, struct.error) as exc:
            print(f"zygote: bad request: {exc!r}", flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # what the loop allocated since: the child must not collect it either
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                srv.close()
                conn.close()
                code = _run_task(fn, script, req, fds)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        threading.Thread(target=reap, args=(pid, conn), daemon=True).start()
