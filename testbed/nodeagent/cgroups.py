"""CPU and memory limits for an emulated node and its pods, with cgroup v1 or v2.

Hierarchy: ``pqfed/<node>`` (``--cpu-limit-cores``: the whole node's CPU
quota) / ``pod-<uid>`` (sum of the containers' limits when all have one) /
``<container>`` (``resources.limits.cpu`` and ``.memory``). The container's
cgroup also tracks its processes, so none survives the container.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _v1_mounts() -> dict[str, Path]:
    """controller -> mount point of the cgroup v1 hierarchies."""
    mounts: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup":
            for opt in fields[3].split(","):
                if opt in ("cpu", "memory", "pids"):
                    mounts.setdefault(opt, Path(fields[1]))
    return mounts


@dataclass(frozen=True)
class Limits:
    cpu_cores: float | None = None
    memory_bytes: int | None = None


class Cgroups:
    """Creates, fills, kills and removes the cgroups of one node (``pqfed/<node>``)."""

    def __init__(self, node: str, root: Path = ROOT) -> None:
        self.node_rel = Path("pqfed") / node
        self.version = 0
        self.mounts: dict[str, Path] = {}
        if (root / "cgroup.controllers").exists():
            self.version = 2
            self.mounts = {"unified": root}
        else:
            mounts = _v1_mounts()
            if "cpu" in mounts:
                self.version = 1
                self.mounts = mounts
        self.available = bool(self.mounts) and all(
            os.access(m, os.W_OK) for m in self.mounts.values()
        )
        if not self.available:
            log.warning("no writable cgroup hierarchy: CPU/memory limits are not applied")

    # -- paths --------------------------------------------------------------
    def _dirs(self, rel: Path) -> list[Path]:
        return [m / rel for m in self.mounts.values()]

    def tracking_dir(self, rel: Path) -> Path | None:
        """The directory whose cgroup.procs lists the processes of ``rel``."""
        if not self.available:
            return None
        return self.mounts["unified" if self.version == 2 else "cpu"] / self.node_rel / rel

    def cpu_file(self, rel: Path | None = None) -> Path | None:
        """``cpu.cfs_quota_us`` (v1) or ``cpu.max`` (v2) of the node or of ``rel`` below it."""
        if not self.available:
            return None
        base = self.mounts["unified" if self.version == 2 else "cpu"] / self.node_rel
        if rel is not None:
            base = base / rel
        return base / ("cpu.max" if self.version == 2 else "cpu.cfs_quota_us")

    # -- setup ----------------------------------------------------------------
    def _enable_v2_controllers(self, rel: Path) -> None:
        root = self.mounts["unified"]
        current = root
        for part in rel.parts:
            with contextlib.suppress(OSError):
                _write(current / "cgroup.subtree_control", "+cpu +memory +pids")
            current = current / part

    def _apply(self, directory: Path, controller: str, limits: Limits) -> None:
        if self.version == 2:
            if limits.cpu_cores is not None or (directory / "cpu.max").exists():
                v2_quota = "max" if limits.cpu_cores is None else str(
                    max(1000, int(limits.cpu_cores * PERIOD_US)))
                with contextlib.suppress(OSError):
                    _write(directory / "cpu.max", f"{v2_quota} {PERIOD_US}")
            if limits.memory_bytes is not None:
                with contextlib.suppress(OSError):
                    _write(directory / "memory.max", str(limits.memory_bytes))
            return
        if controller == "cpu":
            _write(directory / "cpu.cfs_period_us", str(PERIOD_US))
            quota = -1 if limits.cpu_cores is None else max(1000, int(limits.cpu_cores * PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(quota))
        elif controller == "memory" and limits.memory_bytes is not None:
            _write(directory / "memory.limit_in_bytes", str(limits.memory_bytes))

    def ensure(self, rel: Path | None, limits: Limits) -> list[Path]:
        """Create ``pqfed/<node>[/rel]`` with ``limits``; return the ``cgroup.procs`` to join."""
        if not self.available:
            return []
        full = self.node_rel / rel if rel is not None else self.node_rel
        procs: list[Path] = []
        if self.version == 2:
            self._enable_v2_controllers(full)
        for controller, mount in self.mounts.items():
            directory = mount / full
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self._apply(directory, controller, limits)
            except OSError as exc:
                log.warning("cgroup %s: %s", directory, exc)
                continue
            procs.append(directory / "cgroup.procs")
        return procs

    # -- processes ------------------------------------------------------------
    def pids(self, rel: Path) -> list[int]:
        """Every process in ``rel`` and below it."""
        top = self.tracking_dir(rel)
        if top is None or not top.is_dir():
            return []
        found: list[int] = []
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError):
                    text = (Path(dirpath) / "cgroup.procs").read_text()
                    found += [int(p) for p in text.split()]
        return found

    def kill(self, rel: Path, sig: int = signal.SIGKILL) -> int:
        """Signal every process in ``rel``; return how many there were."""
        pids = self.pids(rel)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return len(pids)

    def oom_killed(self, rel: Path) -> bool:
        if not self.available:
            return False
        if self.version == 2:
            events = self.mounts["unified"] / self.node_rel / rel / "memory.events"
        elif "memory" in self.mounts:
            events = self.mounts["memory"] / self.node_rel / rel / "memory.oom_control"
        else:
            return False
        with contextlib.suppress(OSError, ValueError):
            for line in events.read_text().splitlines():
                key, _, val = line.partition(" ")
                if key == "oom_kill" and int(val) > 0:
                    return True
        return False

    def remove(self, rel: Path | None = None) -> None:
        """rmdir ``rel`` (default: the node's cgroup) and its children, once empty of processes."""
        if not self.available:
            return
        for top in self._dirs(self.node_rel / rel if rel is not None else self.node_rel):
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    Path(dirpath).rmdir()
