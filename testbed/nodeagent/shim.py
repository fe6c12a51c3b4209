"""Container shim: run by the node agent as ``python -I -S shim.py SPEC.json``.

Standard library only (it runs with ``-S``). In this order it joins the
container's cgroups, enters the pod's network namespace, unshares a private
mount (and UTS) namespace like ``unshare --mount --propagation private``,
bind-mounts the materialised volumes and the pod's /etc/hosts onto their
mountPaths, binds the project's runtime (virtualenv, Python, source tree) back
over any volume that hid it, sets the hostname, changes to workingDir, then forks the
container's process. It stays as the parent, in the same process group
(the agent signals the group), ignoring SIGTERM/SIGINT/SIGHUP so that it
survives to write ``exit_file`` (exit code, signal, finish time) when the
process ends; then it SIGKILLs what is left of the process group, itself
included. The spec (it may hold secret env values) is deleted once read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {source} -> {target}",
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _ensure_mountpoint(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        with open(target, "a"):
            pass


def setup(spec: dict[str, Any]) -> None:
    for procs in spec.get("cgroups") or []:
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    netns = spec.get("netns")
    if netns:
        fd = os.open(netns, os.O_RDONLY)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
        finally:
            os.close(fd)
    if not spec.get("mount_namespace", True):
        return
    flags = CLONE_NEWNS | (CLONE_NEWUTS if spec.get("hostname") else 0)
    _check(_libc.unshare(flags), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Like `ip netns exec`: /sys shows the namespace's interfaces.
    if netns and _libc.umount2(b"/sys", MNT_DETACH) == 0:
        with contextlib.suppress(OSError):
            _mount("sysfs", "/sys", "sysfs", 0)
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    # An image carries its runtime at a fixed path that no volume covers; an emulated pod runs
    # the agent's virtualenv from the host, wherever the repository was cloned. A volume at
    # that path's parent (the chart's emptyDir at /tmp, say, with the clone under /tmp) would
    # hide it, so the runtime is held open before the volumes and bound back after them.
    runtime = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY))
               for path in spec.get("runtime") or [] if os.path.isdir(path)]
    for m in spec.get("mounts") or []:
        source, target = m["source"], m["target"]
        _ensure_mountpoint(source, target)
        _mount(source, target, None, MS_BIND | MS_REC)
        if m.get("readonly"):
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    for path, fd in runtime:
        held = f"/proc/self/fd/{fd}"
        try:
            visible = os.path.samestat(os.stat(held), os.stat(path))
        except OSError:
            visible = False
        if not visible:
            os.makedirs(path, exist_ok=True)
            _mount(held, path, None, MS_BIND | MS_REC)
        os.close(fd)


def main(argv: list[str]) -> int:
    spec_path = argv[1]
    with open(spec_path) as fh:
        spec: dict[str, Any] = json.load(fh)
    os.unlink(spec_path)
    exit_file: str = spec["exit_file"]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        setup(spec)
        cwd = spec.get("cwd") or "/"
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
    except OSError as exc:
        print(f"pqfed-shim: cannot set up the container: {exc}", file=sys.stderr, flush=True)
        _write_json(exit_file, {"exitCode": 128, "reason": "StartError",
                                "message": f"cannot set up the container: {exc}",
                                "finishedAt": _now()})
        return 128
    argv_c: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the container process
        os.close(err_r)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.execvpe(argv_c[0], argv_c, env)  # noqa: S606  (err_w is close-on-exec)
        except OSError as exc:
            os.write(err_w, f"exec {argv_c[0]!r}: {exc.strerror or exc}".encode())
        finally:
            os._exit(127)
    os.close(err_w)
    # The pipe closes on a successful exec (CLOEXEC) or carries the exec error.
    chunks = []
    while True:
        chunk = os.read(err_r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(err_r)
    exec_error = b"".join(chunks).decode(errors="replace")
    started = _now()
    _write_json(spec["pid_file"], {"pid": pid, "startedAt": started})
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    result: dict[str, Any] = {"finishedAt": _now(), "startedAt": started}
    if exec_error:
        print(f"pqfed-shim: {exec_error}", file=sys.stderr, flush=True)
        result.update(exitCode=128, reason="StartError", message=exec_error)
    elif os.WIFSIGNALED(status):
        result.update(exitCode=128 + os.WTERMSIG(status), signal=os.WTERMSIG(status))
    else:
        result["exitCode"] = os.WEXITSTATUS(status)
    _write_json(exit_file, result)
    # No process of the container outlives its main process.
    os.killpg(os.getpgrp(), signal.SIGKILL)
    return int(result["exitCode"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
